"""Train one config, or every run of a sweep config, into --workdir.

    python train.py --config=configs/base.py:swiglu --workdir=runs/swiglu
    python train.py --config=configs/compare.py:cpu --workdir=runs/compare
    python train.py --config=configs/compare.py:gpu --workdir=runs/gpu --dry_run  # sizes only

Multi-host jobs run the same command in every process; the mesh and the ``distributed``
block are flags too (docs/scaling.md), e.g. process ``i`` of two::

    python train.py --config=configs/base.py:swiglu --workdir=/shared/run \
        --config.mesh.shape.fsdp=-1 --config.mesh.shape.data=1 \
        --config.distributed.coordinator_address=host0:1234 \
        --config.distributed.num_processes=2 --config.distributed.process_id=$i
"""

from ffn_jax.host import prepare_process

prepare_process()  # XLA:CPU flags, then huge-page malloc (ffn_jax/host.py)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ffn_jax.cli import parse_flags, run_dry, run_train  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/base.py", "Config file[:arg].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for everything the run writes.", required=True)
flags.DEFINE_bool(
    "dry_run",
    False,
    "Resolve and check every run, print its parameters, training tokens, tokens per "
    "parameter and epochs, then exit: no data prepared, nothing trained or written.",
)


def main(argv):
    del argv
    run = run_dry if flags.FLAGS.dry_run else run_train
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
