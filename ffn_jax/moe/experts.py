"""The expert computation: any registry FFN variant with a leading expert axis.

``w`` is a dict of the present parameters: ``w1_edf``, ``w2_efd`` and, when present,
``w3_edf`` (gated variants), ``b1_ef``, ``b3_ef``, ``b2_ed``, keyed ``w1, w3, w2, b1, b3, b2``.
``act`` is the FFN's hidden activation from ``ffn_jax.ffn.hidden_activation``: the variant's
function, times the ``model.ffn_init`` gain when that is not 1, so experts scale their hidden
activations exactly as the dense FFN does.
Three implementations with identical results:

* ``dense_experts``: a batched einsum over an ``(E, C, d)`` slot buffer (capacity path).
  FLOPs = ``E * C`` rows, including empty slots; fast everywhere.
* ``ragged_experts``: ``jax.lax.ragged_dot`` on expert-sorted rows (dropless). Meant for
  GPU/TPU, where XLA can run it as a grouped matmul (FLOPs = rows; whether the weight
  gradient gets one too depends on the XLA version: ``benchmarks/bench_train.py`` shows);
  on XLA:CPU it lowers to a masked dense dot costing ``E`` times that, so it is for
  correctness there.
* ``tiled_experts``: a ``lax.scan`` over fixed-size row tiles, each tile holding rows of one
  expert (every group padded to a multiple of the tile), empty tiles skipped by ``lax.cond``.
  FLOPs = rows + at most one partial tile per expert: the fast dropless choice on CPU.

``tensor`` (a mesh axis name or None) makes the experts tensor parallel inside the MoE
``shard_map``: the weights hold this shard's slice of the hidden dimension (``w1``/``w3``
``(E, d, f/n)``, ``w2`` ``(E, f/n, d)``, ``b1``/``b3`` ``(E, f/n)``; ``b2`` whole), each shard
computes its partial output and a ``psum`` over ``tensor`` sums them before ``b2`` is added.

``drop`` (a ``HiddenDropout`` or None) is the hidden dropout of the dense FFN
(``model.dropout``), applied to the hidden activation (the gated product for gated
variants) before the output matmul, in training only; None (evaluation, or rate 0) leaves
the computation exactly as without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ffn_jax.ffn import gated_activation

Weights = dict[str, jax.Array]
Activation = Callable[[jax.Array], jax.Array]

TILE_ROWS = 128  # rows per tile of tiled_experts (matmul efficiency vs padding waste)


@dataclasses.dataclass(frozen=True)
class HiddenDropout:
    """Inverted dropout of rate ``rate`` on hidden activations, masks drawn from ``key``
    (a typed PRNG key, already folded per shard when inside ``shard_map``)."""

    rate: float
    key: jax.Array

    def fold(self, salt: jax.Array | int) -> HiddenDropout:
        """The same dropout with its key folded with ``salt`` (e.g. a tile index)."""
        return HiddenDropout(self.rate, jax.random.fold_in(self.key, salt))

    def __call__(self, h: jax.Array) -> jax.Array:
        """``h`` (any shape) with each element zeroed with probability ``rate``, the rest
        scaled by ``1 / (1 - rate)`` (as ``nnx.Dropout``)."""
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(self.key, keep_prob, h.shape)
        return jnp.where(keep, h / keep_prob, jnp.zeros_like(h))


def _plus_bias(h: jax.Array, w: Weights, name: str, index: jax.Array | None) -> jax.Array:
    """``h`` plus bias ``name`` if present: per expert ``(E, 1, width)`` or per row ``index``."""
    if name not in w:
        return h
    return h + (w[name][:, None] if index is None else w[name][index]).astype(h.dtype)


def _sum_shards(y: jax.Array, tensor: str | None) -> jax.Array:
    """The partial outputs of a tensor-sharded hidden dimension summed over ``tensor``."""
    return y if tensor is None else jax.lax.psum(y, tensor)


def _like_shards(zeros: jax.Array, tensor: str | None) -> jax.Array:
    """``zeros`` typed as varying over ``tensor``, like a partial output (``lax.cond``'s
    branches must agree on it inside ``shard_map``)."""
    return zeros if tensor is None else jax.lax.pcast(zeros, tensor, to="varying")


def dense_experts(
    x_ecd: jax.Array,
    w: Weights,
    act: Activation,
    drop: HiddenDropout | None = None,
    tensor: str | None = None,
) -> jax.Array:
    """Every expert on its slot buffer: ``(E, C, d) -> (E, C, d)`` (``drop``: hidden dropout;
    ``tensor``: the mesh axis the hidden dimension is sharded over, or None)."""
    dt = x_ecd.dtype
    if "w3" in w:  # both halves in one batched matmul, as in the dense FFN
        w13 = jnp.concatenate([w["w1"], w["w3"]], axis=-1).astype(dt)
        h, g = jnp.split(jnp.einsum("ecd,edf->ecf", x_ecd, w13), 2, axis=-1)
        h = gated_activation(act, _plus_bias(h, w, "b1", None), _plus_bias(g, w, "b3", None))
    else:
        h = act(_plus_bias(jnp.einsum("ecd,edf->ecf", x_ecd, w["w1"].astype(dt)), w, "b1", None))
    if drop is not None:
        h = drop(h)
    y = _sum_shards(jnp.einsum("ecf,efd->ecd", h, w["w2"].astype(dt)), tensor)
    return _plus_bias(y, w, "b2", None)


def ragged_experts(
    x_nd: jax.Array,
    expert_n: jax.Array,
    group_sizes_e: jax.Array,
    w: Weights,
    act: Activation,
    drop: HiddenDropout | None = None,
    tensor: str | None = None,
) -> jax.Array:
    """Grouped matmul on rows sorted by ``expert_n`` (padding rows last, any id >= E).

    Returns ``(N, d)``; padding rows are left for the caller to mask.
    """
    dt = x_nd.dtype
    e = jnp.minimum(expert_n, w["w1"].shape[0] - 1)
    h = _plus_bias(jax.lax.ragged_dot(x_nd, w["w1"].astype(dt), group_sizes_e), w, "b1", e)
    if "w3" in w:
        g = jax.lax.ragged_dot(x_nd, w["w3"].astype(dt), group_sizes_e)
        h = gated_activation(act, h, _plus_bias(g, w, "b3", e))
    else:
        h = act(h)
    if drop is not None:
        h = drop(h)
    y = _sum_shards(jax.lax.ragged_dot(h, w["w2"].astype(dt), group_sizes_e), tensor)
    return _plus_bias(y, w, "b2", e)


def _tile_layout(
    expert_n: jax.Array, group_sizes_e: jax.Array, tile: int
) -> tuple[jax.Array, jax.Array, int]:
    """Row -> padded position ``dest_n`` and tile -> expert ``tile_expert`` (E = empty tile)."""
    n, num_e = expert_n.shape[0], group_sizes_e.shape[0]
    n_tiles = -(-n // tile) + num_e
    start_e = jnp.cumsum(group_sizes_e) - group_sizes_e
    padded_e = -(-group_sizes_e // tile) * tile
    padded_end_e = jnp.cumsum(padded_e)
    valid = expert_n < num_e
    e = jnp.minimum(expert_n, num_e - 1)
    rank = jnp.arange(n) - start_e[e]
    dest_n = jnp.where(valid, padded_end_e[e] - padded_e[e] + rank, n_tiles * tile)
    tile_start = jnp.arange(n_tiles) * tile
    tile_expert = jnp.searchsorted(padded_end_e, tile_start, side="right").astype(jnp.int32)
    return dest_n, tile_expert, n_tiles


def tiled_experts(
    x_nd: jax.Array,
    expert_n: jax.Array,
    group_sizes_e: jax.Array,
    w: Weights,
    act: Activation,
    drop: HiddenDropout | None = None,
    tensor: str | None = None,
    tile: int = TILE_ROWS,
) -> jax.Array:
    """Same contract as ``ragged_experts``, as a scan over single-expert row tiles (the
    dropout key is folded with the tile index). The tiles run without ``b2``; the partial
    outputs are summed over ``tensor`` and ``b2`` added per row after the scan, so no
    collective sits inside the scan's conditional."""
    n, d = x_nd.shape
    tile = min(tile, n)
    num_e = group_sizes_e.shape[0]
    dest_n, tile_expert, n_tiles = _tile_layout(expert_n, group_sizes_e, tile)
    x_tiles = jnp.zeros((n_tiles * tile, d), x_nd.dtype).at[dest_n].set(x_nd, mode="drop")
    x_tiles = x_tiles.reshape(n_tiles, tile, d)

    def one_tile(_, inputs):
        x_cd, e, i = inputs
        w_e = {name: a[jnp.minimum(e, num_e - 1)][None] for name, a in w.items() if name != "b2"}
        drop_i = drop.fold(i) if drop is not None else None
        y_cd = jax.lax.cond(
            e < num_e,
            lambda x, w_e: dense_experts(x[None], w_e, act, drop_i)[0],
            lambda x, _: _like_shards(jnp.zeros_like(x), tensor),
            x_cd,
            w_e,
        )
        return None, y_cd

    tile_index = jnp.arange(n_tiles, dtype=jnp.int32)
    _, y_tiles = jax.lax.scan(one_tile, None, (x_tiles, tile_expert, tile_index))
    y_nd = y_tiles.reshape(n_tiles * tile, d).at[dest_n].get(mode="fill", fill_value=0)
    return _plus_bias(_sum_shards(y_nd, tensor), w, "b2", jnp.minimum(expert_n, num_e - 1))
