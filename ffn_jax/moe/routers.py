"""The router registry and the per-shard MoE function.

A router is one row of ``ROUTERS`` (data, not string tests spread over files): its dispatch
function, whether it is causal in a decoder, the dispatch paths it allows (the first is its
default), and ``assign``, its flat token -> expert assignments for inspection. Everything
else (validation, cost, memory estimate, the report's causal flag) reads the row.

``route(x_td, logits_te, probs_te, w, *, s, act, cap, axes, length, drop)
-> (y_td, count_e, dropped, of)`` runs the experts on one shard's ``t = batch * length``
tokens (rows batch-major) with ``cap`` slots per expert; experts (or tokens) are selected on
the float32 logits, weighted by the probabilities; ``drop`` is the experts' hidden dropout
(None in evaluation); ``count_e`` counts assignments per expert before drops, ``dropped`` out
of ``of`` feed the ``dropped_fraction`` metric. ``assign(logits_te, s, cap)`` gives the flat
``(expert, token)`` assignments of the same selection.
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
from ffn_jax.moe.routing import aux_from_sums, expert_choice_route, router_sums, top_k_route
from ffn_jax.moe.settings import MoESettings, capacity

RouteOut = tuple[jax.Array, jax.Array, jax.Array, int]


@dataclasses.dataclass(frozen=True)
class Router:
    """One routing scheme (see the module docstring)."""

    name: str
    route: Callable[..., RouteOut]
    assign: Callable[[jax.Array, MoESettings, int], tuple[jax.Array, jax.Array]]
    causal: bool
    dispatches: tuple[str, ...]
    description: str

    def uses_capacity(self, dispatch: str) -> bool:
        """Whether ``dispatch`` fills fixed-capacity slots (capacity factors apply)."""
        return dispatch == "capacity"


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
) -> RouteOut:
    expert_tk, weight_tk = top_k_route(probs_te, s.top_k, s.renormalize, logits_te)
    if s.dispatch == "capacity":
        return capacity_dispatch(x_td, expert_tk, weight_tk, w, act, cap, axes, length, drop)
    return dropless_dispatch(x_td, expert_tk, weight_tk, w, act, s.dropless_impl, axes, drop)


def _token_choice_assign(logits_te, s: MoESettings, cap: int) -> tuple[jax.Array, jax.Array]:
    del cap
    probs_te = jax.nn.softmax(logits_te, axis=-1)
    expert_tk, _ = top_k_route(probs_te, s.top_k, s.renormalize, logits_te)
    tokens = jnp.repeat(jnp.arange(logits_te.shape[0], dtype=jnp.int32), s.top_k)
    return expert_tk.reshape(-1), tokens


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
) -> RouteOut:
    del s, length
    return expert_choice_dispatch(x_td, probs_te, w, act, cap, axes, logits_te, drop)


def _expert_choice_assign(logits_te, s: MoESettings, cap: int) -> tuple[jax.Array, jax.Array]:
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
            "expert_choice",
            _expert_choice,
            _expert_choice_assign,
            causal=False,
            dispatches=("capacity",),
            description="expert choice: each expert takes its top-capacity tokens",
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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Routed experts on one shard: ``x (b, l, d)``, float32 ``logits (b, l, E)`` and the local
    experts' weights -> ``(y (b, l, d), aux)``; aux values are global over the batch axes.

    ``dropout_key`` (raw ``uint32`` key data, the same on every shard; None = no dropout)
    turns on the experts' hidden dropout of rate ``s.dropout``; it is folded with this
    shard's index over the batch and expert axes, so shards draw independent masks."""
    batch, length, d = x_bld.shape
    x_td = x_bld.reshape(batch * length, d)
    logits_te = logits_ble.reshape(batch * length, -1).astype(jnp.float32)
    probs_te = jax.nn.softmax(logits_te, axis=-1)
    cap = capacity(capacity_factor, s.top_k, batch * length, s.num_experts)
    drop = None
    if dropout_key is not None and s.dropout > 0:
        key = jax.random.wrap_key_data(dropout_key)
        mesh_axes = tuple(dict.fromkeys(axes.batch + ((axes.expert,) if axes.expert else ())))
        if mesh_axes:
            key = jax.random.fold_in(key, jax.lax.axis_index(mesh_axes))
        drop = HiddenDropout(s.dropout, key)
    y_td, count_e, dropped, of = ROUTERS[s.router].route(
        x_td, logits_te, probs_te, w, s=s, act=act, cap=cap, axes=axes, length=length, drop=drop
    )
    sums = _psum(router_sums(logits_te, probs_te, count_e, dropped, of), axes.batch)
    return y_td.reshape(batch, length, d), aux_from_sums(sums)
