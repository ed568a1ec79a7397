"""Every shipped config and preset validates and builds its model (abstractly)."""

import numpy as np
import pytest
from flax import nnx

from configs import base, compare
from ffn_jax import sweep
from ffn_jax.configuration import validate_config
from ffn_jax.model import LM
from ffn_jax.spec import padded_vocab
from ffn_jax.sweep import run_configs
from tests.helpers import run_spec


def _builds(config):
    problems = validate_config(config, num_devices=8)
    assert problems == [], problems
    spec = run_spec(config, num_devices=8)
    model = nnx.eval_shape(lambda: LM(spec.model, rngs=nnx.Rngs(0)))
    vocab = 257 if config.data.tokenizer == "byte" else config.data.vocab_size
    assert spec.model.vocab_size == padded_vocab(vocab, config.model.vocab_multiple_of)
    assert model.embed.shape == (spec.model.vocab_size, config.model.d_model)


@pytest.mark.parametrize("size", list(base.SIZES))
@pytest.mark.parametrize("variant", ["relu", "swiglu"])
def test_base_config_builds(size, variant):
    _builds(base.get_config(f"{variant},size={size}"))


@pytest.mark.parametrize("preset", list(compare.PRESETS))
def test_compare_preset_runs_build(preset):
    c = compare.get_config(preset)
    names = c.sweep.variants.split(",")
    cells = sweep.cells(c)
    assert list(dict.fromkeys(cell.group["variant"] for cell in cells)) == names
    tune = sweep.Tuning.of(c)
    extra = {tune.field: tune.values[0]} if tune else None
    for cell in cells:
        _builds(sweep.run_config(c, cell.run(0, extra)))
    if preset in ("cpu", "quick"):  # the README's main job and its smoke run are tuned
        assert tune is not None and tune.field == "train.lr" and c.sweep.seeds >= 2
    if preset == "cpu":
        assert len(tune.values) >= 5 and c.sweep.seeds >= 5
        ratios = np.array(tune.values[1:]) / np.array(tune.values[:-1])
        np.testing.assert_allclose(ratios, tune.factor)


def test_cpu_preset_is_parameter_matched():
    from ffn_jax.report import param_counts

    counts = {}
    c = compare.get_config("cpu")
    c.sweep.tune.field = ""
    for name, run in run_configs(c)[:11]:
        counts[name] = param_counts(run_spec(run).model)["params_active"]
    base_count = counts["relu-s0"]
    assert all(abs(n / base_count - 1) < 0.02 for n in counts.values()), counts


@pytest.mark.parametrize(
    "arg, message",
    [
        ("swiglu,size=huge", r"size='huge' is not a size preset"),
        ("swiglu,colour=red", r"unknown keys \['colour'\]"),
    ],
)
def test_bad_config_args(arg, message):
    with pytest.raises(ValueError, match=message):
        base.get_config(arg)


def test_unknown_compare_preset():
    with pytest.raises(ValueError, match=r"'laptop' is not a compare preset"):
        compare.get_config("laptop")


def test_original_block_is_a_compare_row():
    c = compare.get_config("cpu")
    c.sweep.variants, c.sweep.tune.field = "relu,original", ""
    runs = dict(run_configs(c))
    orig = runs["original-s0"].model
    assert (orig.norm_position, orig.positions, orig.norm, orig.ffn) == (
        "post",
        "learned",
        "layer",
        "relu",
    )
    assert orig.ffn_bias and orig.dropout == 0.1
    assert runs["relu-s0"].model.norm_position == "pre"
    _builds(runs["original-s0"])


@pytest.mark.parametrize("arg", ["original", "original,size=tiny", "gelu,preset=original"])
def test_original_base_preset_builds(arg):
    _builds(base.get_config(arg))


def test_original_moe_row_has_expert_dropout_and_a_router_bias():
    """The 2017 block's MoE row is configured like the reference MoE FFN: dropout in its
    experts (the block's 0.1), a router bias (counted), biased GELU experts, dropless, and
    the dense GELU's active parameters."""
    from ffn_jax.report import param_counts

    c = compare.get_config("cpu")
    c.sweep.variants, c.sweep.tune.field = "original,original_moe", ""
    c.sweep.presets.original.ffn = "gelu"
    runs = dict(run_configs(c))
    spec = run_spec(runs["original_moe-s0"], num_devices=8).model
    s = spec.moe
    assert s is not None
    assert (s.dropout, s.router_bias, s.dispatch) == (0.1, True, "dropless")
    assert (s.num_experts, s.top_k, s.renormalize) == (8, 2, True)
    model = nnx.eval_shape(lambda: LM(spec, rngs=nnx.Rngs(0)))
    moe = next(m for _, m in model.iter_modules() if type(m).__name__ == "MoEFFN")
    assert moe.router_bias is not None and moe.b1 is not None and moe.b2 is not None
    dense = param_counts(run_spec(runs["original-s0"], num_devices=8).model)
    routed = param_counts(spec)
    assert abs(routed["params_active"] / dense["params_active"] - 1) < 0.02


def test_moe_preset_arms_and_reference():
    c = compare.get_config("moe")
    assert c.sweep.seeds >= 3 and c.sweep.reference == "softmax_aux"
    arms = {name: dict(c.sweep.presets[name]) for name in c.sweep.variants.split(",")}
    pairs = {(a.get("router"), a.get("balance")) for a in arms.values()}
    for router in ("topk", "sigmoid_topk"):
        assert {(router, b) for b in ("aux", "loss_free", "none")} <= pairs
    assert ("expert_choice", "none") in pairs
    c.sweep.reference = "moe_top1"
    with pytest.raises(ValueError, match=r"sweep.reference='moe_top1' is not in sweep.variants"):
        sweep.variant_names(c)
