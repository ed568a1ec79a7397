"""``model.ffn_init``: the unit-variance gain on the hidden activations, dense FFN and MoE
experts alike; ``"default"`` is the unscaled FFN, bit for bit."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ffn_jax import ffn, programs
from ffn_jax.model import LM
from ffn_jax.moe import MoEFFN
from ffn_jax.moe.experts import dense_experts
from ffn_jax.run import build_run_state
from ffn_jax.spec import ConfigError, config_diff, from_config, model_spec, problems
from tests.helpers import moe_settings, run_spec, tiny, tiny_model_cfg

VARIANTS = sorted(ffn.VARIANTS)

# Closed forms of std(h) for N(0, 1) pre-activations.
EXACT_STD = {
    "relu": math.sqrt(0.5 - 1 / (2 * math.pi)),  # E[relu^2] = 1/2, E[relu] = 1/sqrt(2 pi)
    "squared_relu": math.sqrt(1.25),  # E[relu^4] = 3/2, E[relu^2] = 1/2
    "bilinear": 1.0,  # z * z3
    "reglu": math.sqrt(0.5),  # relu(z) * z3: mean 0, E[relu^2] = 1/2
}


def hidden_samples(name: str, n: int = 1_000_000, seed: int = 0) -> np.ndarray:
    """``n`` draws of the variant's (unscaled) hidden activation for N(0, 1) inputs."""
    v = ffn.get_variant(name)
    z = np.random.default_rng(seed).standard_normal((2, n)).astype(np.float32)
    h = np.asarray(v.activation(jnp.asarray(z[0])), np.float64)
    return h * z[1] if v.gated else h


@pytest.mark.parametrize("name", VARIANTS)
def test_gain_is_one_over_monte_carlo_std(name):
    gain = ffn.hidden_gain(name, "unit_variance")
    assert gain == pytest.approx(1.0 / hidden_samples(name).std(), rel=0.01)
    assert ffn.hidden_gain(name, "default") == 1.0


@pytest.mark.parametrize("name", sorted(EXACT_STD))
def test_gain_matches_closed_form(name):
    assert ffn.unit_variance_gain(name) == pytest.approx(1.0 / EXACT_STD[name], rel=1e-6)


def test_gain_is_computed_when_the_ffn_is_built_inside_a_trace():
    """Models are built under ``nnx.jit``/``eval_shape`` (sharded init, restore): the gain
    must still come out a Python float, the same as eagerly."""
    eager = ffn.unit_variance_gain("geglu")
    ffn.unit_variance_gain.cache_clear()
    abstract = nnx.eval_shape(
        lambda: ffn.build_ffn("geglu", 16, ffn_init="unit_variance", rngs=nnx.Rngs(0))
    )
    assert isinstance(abstract.activation, ffn.ScaledActivation)
    assert type(abstract.activation.gain) is float and abstract.activation.gain == eager


def test_aliases_share_a_gain_and_unknown_init_is_refused():
    assert ffn.unit_variance_gain("silu") == ffn.unit_variance_gain("swish")
    with pytest.raises(ValueError, match="unknown model.ffn_init 'xavier'"):
        ffn.hidden_gain("relu", "xavier")


def _x(d: int, n: int = 2048, seed: int = 3) -> jax.Array:
    """N(0, 1) inputs: with the ``1/sqrt(d)`` init, ``x W1`` (and ``x W3``) is ~N(0, 1)."""
    return jax.random.normal(jax.random.key(seed), (n, d))


@pytest.mark.parametrize("name", VARIANTS)
def test_unit_variance_hidden_has_unit_std(name):
    d = 512
    x = _x(d)
    scaled = ffn.build_ffn(name, d, d_ff=256, ffn_init="unit_variance", rngs=nnx.Rngs(0))
    plain = ffn.build_ffn(name, d, d_ff=256, rngs=nnx.Rngs(0))
    pre = x @ scaled.w1[...]
    assert float(jnp.std(pre)) == pytest.approx(1.0, rel=0.03)  # the premise: unit pre-acts
    assert float(jnp.std(scaled.hidden(x))) == pytest.approx(1.0, rel=0.05)
    # Without the gain the spread across variants is what the option removes.
    gain = ffn.unit_variance_gain(name)
    assert float(jnp.std(plain.hidden(x))) == pytest.approx(1.0 / gain, rel=0.05)


@pytest.mark.parametrize("name", ["relu", "squared_relu", "glu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_default_is_bit_identical_and_gain_is_not_a_parameter(name, bias):
    d, f = 16, 24
    before = ffn.build_ffn(name, d, d_ff=f, use_bias=bias, rngs=nnx.Rngs(0))  # no option
    default = ffn.build_ffn(name, d, d_ff=f, use_bias=bias, ffn_init="default", rngs=nnx.Rngs(0))
    scaled = ffn.build_ffn(
        name, d, d_ff=f, use_bias=bias, ffn_init="unit_variance", rngs=nnx.Rngs(0)
    )
    assert default.activation is ffn.get_variant(name).activation  # the registry's function
    x = jax.random.normal(jax.random.key(1), (3, 5, d))
    np.testing.assert_array_equal(default(x), before(x))
    # Same parameters (names, shapes, values): the gain lives in no checkpoint.
    p_default, p_scaled = nnx.state(default, nnx.Param), nnx.state(scaled, nnx.Param)
    assert jax.tree.structure(p_default) == jax.tree.structure(p_scaled)
    jax.tree.map(np.testing.assert_array_equal, p_default, p_scaled)
    gain = ffn.unit_variance_gain(name)
    np.testing.assert_allclose(scaled.hidden(x), gain * default.hidden(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "swiglu"])
def test_gradients_carry_the_gain(name):
    d, f = 16, 24
    x = jax.random.normal(jax.random.key(1), (4, 3, d))

    def w2_grad(init):
        m = ffn.build_ffn(name, d, d_ff=f, ffn_init=init, rngs=nnx.Rngs(0))
        grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(m)
        return grads["w2"][...], grads["w1"][...]

    (w2_d, w1_d), (w2_s, w1_s) = w2_grad("default"), w2_grad("unit_variance")
    g = ffn.unit_variance_gain(name)
    # y scales by g, so d(sum y^2)/dw2 = 2 y h^T scales by g^2 and d/dw1 by g^2 too.
    for scaled, default in ((w2_s, w2_d), (w1_s, w1_d)):  # atol: cancellation in sums
        atol = 1e-5 * float(jnp.abs(scaled).max())
        np.testing.assert_allclose(scaled, g**2 * default, rtol=1e-5, atol=atol)


def test_scaled_activation_is_a_stable_static_value():
    a = ffn.hidden_activation("swiglu", "unit_variance")
    b = ffn.hidden_activation("swiglu", "unit_variance")
    assert isinstance(a, ffn.ScaledActivation) and a == b and hash(a) == hash(b)
    m1 = ffn.build_ffn("swiglu", 16, ffn_init="unit_variance", rngs=nnx.Rngs(0))
    m2 = ffn.build_ffn("swiglu", 16, ffn_init="unit_variance", rngs=nnx.Rngs(1))
    assert nnx.graphdef(m1) == nnx.graphdef(m2)  # one jit cache entry for equal modules


# ---- MoE --------------------------------------------------------------------------------


def _moe(variant, init, d=16, f=32, num_shared=0, dispatch="capacity", seed=0):
    cfg: Any = tiny().model
    cfg = cfg.moe
    cfg.num_experts, cfg.num_shared, cfg.dispatch = 4, num_shared, dispatch
    return MoEFFN(d, moe_settings(cfg, f), variant=variant, ffn_init=init, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_moe_experts_get_the_same_gain(name):
    layer = _moe(name, "unit_variance", num_shared=1)
    assert layer.activation == ffn.hidden_activation(name, "unit_variance")
    assert layer.shared is not None and layer.shared.activation == layer.activation
    assert _moe(name, "default").activation is ffn.get_variant(name).activation


@pytest.mark.parametrize("name", ["squared_relu", "swiglu"])
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_moe_output_scales_by_the_gain(name, dispatch):
    """Same router and weights, so the same routing: the experts' output is ``gain`` times
    the default's (no biases, no shared expert: ``y`` is linear in the hidden)."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 16))
    y_d, _ = _moe(name, "default", dispatch=dispatch)(x)
    y_s, _ = _moe(name, "unit_variance", dispatch=dispatch)(x)
    g = ffn.unit_variance_gain(name)
    np.testing.assert_allclose(y_s, g * y_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "squared_relu", "swiglu"])
def test_expert_hidden_has_unit_std(name):
    """The experts' own code path with ``w2`` the identity returns the hidden itself."""
    d = 512
    layer = _moe(name, "unit_variance", d=d, f=d)
    w = {**layer.expert_weights(), "w2": jnp.broadcast_to(jnp.eye(d), (4, d, d))}
    x_ecd = jnp.broadcast_to(_x(d, 512), (4, 512, d))
    h_ecd = dense_experts(x_ecd, w, layer.activation)
    assert float(jnp.std(h_ecd)) == pytest.approx(1.0, rel=0.05)


# ---- the config field -------------------------------------------------------------------


def test_bad_value_is_one_line_naming_field_value_and_choices():
    with pytest.raises(ConfigError) as e:
        from_config(tiny(**{"model.ffn_init": "xavier"}), num_devices=8)
    assert str(e.value) == (
        "model.ffn_init='xavier' is not supported; use one of ['default', 'unit_variance']"
    )
    assert problems(tiny(**{"model.ffn_init": "unit_variance"}), num_devices=8) == []


def test_legacy_config_without_the_field_loads_as_default():
    old = tiny().to_dict()
    del old["model"]["ffn_init"]
    assert from_config(old, num_devices=8).model.ffn_init == "default"
    assert config_diff(old, tiny().to_dict()) == []  # resuming an old run: no change
    new = tiny(**{"model.ffn_init": "unit_variance"}).to_dict()
    assert config_diff(old, new) == ["model.ffn_init: 'default' -> 'unit_variance'"]


def _lm(**overrides) -> LM:
    """The tiny LM from a model block: 2 layers, a dense FFN then a 4-expert MoE; a
    ``ffn_init=None`` override drops the field, as in a config written before it existed."""
    cfg = tiny_model_cfg(n_layers=2).to_dict()
    cfg["moe"].update(num_experts=4, every=2)
    cfg.update(overrides)
    if cfg["ffn_init"] is None:
        del cfg["ffn_init"]
    return LM(model_spec(cfg), rngs=nnx.Rngs(0))


def test_lm_default_is_bit_identical_and_unit_variance_changes_only_the_forward():
    toks = jax.random.randint(jax.random.key(0), (2, 16), 0, 97)
    legacy, default = _lm(ffn_init=None), _lm(ffn_init="default")
    scaled = _lm(ffn_init="unit_variance")
    (l0, _), (l1, _), (l2, _) = legacy(toks), default(toks), scaled(toks)
    np.testing.assert_array_equal(l0, l1)
    assert not np.allclose(l1, l2)
    p1, p2 = nnx.state(default, nnx.Param), nnx.state(scaled, nnx.Param)
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p1)]
    assert any("router" in k for k in paths) and any("w1" in k for k in paths)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_gain_is_computed_when_the_run_state_is_built():
    """A run builds its stacked layers under ``nnx.vmap`` inside the jitted initialiser,
    where ``ensure_compile_time_eval`` does not make values concrete: the first gain computed
    there must still be a float (a sweep's first unit-variance run crashed with a
    TracerArrayConversionError)."""
    eager = ffn.unit_variance_gain("relu")  # jax.nn.relu is a custom_jvp
    ffn.unit_variance_gain.cache_clear()
    programs.clear()
    rs = build_run_state(run_spec(tiny(**{"model.ffn": "relu", "model.ffn_init": "unit_variance"})))
    model, _ = nnx.merge(rs.graphdef, rs.state)
    gains = {
        m.activation.gain
        for _, m in model.iter_modules()
        if isinstance(getattr(m, "activation", None), ffn.ScaledActivation)
    }
    assert gains == {eager}
