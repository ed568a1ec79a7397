"""The FFN registry: every variant against a plain jnp formula, gradients, matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ffn_jax import ffn

VARIANTS = sorted(ffn.VARIANTS)

# The formulas written out independently of the registry.
REFERENCE_ACT = {
    "relu": lambda x: jnp.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + jax.scipy.special.erf(x / jnp.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x**3))),
    "swish": lambda x: x / (1 + jnp.exp(-x)),
    "silu": lambda x: x / (1 + jnp.exp(-x)),
    "squared_relu": lambda x: jnp.maximum(x, 0) ** 2,
    "glu": lambda x: 1 / (1 + jnp.exp(-x)),
    "bilinear": lambda x: x,
    "reglu": lambda x: jnp.maximum(x, 0),
    "geglu": lambda x: 0.5 * x * (1 + jax.scipy.special.erf(x / jnp.sqrt(2.0))),
    "geglu_tanh": lambda x: 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x**3))),
    "swiglu": lambda x: x / (1 + jnp.exp(-x)),
}
GATED = {"glu", "bilinear", "reglu", "geglu", "geglu_tanh", "swiglu"}


def test_reference_table_covers_registry():
    assert set(REFERENCE_ACT) == set(ffn.VARIANTS)
    assert {n for n, v in ffn.VARIANTS.items() if v.gated} == GATED


def _randomize(module, seed=1):
    """Replace every parameter (biases included) by random values."""
    state = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(
        module,
        jax.tree.unflatten(
            tree, [jax.random.normal(k, x.shape) * 0.5 for k, x in zip(keys, leaves, strict=True)]
        ),
    )


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("bias", [False, True])
def test_variant_equals_formula(name, bias):
    d = 16
    m = ffn.build_ffn(name, d, d_ff=24, use_bias=bias, rngs=nnx.Rngs(0))
    _randomize(m)
    x = jax.random.normal(jax.random.key(2), (3, 5, d))
    w1, w2 = m.w1[...], m.w2[...]
    b1 = m.b1[...] if bias else 0.0
    b2 = m.b2[...] if bias else 0.0
    h = REFERENCE_ACT[name](x @ w1 + b1)
    if name in GATED:
        h = h * (x @ m.w3[...] + (m.b3[...] if bias else 0.0))
    expected = h @ w2 + b2
    np.testing.assert_allclose(m(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_names_and_layout(name):
    m = ffn.build_ffn(name, 32, d_ff=48, use_bias=True, rngs=nnx.Rngs(0))
    params = nnx.state(m, nnx.Param).to_pure_dict()
    expected = {"w1": (32, 48), "w2": (48, 32), "b1": (48,), "b2": (32,)}
    if name in GATED:
        expected |= {"w3": (32, 48), "b3": (48,)}
    assert {k: v.shape for k, v in params.items()} == expected
    no_bias = ffn.build_ffn(name, 32, d_ff=48, rngs=nnx.Rngs(0))
    assert not {"b1", "b2", "b3"} & set(nnx.state(no_bias, nnx.Param).to_pure_dict())


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_reach_every_parameter(name):
    m = ffn.build_ffn(name, 16, use_bias=True, rngs=nnx.Rngs(0))
    _randomize(m)
    x = jax.random.normal(jax.random.key(3), (4, 16))
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, f"{name}: zero gradient at {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("name", sorted(GATED))
def test_gradients_equal_the_reference_formula(name):
    """The fast path (one x @ [w1|w3] matmul on flattened tokens, the custom-VJP gated
    activation) has the gradients of the plain formula, for every parameter and the input."""
    m = ffn.build_ffn(name, 16, d_ff=24, use_bias=True, rngs=nnx.Rngs(0))
    _randomize(m)
    x = jax.random.normal(jax.random.key(4), (3, 5, 16))

    def reference(p, x):
        h = REFERENCE_ACT[name](x @ p["w1"] + p["b1"]) * (x @ p["w3"] + p["b3"])
        return jnp.sum(jnp.sin(h @ p["w2"] + p["b2"]))

    params = nnx.state(m, nnx.Param)
    graphdef = nnx.graphdef(m)
    got = jax.grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x))), (0, 1))(params, x)
    want = jax.grad(reference, (0, 1))(params.to_pure_dict(), x)

    def close(a, b, name):  # float32 round-off relative to the largest entry
        np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()), err_msg=name
        )

    for k, g in got[0].to_pure_dict().items():
        close(g, want[0][k], k)
    close(got[1], want[1], "x")


@pytest.mark.parametrize("d_model", [128, 512, 768])
def test_parameter_counts_match_across_variants(d_model):
    counts = {}
    for name in VARIANTS:
        m = ffn.build_ffn(name, d_model, rngs=nnx.Rngs(0))
        counts[name] = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
        assert counts[name] == ffn.ffn_cost(name, d_model, m.w1.shape[1])["params"]
    base = counts["relu"]
    for name, n in counts.items():
        assert abs(n / base - 1) < 0.02, (name, n, base)


def test_matched_width_rule():
    assert ffn.matched_d_ff("relu", 512) == 2048
    assert ffn.matched_d_ff("swiglu", 512) == 1368  # 2/3 * 2048 = 1365.3 -> nearest 8
    assert ffn.matched_d_ff("swiglu", 512, multiple_of=256) == 1280
    assert ffn.matched_d_ff("gelu", 100, multiplier=2, multiple_of=64) == 192


def test_cost_flops_are_twice_matmul_params_plus_elementwise():
    c = ffn.ffn_cost("swiglu", 64, 100)
    assert c["params"] == 3 * 64 * 100
    assert c["flops_per_token"] == 2 * 3 * 64 * 100 + 2 * 100
    cb = ffn.ffn_cost("relu", 64, 100, use_bias=True)
    assert cb["params"] == 2 * 64 * 100 + 100 + 64


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype):
    m = ffn.build_ffn("geglu", 32, dtype=dtype, rngs=nnx.Rngs(0))
    y = m(jnp.ones((2, 7, 32)))
    assert y.shape == (2, 7, 32) and y.dtype == dtype
    assert m.w1[...].dtype == jnp.float32  # params stay float32


def test_dropout_only_in_training():
    m = ffn.build_ffn("relu", 16, dropout=0.5, rngs=nnx.Rngs(0))
    x = jnp.ones((8, 16))
    m.eval()
    np.testing.assert_array_equal(m(x), m(x))
    m.train()
    assert not np.allclose(m(x), m(x))


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown FFN variant 'swishglu'.*valid variants: relu"):
        ffn.build_ffn("swishglu", 16, rngs=nnx.Rngs(0))
