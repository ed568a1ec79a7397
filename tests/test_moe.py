"""MoE FFN: routing, dispatch paths and expert parallelism against plain references."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from configs.base import get_config
from ffn_jax import sharding
from ffn_jax.ffn import VARIANTS, get_variant
from ffn_jax.moe import MoEFFN, MoESettings, capacity, moe_aux_loss, moe_cost
from ffn_jax.moe.routing import expert_choice_route
from ffn_jax.spec import problems
from tests.helpers import moe_settings

D, D_FF = 16, 32


def moe_cfg(**overrides) -> ConfigDict:
    cfg = get_config("swiglu,size=tiny").model.moe
    cfg.num_experts = 8
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def settings(cfg: ConfigDict, d_ff: int = D_FF) -> MoESettings:
    return moe_settings(cfg, d_ff)


def make_layer(cfg, variant="swiglu", use_bias=False, seed=0) -> MoEFFN:
    layer = MoEFFN(D, settings(cfg), variant=variant, use_bias=use_bias, rngs=nnx.Rngs(seed))
    if use_bias:  # non-zero biases so that they are really tested
        for name in ("b1", "b3", "b2"):
            b = getattr(layer, name)
            if b is not None:
                b[...] = 0.1 * jax.random.normal(jax.random.key(len(name) + ord(name[1])), b.shape)
    return layer


def tokens(batch=2, length=8, seed=1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, length, D))


@nnx.jit
def apply(layer: MoEFFN, x: jax.Array):
    return layer(x)


# ---- plain references -------------------------------------------------------------------


def ref_expert(layer: MoEFFN, e: int, x_d: np.ndarray) -> np.ndarray:
    """One expert on one token, written out like the dense FFN formula."""
    w = {k: np.asarray(v)[e] for k, v in layer.expert_weights().items()}
    act = get_variant(layer.variant.name).activation
    h = np.asarray(act(x_d @ w["w1"] + w.get("b1", 0.0)))
    if "w3" in w:
        h = h * (x_d @ w["w3"] + w.get("b3", 0.0))
    return h @ w["w2"] + w.get("b2", 0.0)


def ref_probs(layer: MoEFFN, x_td: np.ndarray) -> np.ndarray:
    logits = x_td @ np.asarray(layer.router[...])
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def ref_token_choice(layer: MoEFFN, x_btd, cap: int | None):
    """Loop reference: (position, rank, batch) priority (at position ``j`` every sequence's
    first choice, then every second choice, ..., before ``j+1``), first come first served
    up to ``cap``."""
    x = np.asarray(x_btd).reshape(-1, D)
    k, renorm = layer.settings.top_k, layer.settings.renormalize
    probs = ref_probs(layer, x)
    choice = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weight = np.take_along_axis(probs, choice, -1)
    if renorm and k > 1:
        weight = weight / weight.sum(-1, keepdims=True)
    y, used, dropped = np.zeros_like(x), [0] * layer.settings.num_experts, 0
    batch, length = np.shape(x_btd)[:2]
    order = [(b * length + j, r) for j in range(length) for r in range(k) for b in range(batch)]
    for t, rank in order:
        e = choice[t, rank]
        if cap is not None and used[e] >= cap:
            dropped += 1
            continue
        used[e] += 1
        y[t] += weight[t, rank] * ref_expert(layer, e, x[t])
    return y.reshape(np.shape(x_btd)), dropped / (k * x.shape[0])


def per_token_top2(layer: MoEFFN, x_btd):
    """Route each token, pick its two best experts, weighted sum of their outputs."""
    out = []
    for x_d in np.asarray(x_btd).reshape(-1, D):
        p = ref_probs(layer, x_d[None])[0]
        best = np.argsort(-p)[:2]
        w = p[best] / p[best].sum()
        out.append(sum(wi * ref_expert(layer, e, x_d) for wi, e in zip(w, best, strict=True)))
    return np.stack(out).reshape(np.shape(x_btd))


# ---- dispatch paths vs references -------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_capacity_drops_match_loop(variant):
    layer = make_layer(moe_cfg(capacity_factor=0.5), variant, use_bias=variant == "swiglu")
    x = tokens()
    y, aux = apply(layer, x)
    cap = capacity(0.5, 2, 16, 8)
    want, dropped = ref_token_choice(layer, x, cap)
    assert dropped > 0
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(aux["dropped_fraction"], dropped, rtol=1e-6)


@pytest.mark.parametrize("impl", ["ragged", "loop"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_dropless_matches_loop(impl, use_bias):
    layer = make_layer(moe_cfg(dispatch="dropless", dropless_impl=impl), use_bias=use_bias)
    x = tokens(batch=4, length=16)
    y, aux = apply(layer, x)
    want, _ = ref_token_choice(layer, x, None)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-4)
    assert float(aux["dropped_fraction"]) == 0.0


@pytest.mark.parametrize(
    "cfg",
    [
        dict(capacity_factor=0.5),  # top-2 with drops: the case a k-major priority breaks
        dict(capacity_factor=0.5, top_k=1),
        dict(dispatch="dropless"),
    ],
    ids=["capacity-top2", "capacity-top1", "dropless"],
)
def test_token_choice_is_causal(cfg):
    """Outputs at positions < 8 do not depend on inputs at positions >= 8, in any sequence of
    the batch, even when capacity drops tokens."""
    layer = make_layer(moe_cfg(**cfg))
    for seed in range(4):
        x = tokens(batch=2, length=16, seed=seed)
        future = tokens(batch=2, length=16, seed=seed + 100)
        y, aux = apply(layer, x)
        y2, _ = apply(layer, x.at[:, 8:].set(future[:, 8:]))
        np.testing.assert_array_equal(y[:, :8], y2[:, :8])
        assert cfg.get("dispatch") == "dropless" or float(aux["dropped_fraction"]) > 0


def test_top2_without_capacity_limit_is_per_token_routing():
    layer = make_layer(moe_cfg(capacity_factor=100.0))
    y, aux = apply(layer, tokens())
    np.testing.assert_allclose(y, per_token_top2(layer, tokens()), atol=2e-5, rtol=1e-4)
    assert float(aux["dropped_fraction"]) == 0.0


def test_expert_choice_fills_every_expert_exactly():
    layer = make_layer(moe_cfg(router="expert_choice", capacity_factor=1.0))
    x = tokens()
    y, aux = apply(layer, x)
    x_td = np.asarray(x).reshape(-1, D)
    probs = ref_probs(layer, x_td)
    cap = capacity(1.0, 2, 16, 8)
    token_ec, _ = expert_choice_route(jnp.asarray(probs), cap)
    assert token_ec.shape == (8, cap)
    assert all(len(set(np.asarray(row).tolist())) == cap for row in token_ec)
    want, picked = np.zeros_like(x_td), set()
    for e in range(8):
        for t in np.argsort(-probs[:, e], kind="stable")[:cap]:
            want[t] += probs[t, e] * ref_expert(layer, e, x_td[t])
            picked.add(int(t))
    np.testing.assert_allclose(y.reshape(-1, D), want, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(aux["expert_fraction"], np.full(8, 1 / 8, np.float32))
    np.testing.assert_allclose(aux["dropped_fraction"], 1 - len(picked) / 16, rtol=1e-6)


def test_granularity_and_shared_experts():
    cfg = moe_cfg(
        num_experts=2,
        top_k=1,
        granularity=2,
        num_shared=1,
        dispatch="dropless",
        dropless_impl="loop",
    )
    layer = make_layer(cfg)
    s = layer.settings
    assert (s.num_experts, s.top_k, s.expert_width, s.shared_width) == (4, 2, 16, 16)
    assert layer.w1.shape == (4, D, 16) and layer.w2.shape == (4, 16, D)
    assert layer.shared.w1.shape == (D, 16)
    x = tokens()
    y, _ = apply(layer, x)
    routed, _ = ref_token_choice(layer, x, None)
    np.testing.assert_allclose(y, routed + np.asarray(layer.shared(x)), atol=2e-5, rtol=1e-4)


def test_init_scales():
    """Router and expert inputs std 1/sqrt(d_model); expert and shared outputs std
    out_scale/sqrt(width), as the dense FFN's (a router at std 1 starts collapsed)."""
    d, out_scale = 256, 0.25
    cfg = moe_cfg(num_shared=1)
    layer = MoEFFN(d, settings(cfg, 512), variant="swiglu", out_scale=out_scale, rngs=nnx.Rngs(0))
    f = layer.settings.expert_width
    std = {name: float(jnp.std(getattr(layer, name)[...])) for name in ("router", "w1", "w2")}
    assert std["router"] == pytest.approx(d**-0.5, rel=0.05)
    assert std["w1"] == pytest.approx(d**-0.5, rel=0.05)
    assert std["w2"] == pytest.approx(out_scale / math.sqrt(f), rel=0.05)
    shared_w2 = layer.shared.w2[...]
    assert float(jnp.std(shared_w2)) == pytest.approx(
        out_scale / math.sqrt(shared_w2.shape[0]), rel=0.05
    )


# ---- losses, metrics, gradients, modes -------------------------------------------------


def test_aux_losses_by_hand():
    # 4 tokens, 4 experts, top-1; x_t = one-hot so the logits are the router's rows.
    layer = MoEFFN(
        4,
        settings(moe_cfg(num_experts=4, top_k=1, capacity_factor=0.5), 8),
        variant="relu",
        rngs=nnx.Rngs(0),
    )
    logits = np.array([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [3.0, 0, 0, 1], [0, 0, 0.5, 0]])
    layer.router[...] = jnp.asarray(logits)
    _, aux = apply(layer, jnp.eye(4)[None])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    f = np.array([2, 1, 1, 0]) / 4  # top choices: 0, 1, 0, 2
    np.testing.assert_allclose(aux["expert_fraction"], f)
    np.testing.assert_allclose(aux["lb_loss"], 4 * np.sum(f * p.mean(0)), rtol=1e-6)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(aux["z_loss"], np.mean(lse**2), rtol=1e-6)
    np.testing.assert_allclose(aux["router_entropy"], np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-6)
    # capacity ceil(0.5 * 1 * 4 / 4) = 1: expert 0 keeps token 0 and drops token 2
    np.testing.assert_allclose(aux["dropped_fraction"], 0.25)
    stacked = {k: jnp.stack([v, 3 * v]) for k, v in aux.items()}
    cfg = moe_cfg()
    want = cfg.lb_loss_coef * 2 * aux["lb_loss"] + cfg.z_loss_coef * 2 * aux["z_loss"]
    np.testing.assert_allclose(moe_aux_loss(stacked, settings(cfg)), want, rtol=1e-6)


def test_balanced_lb_loss_is_one():
    layer = make_layer(moe_cfg(num_experts=4, top_k=2))
    layer.router[...] = jnp.zeros_like(layer.router[...])  # uniform probabilities
    _, aux = apply(layer, tokens())
    np.testing.assert_allclose(aux["lb_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["router_entropy"], math.log(4), rtol=1e-6)


def test_switch_top1_router_gets_task_gradient():
    layer = make_layer(moe_cfg(top_k=1, capacity_factor=2.0))
    x = tokens()
    target = jax.random.normal(jax.random.key(7), x.shape)

    def task_loss(layer):
        y, _ = layer(x)
        return jnp.sum((y - target) ** 2)

    grads = nnx.grad(task_loss)(layer)
    assert float(jnp.abs(grads["router"][...]).max()) > 1e-4


def test_eval_mode_switches_capacity_and_jitter():
    layer = make_layer(moe_cfg(capacity_factor=0.25, eval_capacity_factor=100.0, jitter=0.1))
    x = tokens()
    (y1, aux1), (y2, _) = apply(layer, x), apply(layer, x)
    assert float(aux1["dropped_fraction"]) > 0
    assert not np.allclose(y1, y2)  # jitter noise differs between training calls
    layer.eval()
    assert layer.deterministic
    (y3, aux3), (y4, _) = apply(layer, x), apply(layer, x)
    assert float(aux3["dropped_fraction"]) == 0.0
    np.testing.assert_array_equal(y3, y4)
    np.testing.assert_allclose(y3, per_token_top2(layer, x), atol=2e-5, rtol=1e-4)
    layer.train()
    assert not layer.deterministic


def test_scanned_layers_stack_aux():
    cfg = moe_cfg(jitter=0.01)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def create(rngs):
        return MoEFFN(D, settings(cfg), variant="swiglu", rngs=rngs)

    layers = create(nnx.Rngs(0))
    assert layers.w1.shape == (3, 8, D, D_FF)

    @nnx.jit
    def forward(layers, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def body(x, layer):
            y, aux = layer(x)
            return x + y, aux

        return body(x, layers)

    x, aux = forward(layers, tokens())
    assert x.shape == (2, 8, D) and aux["expert_fraction"].shape == (3, 8)
    assert aux["lb_loss"].shape == (3,) and moe_aux_loss(aux, settings(cfg)).shape == ()


# ---- expert parallelism ----------------------------------------------------------------


def _loss(layer, x, r):
    y, aux = layer(x)
    return jnp.sum(y * r) + aux["lb_loss"] + aux["z_loss"], aux


def _value_and_grads(layer, x, r):
    graphdef, state = nnx.split(layer)

    @jax.jit
    def step(state, x, r):
        return jax.value_and_grad(lambda s: _loss(nnx.merge(graphdef, s), x, r), has_aux=True)(
            state
        )

    return step(state, x, r)


SHARDED_CASES = [  # (dispatch, dropless_impl, (data, expert, tensor))
    ("capacity", "ragged", (1, 8, 1)),
    ("capacity", "ragged", (2, 4, 1)),
    ("capacity", "ragged", (8, 1, 1)),
    ("dropless", "loop", (1, 8, 1)),
    ("dropless", "loop", (2, 4, 1)),
    ("dropless", "loop", (8, 1, 1)),
    ("dropless", "ragged", (2, 4, 1)),
    # Tensor-parallel experts: the hidden dimension split over "tensor", with and without
    # expert parallelism beside it.
    ("capacity", "ragged", (2, 2, 2)),
    ("capacity", "ragged", (4, 1, 2)),
    ("dropless", "loop", (2, 2, 2)),
    ("dropless", "ragged", (1, 2, 4)),
    # The ragged exchange (emulated on CPU: ffn_jax/moe/exchange.py).
    ("dropless-ragged_exchange", "loop", (2, 4, 1)),
    ("dropless-ragged_exchange", "ragged", (1, 8, 1)),
    ("dropless-ragged_exchange", "loop", (1, 4, 2)),
]


def _mesh(data: int, expert: int, tensor: int = 1) -> jax.sharding.Mesh:
    return sharding.make_mesh(dict(data=data, fsdp=1, expert=expert, tensor=tensor))


@functools.cache
def _unsharded_reference(dispatch: str, impl: str):
    cfg = moe_cfg(dispatch=dispatch, dropless_impl=impl, capacity_factor=100.0)
    layer = make_layer(cfg, use_bias=True)
    return layer, _value_and_grads(layer, *_sharded_inputs())


def _sharded_inputs():
    return tokens(batch=8, length=4), tokens(batch=8, length=4, seed=2)


@pytest.mark.parametrize(
    "dispatch,impl,mesh_shape",
    SHARDED_CASES,
    ids=[f"{a}-{b}-{'x'.join(map(str, m))}" for a, b, m in SHARDED_CASES],
)
def test_sharded_matches_unsharded(dispatch, impl, mesh_shape):
    dispatch, _, exchange = dispatch.partition("-")
    layer, ((ref_loss, ref_aux), ref_grads) = _unsharded_reference(dispatch, impl)
    mesh, rules = _mesh(*mesh_shape), sharding.DEFAULT_RULES
    graphdef, state = nnx.split(layer)
    if exchange:  # the same layer with another exchange (a static setting)
        cfg = moe_cfg(dispatch=dispatch, dropless_impl=impl, capacity_factor=100.0)
        cfg.exchange = exchange.removesuffix("_exchange")
        graphdef = nnx.split(make_layer(cfg, use_bias=True))[0]
    with sharding.axis_rules(rules), jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
        assert state["w1"][...].sharding.spec[0] == "expert"
        x, r = _sharded_inputs()
        x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
        (loss, aux), grads = _value_and_grads(nnx.merge(graphdef, state), x, r)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for key in aux:
        np.testing.assert_allclose(aux[key], ref_aux[key], rtol=1e-5, atol=1e-7)
    ref_flat = dict(nnx.to_flat_state(ref_grads))
    for path, g in nnx.to_flat_state(grads):
        np.testing.assert_allclose(
            g[...], ref_flat[path][...], rtol=1e-4, atol=1e-6, err_msg=str(path)
        )


def test_expert_choice_runs_sharded():
    cfg = moe_cfg(router="expert_choice")
    mesh = _mesh(2, 4)
    with sharding.axis_rules(sharding.DEFAULT_RULES), jax.set_mesh(mesh):
        layer = sharding.create_sharded(lambda: make_layer(cfg), mesh, sharding.DEFAULT_RULES)
        y, aux = apply(layer, tokens(batch=8, length=4))
    assert y.shape == (8, 4, D) and bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(aux["expert_fraction"], np.full(8, 1 / 8))


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(top_k=9), "model.moe.top_k=9"),
        (dict(capacity_factor=0.0), "model.moe.capacity_factor=0.0"),
        (dict(eval_capacity_factor=-1.0), "model.moe.eval_capacity_factor=-1.0"),
        (dict(dispatch="ragged"), "model.moe.dispatch='ragged'"),
        (dict(dropless_impl="megablox"), "model.moe.dropless_impl='megablox'"),
        (dict(router="expert_choice", dispatch="dropless"), "model.moe.dispatch='dropless'"),
        (dict(granularity=256), "model.moe.granularity=256"),  # d_ff 168 / 256 = 0
    ],
)
def test_bad_config_is_one_clear_line(overrides, field):
    (problem,) = moe_problems(**overrides)
    assert problem.startswith(field) and "\n" not in problem


def moe_problems(mesh: dict | None = None, **overrides) -> list[str]:
    """Every problem of the tiny config (d_model 64, 2 layers) with 8 experts and
    ``overrides``, on 8 devices of mesh ``mesh``."""
    c = get_config("swiglu,size=tiny")
    c.model.moe.num_experts = 8
    c.model.moe.update(overrides)
    if mesh:
        c.mesh.shape.update(mesh)
    return problems(c, num_devices=8)


def test_validate_mesh_and_layers():
    assert moe_problems(num_experts=0, top_k=5) == []
    assert moe_problems(dict(data=2, expert=4)) == []
    (problem,) = moe_problems(dict(data=2, expert=4), num_experts=6)
    assert (
        "num_experts*granularity=6" in problem
        and "4-way sharding of logical axis 'expert'" in problem
    )
    (problem,) = moe_problems(every=3)
    assert problem.startswith("model.moe.every=3")


def test_experts_not_divisible_by_expert_axis_raises():
    cfg = moe_cfg(num_experts=4)
    mesh = _mesh(1, 8)
    layer = make_layer(cfg)
    with (
        sharding.axis_rules(sharding.DEFAULT_RULES),
        jax.set_mesh(mesh),
        pytest.raises(ValueError, match="num_experts\\*granularity=4 is not divisible"),
    ):
        apply(layer, tokens(batch=8, length=4))


def test_expert_width_not_divisible_by_tensor_axis_raises():
    layer = MoEFFN(D, settings(moe_cfg(), d_ff=12), variant="swiglu", rngs=nnx.Rngs(0))
    with (
        sharding.axis_rules(sharding.DEFAULT_RULES),
        jax.set_mesh(_mesh(1, 1, 8)),
        pytest.raises(ValueError, match="expert width 12 is not divisible by the 8-way tensor"),
    ):
        apply(layer, tokens(batch=8, length=4))


def test_moe_cost_by_hand():
    cfg = moe_cfg(num_experts=4, top_k=1, granularity=2, num_shared=1, capacity_factor=1.5)
    c = moe_cost(settings(cfg, 16), "relu", 8)  # E=8 experts of width 8, k=2, shared width 8
    expert, router = 2 * 8 * 8, 8 * 8
    assert c["total_params"] == 8 * expert + router + expert
    assert c["active_params"] == 2 * expert + router + expert
    flops = 2 * expert + 8
    assert c["flops_per_token"] == 2 * flops + 2 * router + flops
    assert c["compute_flops_per_token"] == int(1.5 * 2 * flops) + 2 * router + flops
