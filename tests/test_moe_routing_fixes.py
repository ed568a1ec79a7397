"""MoE fixes of issue 18: exact capacity, top-k on logits, first-choice slot priority,
the ``model.moe.router_bias`` field and expert hidden dropout."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ffn_jax import sharding
from ffn_jax import spec as spec_lib
from ffn_jax.ffn import ffn_cost
from ffn_jax.model import LM, count_params
from ffn_jax.moe import ROUTERS, MoEFFN, capacity, moe_cost
from ffn_jax.moe.dispatch import NO_MESH, capacity_dispatch
from ffn_jax.moe.experts import dense_experts
from ffn_jax.moe.routing import expert_choice_route, top_k_route
from tests.helpers import moe_settings, tiny_model_cfg
from tests.test_moe import D, _mesh, moe_cfg, tokens

# ---- 1. exact capacity ------------------------------------------------------------------


@pytest.mark.parametrize(
    "factor,k,tokens_,experts",
    [(1.1, 1, 110, 11), (1.1, 2, 100, 20), (1.25, 2, 64, 8), (0.3, 1, 10, 3), (1.0, 2, 16, 8),
     (2.2, 1, 5, 11), (0.7, 3, 30, 21), (100.0, 2, 32, 8)],
)  # fmt: skip
def test_capacity_is_exact(factor, k, tokens_, experts):
    exact = math.ceil(Fraction(str(factor)) * k * tokens_ / experts)
    assert capacity(factor, k, tokens_, experts) == max(1, min(tokens_, exact))


def test_capacity_issue_example():
    assert capacity(1.1, 1, 110, 11) == 11


# ---- 2. selection on logits -------------------------------------------------------------


def test_top_k_selects_on_logits_not_underflowed_probs():
    logits = jnp.asarray([[0.0, -200.0, -150.0, -300.0, -120.0, -400.0]], jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(probs[0, 1]) == float(probs[0, 4]) == 0.0  # underflowed: a tie in probs
    expert, weight = top_k_route(probs, 3, renormalize=True, logits_te=logits)
    np.testing.assert_array_equal(expert[0], [0, 4, 2])  # the logit order
    np.testing.assert_array_equal(weight[0], [1.0, 0.0, 0.0])  # probabilities of the chosen
    s = moe_settings(moe_cfg(num_experts=6, top_k=3), 32)
    expert_a, token_a = ROUTERS["topk"].assign(logits, s, 1)
    np.testing.assert_array_equal(expert_a, [0, 4, 2])
    np.testing.assert_array_equal(token_a, [0, 0, 0])


def test_expert_choice_selects_on_log_probs():
    logits = jnp.asarray([[0.0, -200.0], [0.0, -150.0], [0.0, -300.0], [0.0, -120.0]])
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(jnp.max(probs[:, 1])) == 0.0  # expert 1's probabilities all underflow
    token_ec, weight_ec = expert_choice_route(probs, 2, logits)
    np.testing.assert_array_equal(token_ec[1], [3, 1])
    np.testing.assert_array_equal(weight_ec, jnp.take_along_axis(probs.T, token_ec, 1))


def test_layer_routes_on_logits_for_equal_probs():
    """End to end: the layer's capture equals the logit order (top_k on logits)."""
    s = moe_settings(moe_cfg(num_experts=4, top_k=2), 32)
    layer = MoEFFN(D, s, variant="relu", rngs=nnx.Rngs(0))
    layer.router[...] = (
        jnp.zeros_like(layer.router[...]).at[0, :].set(jnp.asarray([0.0, -200.0, -300.0, -150.0]))
    )
    layer.capture = True
    x = jnp.zeros((1, 1, D)).at[0, 0, 0].set(1.0)
    _, aux = layer(x)
    np.testing.assert_array_equal(aux["capture/expert"], [0, 3])


# ---- 3. first-choice slot priority ------------------------------------------------------


def _two_expert_weights(d: int = 4, f: int = 8, e: int = 4) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(3))
    return {
        "w1": jax.random.normal(k1, (e, d, f)),
        "w2": jax.random.normal(k2, (e, f, d)),
    }


def test_first_choices_are_served_before_second_choices():
    """Issue example: E=4, k=2, capacity 1, two one-token sequences preferring experts
    {0, 1} (sequence 0: 0 then 1; sequence 1: 1 then 0). Position-major with each token's
    choices together gave sequence 0 both slots and sequence 1 none; now both first choices
    are served and both second choices dropped."""
    w, act = _two_expert_weights(), jax.nn.relu
    x_td = jax.random.normal(jax.random.key(4), (2, 4))
    expert_tk = jnp.asarray([[0, 1], [1, 0]], jnp.int32)
    weight_tk = jnp.asarray([[0.6, 0.4], [0.7, 0.3]])
    y_td, count_e, dropped, of = capacity_dispatch(
        x_td, expert_tk, weight_tk, w, act, 1, NO_MESH, 1
    )
    assert int(dropped) == 2 and of == 4
    np.testing.assert_array_equal(count_e, [2, 2, 0, 0])  # assignments before drops
    expert_out = dense_experts(jnp.broadcast_to(x_td[None], (4, 2, 4)), w, act)  # (E, t, d)
    np.testing.assert_allclose(y_td[0], 0.6 * expert_out[0, 0], rtol=1e-6)
    np.testing.assert_allclose(y_td[1], 0.7 * expert_out[1, 1], rtol=1e-6)


def test_slot_priority_stays_causal():
    """A token's output never depends on later positions under capacity pressure."""
    cfg = moe_cfg(capacity_factor=0.5, num_experts=4, top_k=2)
    layer = MoEFFN(D, moe_settings(cfg, 32), variant="swiglu", rngs=nnx.Rngs(0))
    x = tokens(batch=3, length=6)
    y, aux = layer(x)
    assert float(aux["dropped_fraction"]) > 0
    x2 = x.at[:, 3:].set(jax.random.normal(jax.random.key(9), x[:, 3:].shape))
    y2, _ = layer(x2)
    np.testing.assert_array_equal(y[:, :3], y2[:, :3])


# ---- 4. model.moe.router_bias ----------------------------------------------------------


def _lm_params(**moe) -> tuple[int, spec_lib.ModelSpec]:
    raw = tiny_model_cfg().to_dict()
    raw["moe"].update(moe)
    m = spec_lib.model_spec(raw)
    model = nnx.eval_shape(lambda: LM(m, rngs=nnx.Rngs(0)))
    return count_params(model), m


@pytest.mark.parametrize("router_bias", [False, True])
def test_router_bias_reaches_model_and_is_counted(router_bias):
    dense, dm = _lm_params(num_experts=0)
    total, m = _lm_params(num_experts=4, router_bias=router_bias)
    assert m.moe is not None and m.moe.router_bias is router_bias
    n_moe = m.ffn_kinds.count("moe")
    per_layer = moe_cost(m.moe, m.ffn, m.d_model, m.ffn_bias)["total_params"]
    dense_ffn = ffn_cost(dm.ffn, dm.d_model, dm.d_ff, dm.ffn_bias)["params"]
    assert total == dense + n_moe * (per_layer - dense_ffn)
    from ffn_jax.report import param_counts

    assert param_counts(m)["params_total"] == total


def test_router_bias_legacy_default_and_validation():
    assert spec_lib.LEGACY_DEFAULTS["model.moe.router_bias"] is False
    up = spec_lib.upgrade({"model": {"moe": {"num_experts": 4}}})
    assert up["model"]["moe"]["router_bias"] is False
    raw = tiny_model_cfg().to_dict()
    raw["moe"].update(num_experts=4, router_bias="yes")
    with pytest.raises(spec_lib.ConfigError, match="model.moe.router_bias='yes' must be"):
        spec_lib.model_spec(raw)


# ---- 5. expert hidden dropout ----------------------------------------------------------

DROP_CASES = [
    ("topk", "capacity", "ragged"),
    ("topk", "dropless", "loop"),
    ("topk", "dropless", "ragged"),
    ("expert_choice", "capacity", "ragged"),
]


def _drop_layer(router, dispatch, impl, rate, key=0, shared=0):
    cfg = moe_cfg(router=router, dispatch=dispatch, dropless_impl=impl, num_shared=shared)
    s = dataclasses.replace(moe_settings(cfg, 32), dropout=rate)
    return MoEFFN(D, s, variant="swiglu", rngs=nnx.Rngs(params=0, dropout=key))


@nnx.jit
def _apply(layer, x):
    return layer(x)[0]


@pytest.mark.parametrize("router,dispatch,impl", DROP_CASES)
def test_expert_dropout_train_and_eval(router, dispatch, impl):
    x = tokens()
    base = _drop_layer(router, dispatch, impl, 0.0)
    y0 = _apply(base, x)
    a, b = (_drop_layer(router, dispatch, impl, 0.3, key=k) for k in (1, 2))
    ya, yb = _apply(a, x), _apply(b, x)
    assert not np.allclose(ya, y0) and not np.allclose(ya, yb)
    assert not np.allclose(ya, _apply(a, x))  # a fresh mask every call
    base.eval()
    a.eval()
    np.testing.assert_array_equal(_apply(a, x), _apply(base, x))  # deterministic in eval


def test_shared_expert_gets_dropout_too():
    layer = _drop_layer("topk", "capacity", "ragged", 0.3, shared=1)
    assert layer.shared is not None and layer.shared.dropout is not None


def test_spec_passes_model_dropout_to_experts():
    raw = tiny_model_cfg(dropout=0.2).to_dict()
    raw["moe"]["num_experts"] = 4
    m = spec_lib.model_spec(raw)
    assert m.moe is not None and m.moe.dropout == 0.2


def test_expert_dropout_runs_sharded():
    """Inside the shard_map the key is passed in and folded per shard: runs on a (2, 4)
    mesh, differs from dropout 0 in training and equals it in evaluation."""
    mesh = _mesh(2, 4)
    x = tokens(batch=8, length=4)
    with sharding.axis_rules(sharding.DEFAULT_RULES), jax.set_mesh(mesh):
        for dispatch, impl in (("capacity", "ragged"), ("dropless", "loop")):
            a, base = (
                sharding.create_sharded(
                    lambda r=r, d=dispatch, i=impl: _drop_layer("topk", d, i, r, key=1),
                    mesh,
                    sharding.DEFAULT_RULES,
                )
                for r in (0.3, 0.0)
            )
            ya, y0 = _apply(a, x), _apply(base, x)
            assert bool(jnp.all(jnp.isfinite(ya))) and not np.allclose(ya, y0)
            a.eval()
            base.eval()
            np.testing.assert_array_equal(_apply(a, x), _apply(base, x))
