"""Runs that differ only in seed and learning rate share compiled programs, and sharing
changes nothing they compute; MoE evaluation never depends on the rest of the batch."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ffn_jax import programs
from ffn_jax.metrics import read_metrics
from ffn_jax.model import LM
from tests.helpers import model_spec, run_spec, tiny, tiny_model_cfg, train


def _cfg(seed, lr):
    return tiny(
        **{
            "seed": seed,
            "train.lr": lr,
            "train.steps": 4,
            "train.warmup_steps": 1,
            "train.log_every": 1,
            "train.eval_every": 0,
            "train.checkpoint_every": 4,
            "train.final_eval": False,
        }
    )


def _losses(workdir):
    return [r["loss"] for r in read_metrics(str(workdir)) if "loss" in r]


def _start(workdir):
    return next(r for r in read_metrics(str(workdir)) if r.get("event") == "start")


def test_a_second_seed_and_lr_reuse_the_programs_and_match_a_fresh_compile(tmp_path):
    programs.clear()
    train(_cfg(0, 1e-3), tmp_path / "a")
    train(_cfg(1, 3e-3), tmp_path / "b")
    assert not _start(tmp_path / "a")["compiled_step_reused"]
    assert _start(tmp_path / "b")["compiled_step_reused"]
    programs.clear()  # run b again with programs compiled for it alone
    train(_cfg(1, 3e-3), tmp_path / "c")
    assert not _start(tmp_path / "c")["compiled_step_reused"]
    assert _losses(tmp_path / "b") == _losses(tmp_path / "c")  # bit-identical
    assert _losses(tmp_path / "a") != _losses(tmp_path / "b")
    other = _cfg(1, 3e-3)
    other.train.weight_decay = 0.0  # another program: a key of its own
    keys = {programs.program_key(run_spec(c)) for c in (_cfg(0, 1e-3), _cfg(1, 3e-3), other)}
    assert len(keys) == 2


def test_host_loop_settings_share_the_programs_and_fields_that_shape_them_do_not():
    """A tuning run (validation only) and a final run (both splits, another eval cadence)
    of one variant compile once; a change to the schedule's length or the model does not."""
    base = run_spec(_cfg(0, 1e-3))
    host = _cfg(3, 2e-3)
    host.train.update(
        eval_splits="validation",
        final_val_batches=5,
        eval_every=2,
        eval_batches=3,
        log_every=2,
        checkpoint_every=2,
        keep_checkpoints=1,
        final_eval=True,
    )
    assert programs.program_key(run_spec(host)) == programs.program_key(base)
    longer, wider = _cfg(0, 1e-3), _cfg(0, 1e-3)
    longer.train.steps = 8  # the cosine schedule's length is baked into the step
    wider.model.d_model = 128
    keys = {programs.program_key(run_spec(c)) for c in (longer, wider)}
    assert programs.program_key(base) not in keys and len(keys) == 2


def _moe_lm(eval_capacity_factor):
    cfg = tiny_model_cfg()
    moe = cfg.moe
    moe.num_experts, moe.top_k, moe.capacity_factor = 4, 1, 0.25
    moe.eval_capacity_factor = eval_capacity_factor
    model = LM(model_spec(cfg), rngs=nnx.Rngs(0))
    model.eval()
    return model


def test_moe_evaluation_is_dropless_so_a_sequence_scores_alone_as_in_a_batch():
    x = jax.random.randint(jax.random.key(1), (8, 16), 0, 97)
    for factor, independent in ((0.0, True), (0.25, False)):
        model = _moe_lm(factor)
        alone, _ = model(x[:1])
        batched, _ = model(x)
        same = np.allclose(np.asarray(alone[0]), np.asarray(batched[0]), atol=1e-5)
        assert same == independent, factor
    assert jnp.isfinite(alone).all()
