"""Evaluate a run (or every run of a sweep) in --workdir; optionally sample text.

python eval.py --workdir=runs/swiglu
python eval.py --workdir=runs/swiglu --sample="ROMEO:" --temperature=0.8
python eval.py --workdir=runs/compare          # a sweep: results.md, results.csv, plots
python eval.py --workdir=runs/swiglu --inspect --layers=0,1 --neurons=8 --contexts=5
                                               # inspect.md: key-value memories, experts
python eval.py --workdir=gs://bucket/runs/swiglu   # an object-store workdir (pip install .[gcs])

Multi-process: every process runs the same command with ``--distributed.*`` (the fields of
train.py's ``--config.distributed.*``; on a TPU pod or SLURM step they are detected), e.g.
process ``i`` of two::

    python eval.py --workdir=/shared/run --sample="ROMEO:" \
        --distributed.coordinator_address=host0:1234 --distributed.num_processes=2 \
        --distributed.process_id=$i
"""

from ffn_jax.host import prepare_process

prepare_process()  # XLA:CPU flags, then huge-page malloc (ffn_jax/host.py)

from absl import app, flags  # noqa: E402

from configs.base import get_config  # noqa: E402
from ffn_jax.cli import parse_flags, run_eval, run_inspect  # noqa: E402
from ffn_jax.spec import distributed_spec, to_dict  # noqa: E402

flags.DEFINE_string("workdir", None, "A run directory or a sweep directory.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_string("sample", None, "Prompt to continue instead of evaluating.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate with --sample.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool(
    "inspect",
    False,
    "Write inspect.md (FFN key-value memories; expert "
    "specialisation for MoE runs) instead of evaluating.",
)
flags.DEFINE_string("layers", "", "--inspect: comma-separated layer indices (default: all).")
flags.DEFINE_integer("neurons", 8, "--inspect: neurons listed per dense layer.")
flags.DEFINE_integer("contexts", 5, "--inspect: top-activating contexts per neuron.")
flags.DEFINE_integer("windows", 64, "--inspect: validation windows scanned.")
flags.DEFINE_bool("experts", None, "--inspect: expert specialisation (default: for MoE runs).")
DISTRIBUTED = to_dict(get_config().distributed)  # train.py's config.distributed defaults
_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float}
for _field, _default in DISTRIBUTED.items():
    _DEFINE[type(_default)](
        f"distributed.{_field}", _default, f"As train.py's --config.distributed.{_field}."
    )


def main(argv):
    del argv
    f = flags.FLAGS
    if f.inspect:
        run_inspect(
            f.workdir,
            step=f.step,
            layers=f.layers,
            neurons=f.neurons,
            contexts=f.contexts,
            windows=f.windows,
            experts=f.experts,
        )
        return
    run_eval(
        f.workdir,
        step=f.step,
        sample_prompt=f.sample,
        temperature=f.temperature,
        max_new_tokens=f.max_new_tokens,
        seed=f.seed,
        dist=distributed_spec({k: f[f"distributed.{k}"].value for k in DISTRIBUTED}),
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
