"""The debugging routing modes (``model.moe.routing = balanced | random``, issue 18): forced
selections with the router's scores as weights, against written-out references, sharded
and not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ffn_jax.moe import MoEFFN
from ffn_jax.moe.routing import forced_selection
from tests.helpers import moe_settings
from tests.test_moe import D_FF, D, moe_cfg, moe_problems, tokens
from tests.test_moe_balance import apply, check_against, reference, run_on

E, K = 8, 2


def routed_layer(routing: str, router: str = "topk", dispatch: str = "capacity") -> MoEFFN:
    """An 8-expert top-2 swiglu layer with forced ``routing`` and no drops."""
    cfg = moe_cfg(
        router=router,
        routing=routing,
        dispatch=dispatch,
        dropless_impl="loop",
        capacity_factor=100.0,
        balance="none",
    )
    return MoEFFN(D, moe_settings(cfg, D_FF), variant="swiglu", rngs=nnx.Rngs(0))


def balanced_choice(tokens: int) -> np.ndarray:
    """Written out: token ``i`` takes experts ``i*k``, ``i*k+1`` (mod E), in that order."""
    return np.array([[(i * K + j) % E for j in range(K)] for i in range(tokens)])


def test_forced_selection_ranks():
    bal = np.asarray(forced_selection("balanced", 5, E, K))
    assert bal.shape == (5, E)
    np.testing.assert_array_equal(np.argsort(-bal, axis=-1)[:, :K], balanced_choice(5))
    rnd = np.asarray(forced_selection("random", 64, E, K, jax.random.key(3)))
    # Every row a permutation of 0, 2, ..., 2(E-1): gaps of 2 beat any score in [0, 1].
    np.testing.assert_array_equal(np.sort(rnd, -1), np.tile(2.0 * np.arange(E), (64, 1)))
    again = np.asarray(forced_selection("random", 64, E, K, jax.random.key(3)))
    other = np.asarray(forced_selection("random", 64, E, K, jax.random.key(4)))
    np.testing.assert_array_equal(rnd, again)
    assert not np.array_equal(rnd, other)
    with pytest.raises(ValueError, match="routing='learned'"):
        forced_selection("learned", 4, E, K)


@pytest.mark.parametrize(
    "router,dispatch,mesh_shape",
    [
        ("topk", "capacity", None),
        ("sigmoid_topk", "dropless", None),
        ("topk", "capacity", (2, 4)),
        ("sigmoid_topk", "capacity", (1, 8)),
    ],
    ids=["softmax-capacity", "sigmoid-dropless", "softmax-2x4", "sigmoid-1x8"],
)
def test_balanced_routing_is_the_written_out_pattern(router, dispatch, mesh_shape):
    """Balanced routing = the reference layer with the written-out pattern as choices and the
    router's scores as weights; loads exactly even (MaxVio 0). On a mesh each shard's
    tokens follow the pattern from 0; here every shard holds 4 tokens x 2 choices = E
    assignments, so that is the unsharded pattern and the outputs agree."""
    x = tokens(batch=8, length=4)
    layer, y, aux = run_on(mesh_shape, lambda: routed_layer("balanced", router, dispatch), x)
    t = x.shape[0] * x.shape[1]
    pattern = balanced_choice(t)
    # The reference's selection on "scores + offset" with the offset written out.
    offset = np.full((t, E), -1e9)
    np.put_along_axis(offset, pattern, np.array([[0.0, -2.0]]), axis=-1)
    ref = reference(layer, x, offset)
    np.testing.assert_array_equal(ref.choice, pattern)
    check_against(layer, x, y, aux, ref)
    np.testing.assert_array_equal(np.asarray(aux["expert_fraction"]), np.full(E, 1 / E))
    assert float(aux["max_violation"]) == 0.0


def _choices(layer: MoEFFN, x: jax.Array) -> np.ndarray:
    """The (token, expert) assignment matrix of one call, through ``capture``."""
    layer.capture = True
    _, aux = apply(layer, x)
    layer.capture = False
    hit = np.zeros((x.shape[0] * x.shape[1], E), int)
    np.add.at(hit, (np.asarray(aux["capture/token"]), np.asarray(aux["capture/expert"])), 1)
    return hit


def test_random_routing_draws_fresh_distinct_uniform_choices():
    layer = routed_layer("random")
    x = tokens(batch=16, length=32)
    first, second = _choices(layer, x), _choices(layer, x)
    assert first.max() == 1 and (first.sum(-1) == K).all()  # k distinct experts per token
    assert not np.array_equal(first, second)  # a fresh draw per training call
    # Independent of the inputs: the same draw whatever the logits say.
    x_other = tokens(batch=16, length=32, seed=7)
    same_key = routed_layer("random")
    np.testing.assert_array_equal(_choices(same_key, x_other), first)
    # Uniform: 512 tokens x 2 choices over 8 experts, 128 expected each (binomial SD ~10.6).
    load = first.sum(0)
    assert np.all(np.abs(load - 128) < 50), load
    # The combine weights are still the router's (the forced choice's scores): the output
    # is the reference with those choices.
    y, _ = apply(routed_layer("random"), x)
    offset = np.where(first > 0, 0.0, -1e9)
    np.testing.assert_allclose(y, reference(layer, x, offset).y, atol=2e-5, rtol=1e-4)


def test_random_routing_is_fixed_in_evaluation():
    layer = routed_layer("random")
    layer.eval()
    x = tokens(batch=4, length=8)
    a, b = apply(layer, x)[0], apply(layer, x)[0]
    np.testing.assert_array_equal(a, b)
    layer.train()
    c, d = apply(layer, x)[0], apply(layer, x)[0]
    assert not np.array_equal(np.asarray(c), np.asarray(d))


def test_random_routing_on_a_mesh_keeps_every_token_routed():
    """(2, 4): shards fold the key with their batch index; every token still gets k distinct
    experts and the loads are those of the choices."""
    x = tokens(batch=8, length=4)
    _, _, aux = run_on((2, 4), lambda: routed_layer("random"), x)
    fraction = np.asarray(aux["expert_fraction"])
    np.testing.assert_allclose(fraction.sum(), 1.0, rtol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0
    assert jnp.isfinite(aux["lb_loss"])


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(routing="roundrobin"), "model.moe.routing='roundrobin' is not supported"),
        (
            dict(router="expert_choice", routing="balanced", balance="none"),
            "model.moe.routing='balanced' does not apply to router='expert_choice'",
        ),
        (
            dict(routing="random", balance="loss_free"),
            "model.moe.routing='random' forces the selection",
        ),
    ],
)
def test_bad_routing_config_is_one_clear_line(overrides, field):
    (problem,) = moe_problems(**overrides)
    assert problem.startswith(field) and "\n" not in problem


def test_good_routing_configs():
    for overrides in (
        dict(routing="balanced"),
        dict(routing="random", router="sigmoid_topk", dispatch="dropless"),
        dict(routing="learned", router="expert_choice", balance="none"),
    ):
        assert moe_problems(**overrides) == [], overrides
