"""Dispatch and combine for one group of tokens (one data shard), expert parallel inside.

Each path runs inside the per-shard function (``routers.moe_shard``): it sees the ``t``
tokens local to its shard and the ``E_l = E / n_ep`` experts local to its expert shard, and
exchanges tokens over the expert mesh axis with ``all_to_all``. Without a mesh it runs as is
with no collectives (``axes.expert`` None).

Dispatch paths (all index based: no ``tokens x experts x capacity`` one-hot tensors):

* **capacity** (token choice): assignments are ranked in (position, rank, batch) order:
  at position ``j`` every sequence's first choice, then every sequence's second choice, ...,
  all before position ``j+1``. First choices thus have priority over second choices at the
  same position (as GShard/Mesh-TF give them), so a token's second choice cannot take the
  slot of another sequence's first choice; and whether a token keeps its slot depends only
  on tokens at its own or earlier positions: causal. (A global k-major order, every first
  choice of the group before any second choice, would let a later token's first choice
  evict an earlier token's second: a path from the future.) The
  position of an assignment in its expert is a cumsum over the ``(t*k, E)`` assignment
  mask, and assignments at positions ``>= C`` are dropped (their contribution is 0: the
  token passes through the residual only). Kept ones are gathered into an ``(E, C, d)``
  slot buffer; one ``all_to_all`` sends each expert shard its ``(E_l, n_ep*C, d)`` slots, a
  batched einsum runs the experts and a second ``all_to_all`` brings the results back to be
  gathered per assignment and weighted. Static shapes and dense matmuls: the fast path on
  every backend, at the cost of computing empty slots (``capacity_factor * k`` expert
  applications per token).
* **dropless** (token choice): assignments are sorted by expert; the rows for expert shard
  ``j`` form one contiguous segment. The exchange is capacity-free (``model.moe.exchange``,
  ``exchange.py``): ``ragged`` sends each segment exactly by ``ragged_all_to_all`` (GPU/TPU;
  emulated elsewhere), ``padded`` sends every expert shard a ``t*k``-row buffer (room for the
  worst case, zero-padded), ``n_ep`` times the bytes of an exact exchange, the path on
  XLA:CPU, which has no ragged all-to-all. Each
  expert shard sorts what it received by local expert and runs a grouped matmul
  (``dropless_impl``: ``ragged`` = ``jax.lax.ragged_dot``, for GPU/TPU; ``loop`` = a scan
  over one-expert row tiles, fast on CPU; see ``experts.py``). Nothing is dropped.
* **expert choice**: every expert takes its top-``C`` tokens by router probability
  (``(E, C)`` token indices), then the same exchange and einsum as the capacity path; results
  are scatter-added back weighted by the router probability. Non-causal in a decoder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ffn_jax.moe.exchange import ragged_exchange, uses_ragged
from ffn_jax.moe.experts import (
    Activation,
    HiddenDropout,
    Weights,
    dense_experts,
    ragged_experts,
    tiled_experts,
)
from ffn_jax.moe.routing import expert_choice_route


@dataclasses.dataclass(frozen=True)
class ShardAxes:
    """Mesh axes seen by ``moe_shard``: the batch axes (psum of the statistics), the expert
    axis (``all_to_all``; None = no collectives) of size ``n_expert``, and the axis the
    experts' hidden dimension is sharded over (``tensor``: a ``psum`` of the partial outputs;
    None = experts not tensor parallel)."""

    batch: tuple[str, ...] = ()
    expert: str | None = None
    n_expert: int = 1
    tensor: str | None = None


NO_MESH = ShardAxes()


def _exchange_and_compute(
    buf_ecd: jax.Array,
    w: Weights,
    act: Activation,
    axes: ShardAxes,
    drop: HiddenDropout | None = None,
) -> jax.Array:
    """Run the experts on an ``(E, C, d)`` slot buffer, with the expert-parallel exchange."""
    if axes.expert is None:
        return dense_experts(buf_ecd, w, act, drop, axes.tensor)
    recv = jax.lax.all_to_all(buf_ecd, axes.expert, 0, 1, tiled=True)  # (E_l, n_ep*C, d)
    out = dense_experts(recv, w, act, drop, axes.tensor)
    return jax.lax.all_to_all(out, axes.expert, 1, 0, tiled=True)  # (E, C, d)


def capacity_dispatch(
    x_td: jax.Array,
    expert_tk: jax.Array,
    weight_tk: jax.Array,
    w: Weights,
    act: Activation,
    cap: int,
    axes: ShardAxes,
    length: int,
    drop: HiddenDropout | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Token choice with ``cap`` slots per expert over ``t = batch * length`` tokens (rows
    of ``x_td`` batch-major); ``expert_tk``/``weight_tk`` ``(t, k)``. Returns
    ``(y_td, count_e, dropped, of)``."""
    t, d = x_td.shape
    k = expert_tk.shape[1]
    num_e = w["w1"].shape[0] * axes.n_expert
    batch = t // length

    def by_position(a_tk: jax.Array) -> jax.Array:
        """``(t, k)`` per token -> ``(t*k,)`` in priority order (position, rank, batch)."""
        return a_tk.reshape(batch, length, k).transpose(1, 2, 0).reshape(-1)

    expert_a = by_position(expert_tk)
    token_a = by_position(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k)))
    onehot_ae = jax.nn.one_hot(expert_a, num_e, dtype=jnp.int32)
    pos_a = jnp.take_along_axis(jnp.cumsum(onehot_ae, axis=0), expert_a[:, None], 1)[:, 0] - 1
    keep_a = pos_a < cap
    slot_a = jnp.where(keep_a, expert_a * cap + pos_a, num_e * cap)
    token_s = jnp.full((num_e * cap,), t, jnp.int32).at[slot_a].set(token_a, mode="drop")
    buf_ecd = x_td.at[token_s].get(mode="fill", fill_value=0).reshape(num_e, cap, d)
    out_sd = _exchange_and_compute(buf_ecd, w, act, axes, drop).reshape(num_e * cap, d)
    slot_tk = slot_a.reshape(length, k, batch).transpose(2, 0, 1).reshape(-1)  # token order
    y_tkd = out_sd.at[slot_tk].get(mode="fill", fill_value=0).reshape(t, k, d)
    y_td = jnp.einsum("tkd,tk->td", y_tkd, weight_tk.astype(y_tkd.dtype))
    return y_td, jnp.sum(onehot_ae, axis=0), jnp.sum(~keep_a), k * t


def expert_choice_dispatch(
    x_td: jax.Array,
    probs_te: jax.Array,
    w: Weights,
    act: Activation,
    cap: int,
    axes: ShardAxes,
    logits_te: jax.Array | None = None,
    drop: HiddenDropout | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Expert choice with ``cap`` tokens per expert (selected on ``logits_te (t, E)`` when
    given, see ``expert_choice_route``). Returns ``(y_td, count_e, unpicked, t)``."""
    t, d = x_td.shape
    token_ec, weight_ec = expert_choice_route(probs_te, cap, logits_te)
    out_ecd = _exchange_and_compute(x_td[token_ec], w, act, axes, drop)
    weighted = (out_ecd * weight_ec[..., None].astype(out_ecd.dtype)).reshape(-1, d)
    y_td = jnp.zeros_like(x_td).at[token_ec.reshape(-1)].add(weighted)
    picked_t = jnp.zeros((t,), bool).at[token_ec.reshape(-1)].set(True)
    count_e = jnp.full((probs_te.shape[1],), cap, jnp.int32)
    return y_td, count_e, t - jnp.sum(picked_t), t


def _inverse(order: jax.Array) -> jax.Array:
    """The inverse of permutation ``order``."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _grouped(
    x_nd: jax.Array,
    expert_n: jax.Array,
    w: Weights,
    act: Activation,
    impl: str,
    drop: HiddenDropout | None = None,
    tensor: str | None = None,
) -> jax.Array:
    """Grouped expert FFN on rows sorted by local expert (ids >= E_l are padding -> 0)."""
    num_local = w["w1"].shape[0]
    group_e = jnp.bincount(expert_n, length=num_local).astype(jnp.int32)
    fn = ragged_experts if impl == "ragged" else tiled_experts
    y_nd = fn(x_nd, expert_n, group_e, w, act, drop, tensor)
    return jnp.where((expert_n < num_local)[:, None], y_nd, 0)


def _dropless_exchange(
    x_nd: jax.Array,
    expert_n: jax.Array,
    w: Weights,
    act: Activation,
    impl: str,
    exchange: str,
    axes: ShardAxes,
    drop: HiddenDropout | None = None,
) -> jax.Array:
    """Experts on rows sorted by global expert id, exchanged capacity-free over the expert
    axis, by the ``exchange`` of ``model.moe.exchange``."""
    if axes.expert is None:
        return _grouped(x_nd, expert_n, w, act, impl, drop, axes.tensor)
    n, (rows, d) = axes.n_expert, x_nd.shape
    num_local = w["w1"].shape[0]

    def compute(recv_x: jax.Array, recv_e: jax.Array) -> jax.Array:
        """The local experts on received rows (any order; id ``num_local`` = nothing)."""
        order = jnp.argsort(recv_e, stable=True)
        out = _grouped(recv_x[order], recv_e[order], w, act, impl, drop, axes.tensor)
        return out[_inverse(order)]

    if uses_ragged(exchange):
        return ragged_exchange(x_nd, expert_n, num_local, axes.expert, n, compute)
    dest_n = expert_n // num_local
    count_j = jnp.bincount(dest_n, length=n)
    start_j = jnp.cumsum(count_j) - count_j
    rank_r = jnp.arange(rows)
    valid_jr = rank_r[None, :] < count_j[:, None]
    src_jr = jnp.where(valid_jr, start_j[:, None] + rank_r[None, :], rows)
    send_x = x_nd.at[src_jr].get(mode="fill", fill_value=0)  # (n, rows, d)
    local_jr = (
        expert_n.at[src_jr].get(mode="fill", fill_value=0) - num_local * jnp.arange(n)[:, None]
    )
    send_e = jnp.where(valid_jr, local_jr, num_local)
    recv_x = jax.lax.all_to_all(send_x, axes.expert, 0, 0, tiled=True).reshape(n * rows, d)
    recv_e = jax.lax.all_to_all(send_e, axes.expert, 0, 0, tiled=True).reshape(n * rows)
    out = compute(recv_x, recv_e)
    back_jrd = jax.lax.all_to_all(out.reshape(n, rows, d), axes.expert, 0, 0, tiled=True)
    return back_jrd[dest_n, rank_r - start_j[dest_n]]


def dropless_dispatch(
    x_td: jax.Array,
    expert_tk: jax.Array,
    weight_tk: jax.Array,
    w: Weights,
    act: Activation,
    impl: str,
    exchange: str,
    axes: ShardAxes,
    drop: HiddenDropout | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Token choice without capacity (``expert_tk``/``weight_tk`` ``(t, k)``), tokens sent
    by ``exchange`` (``model.moe.exchange``). Returns ``(y_td, count_e, 0, t*k)``."""
    t, k = expert_tk.shape
    expert_a = expert_tk.reshape(-1)  # token-major
    order = jnp.argsort(expert_a, stable=True)
    y_sd = _dropless_exchange(x_td[order // k], expert_a[order], w, act, impl, exchange, axes, drop)
    y_tkd = y_sd[_inverse(order)].reshape(t, k, -1)
    y_td = jnp.einsum("tkd,tk->td", y_tkd, weight_tk.astype(y_tkd.dtype))
    count_e = jnp.bincount(expert_a, length=w["w1"].shape[0] * axes.n_expert)
    return y_td, count_e, jnp.zeros((), jnp.int32), t * k
