"""The router registry and the per-shard MoE function.

A router is one row of ``ROUTERS`` (data, not string tests spread over files): its dispatch
function, whether it is causal in a decoder, the dispatch paths it allows (the first is its
default), the balancing and routing modes it allows, ``probs`` (the per-token distribution
over experts behind its aux statistics) and ``assign``, its flat token -> expert assignments
for inspection. Everything else (validation, cost, memory estimate, the report's causal
flag) reads the row.

``route(x_td, logits_te, probs_te, w, *, s, act, cap, axes, length, drop, bias_e) -> (y_td,
count_e, dropped, of)`` runs the experts on one shard's ``t = batch * length`` tokens (rows
batch-major) with ``cap`` slots per expert; experts (or tokens) are selected on the float32
logits (or, with the loss-free balance bias ``bias_e (E,)``, on the scores plus the bias, or
a forced selection's ``(t, E)`` offset under ``model.moe.routing``), weighted by the scores;
``drop`` is the experts' hidden dropout (None in evaluation); ``count_e`` counts assignments
per expert before drops, ``dropped`` out of ``of`` feed the ``dropped_fraction`` metric.
``assign(logits_te, s, cap, bias_e)`` gives the flat ``(expert, token)`` assignments of the
same selection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ffn_jax.moe.dispatch import (
    ShardAxes,
    capacity_dispatch,
    dropless_dispatch,
    expert_choice_dispatch,
)
from ffn_jax.moe.experts import Activation, HiddenDropout, Weights
from ffn_jax.moe.routing import (
    aux_from_sums,
    expert_choice_route,
    forced_selection,
    router_sums,
    sequence_counts,
    sigmoid_probs,
    sigmoid_top_k_route,
    top_k_route,
)
from ffn_jax.moe.settings import BALANCES, ROUTING_MODES, MoESettings, capacity

RouteOut = tuple[jax.Array, jax.Array, jax.Array, int]


def _softmax(logits_te: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits_te, axis=-1)


@dataclasses.dataclass(frozen=True)
class Router:
    """One routing scheme (see the module docstring)."""

    name: str
    route: Callable[..., RouteOut]
    assign: Callable[..., tuple[jax.Array, jax.Array]]
    causal: bool
    dispatches: tuple[str, ...]
    description: str
    probs: Callable[[jax.Array], jax.Array] = _softmax  # logits (t, E) -> distribution (t, E)
    balances: tuple[str, ...] = BALANCES  # the model.moe.balance modes that apply
    routings: tuple[str, ...] = ROUTING_MODES  # the model.moe.routing modes that apply

    def uses_capacity(self, dispatch: str) -> bool:
        """Whether ``dispatch`` fills fixed-capacity slots (capacity factors apply)."""
        return dispatch == "capacity"


def _dispatch_token_choice(
    x_td, expert_tk, weight_tk, w: Weights, s: MoESettings, act, cap, axes, length, drop
) -> RouteOut:
    if s.dispatch == "capacity":
        return capacity_dispatch(x_td, expert_tk, weight_tk, w, act, cap, axes, length, drop)
    return dropless_dispatch(
        x_td, expert_tk, weight_tk, w, act, s.dropless_impl, s.exchange, axes, drop
    )


def _token_choice(
    x_td,
    logits_te,
    probs_te,
    w: Weights,
    *,
    s: MoESettings,
    act: Activation,
    cap: int,
    axes: ShardAxes,
    length: int,
    drop: HiddenDropout | None = None,
    bias_e: jax.Array | None = None,
) -> RouteOut:
    expert_tk, weight_tk = top_k_route(probs_te, s.top_k, s.renormalize, logits_te, bias_e)
    return _dispatch_token_choice(x_td, expert_tk, weight_tk, w, s, act, cap, axes, length, drop)


def _flat(expert_tk: jax.Array) -> tuple[jax.Array, jax.Array]:
    t, k = expert_tk.shape
    return expert_tk.reshape(-1), jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)


def _token_choice_assign(
    logits_te, s: MoESettings, cap: int, bias_e: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    del cap
    probs_te = jax.nn.softmax(logits_te, axis=-1)
    return _flat(top_k_route(probs_te, s.top_k, s.renormalize, logits_te, bias_e)[0])


def _sigmoid_token_choice(
    x_td,
    logits_te,
    probs_te,
    w: Weights,
    *,
    s: MoESettings,
    act: Activation,
    cap: int,
    axes: ShardAxes,
    length: int,
    drop: HiddenDropout | None = None,
    bias_e: jax.Array | None = None,
) -> RouteOut:
    del probs_te  # the normalised scores of the aux statistics; weights use the raw ones
    expert_tk, weight_tk = sigmoid_top_k_route(logits_te, s.top_k, s.renormalize, bias_e)
    return _dispatch_token_choice(x_td, expert_tk, weight_tk, w, s, act, cap, axes, length, drop)


def _sigmoid_assign(
    logits_te, s: MoESettings, cap: int, bias_e: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    del cap
    return _flat(sigmoid_top_k_route(logits_te, s.top_k, s.renormalize, bias_e)[0])


def _expert_choice(
    x_td,
    logits_te,
    probs_te,
    w: Weights,
    *,
    s: MoESettings,
    act: Activation,
    cap: int,
    axes: ShardAxes,
    length: int,
    drop: HiddenDropout | None = None,
    bias_e: jax.Array | None = None,
) -> RouteOut:
    del s, length, bias_e  # loss-free balancing does not apply (refused by the spec)
    return expert_choice_dispatch(x_td, probs_te, w, act, cap, axes, logits_te, drop)


def _expert_choice_assign(
    logits_te, s: MoESettings, cap: int, bias_e: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    del bias_e
    probs_te = jax.nn.softmax(logits_te, axis=-1)
    token_ec, _ = expert_choice_route(probs_te, cap, logits_te)
    return jnp.repeat(jnp.arange(s.num_experts, dtype=jnp.int32), cap), token_ec.reshape(-1)


ROUTERS: dict[str, Router] = {
    r.name: r
    for r in (
        Router(
            "topk",
            _token_choice,
            _token_choice_assign,
            causal=True,
            dispatches=("capacity", "dropless"),
            description="token choice, softmax top-k (top_k=1 is Switch)",
        ),
        Router(
            "sigmoid_topk",
            _sigmoid_token_choice,
            _sigmoid_assign,
            causal=True,
            dispatches=("capacity", "dropless"),
            description="token choice, sigmoid scores, top-k normalised over the chosen "
            "(DeepSeek-V3)",
            probs=sigmoid_probs,
        ),
        Router(
            "expert_choice",
            _expert_choice,
            _expert_choice_assign,
            causal=False,
            dispatches=("capacity",),
            description="expert choice: each expert takes its top-capacity tokens",
            balances=("aux", "none"),  # balanced by construction: no bias to learn
            routings=("learned",),  # experts pick tokens: no token-side choice to force
        ),
    )
}


def _psum(tree: dict[str, jax.Array], axes: tuple[str, ...]) -> dict[str, jax.Array]:
    return jax.tree.map(lambda v: jax.lax.psum(v, axes), tree) if axes else tree


def moe_shard(
    x_bld: jax.Array,
    logits_ble: jax.Array,
    w: Weights,
    *,
    s: MoESettings,
    act: Activation,
    capacity_factor: float,
    axes: ShardAxes,
    dropout_key: jax.Array | None = None,
    bias_e: jax.Array | None = None,
    routing_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Routed experts on one shard: ``x (b, l, d)``, float32 ``logits (b, l, E)`` and the local
    experts' weights -> ``(y (b, l, d), aux, load_e (E,))``; aux values and ``load_e`` (the
    assignments per expert before drops, float32 counts) are global over the batch axes, so
    every shard holds the same ones.

    ``dropout_key`` (raw ``uint32`` key data, the same on every shard; None = no dropout)
    turns on the experts' hidden dropout of rate ``s.dropout``; it is folded with this
    shard's index over the batch, expert and tensor axes, so shards draw independent masks.
    ``bias_e (E,)`` (replicated): the loss-free balance bias, added to the scores for the
    selection only. Under ``s.routing`` ``balanced`` or ``random`` a forced selection
    (``forced_selection``) replaces it, over this shard's tokens; ``random`` draws from
    ``routing_key`` (raw key data, the same on every shard) folded with the shard's index
    over the batch axes, so shards draw independently and token replicas agree."""
    batch, length, d = x_bld.shape
    router = ROUTERS[s.router]
    x_td = x_bld.reshape(batch * length, d)
    logits_te = logits_ble.reshape(batch * length, -1).astype(jnp.float32)
    probs_te = router.probs(logits_te)
    cap = capacity(capacity_factor, s.top_k, batch * length, s.num_experts)
    drop = None
    if dropout_key is not None and s.dropout > 0:
        key = jax.random.wrap_key_data(dropout_key)
        # The tensor axis too: its shards hold different hidden units of the same tokens.
        own = tuple(a for a in (axes.expert, axes.tensor) if a)
        mesh_axes = tuple(dict.fromkeys(axes.batch + own))
        if mesh_axes:
            key = jax.random.fold_in(key, jax.lax.axis_index(mesh_axes))
        drop = HiddenDropout(s.dropout, key)
    if s.routing != "learned":
        key = None
        if routing_key is not None:
            key = jax.random.wrap_key_data(routing_key)
            if axes.batch:
                key = jax.random.fold_in(key, jax.lax.axis_index(axes.batch))
        bias_e = forced_selection(s.routing, batch * length, s.num_experts, s.top_k, key)
    y_td, count_e, dropped, of = router.route(
        x_td,
        logits_te,
        probs_te,
        w,
        s=s,
        act=act,
        cap=cap,
        axes=axes,
        length=length,
        drop=drop,
        bias_e=bias_e,
    )
    count_be = None
    if s.aux_scope == "sequence":  # the same selection, counted per sequence
        expert_a, token_a = router.assign(logits_te, s, cap, bias_e)
        count_be = sequence_counts(expert_a, token_a, batch, length, s.num_experts)
    sums = router_sums(logits_te, probs_te, count_e, dropped, of, count_be)
    sums = _psum(sums, axes.batch)
    return y_td.reshape(batch, length, d), aux_from_sums(sums), sums["count_e"]
