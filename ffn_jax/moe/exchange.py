"""The capacity-free token exchange of dropless expert parallelism, over the expert axis.

Inside the MoE ``shard_map`` each shard holds ``rows`` assignment rows sorted by global
expert id, so the rows bound for expert shard ``j`` are one contiguous segment. Two ways to
send them (``model.moe.exchange``):

* ``padded`` (``dispatch.padded_exchange``): one ``all_to_all`` of an ``(n, rows, d)``
  buffer, each segment zero-padded to ``rows``: static shapes on every backend, but ``n``
  times the bytes of the rows themselves.
* ``ragged`` (:func:`ragged_exchange`): ``jax.lax.ragged_all_to_all`` sends each segment
  exactly, into a receive buffer of ``n * rows`` rows (the worst case: every shard's rows to
  one expert shard), and sends the results back the same way. XLA implements the collective
  on GPU and TPU; on other backends (XLA:CPU has none) :func:`ragged_all_to_all` runs an
  emulation of the same semantics through a padded ``all_to_all``, so the exchange's
  offset arithmetic is exercised and tested on CPU.

``auto`` (the default) is ``ragged`` where the backend has the collective, else ``padded``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

EXCHANGES = ("auto", "padded", "ragged")  # model.moe.exchange
NATIVE_RAGGED_PLATFORMS = ("gpu", "tpu")  # backends whose XLA has ragged all-to-all


def native_ragged(platform: str | None = None) -> bool:
    """Whether ``platform`` (default: JAX's default backend) implements
    ``ragged_all_to_all``."""
    return (platform or jax.default_backend()) in NATIVE_RAGGED_PLATFORMS


def uses_ragged(exchange: str, platform: str | None = None) -> bool:
    """Whether ``model.moe.exchange=exchange`` sends tokens by the ragged exchange."""
    return exchange == "ragged" or (exchange == "auto" and native_ragged(platform))


def emulated_ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str,
) -> jax.Array:
    """``jax.lax.ragged_all_to_all``'s semantics (one peer per shard of ``axis_name``)
    through a padded ``all_to_all``: for every peer ``j``, rows
    ``operand[input_offsets[j] : + send_sizes[j]]`` are written into peer ``j``'s ``output``
    at ``output_offsets[j]``; rows nobody writes keep ``output``'s values. Every segment
    travels padded to ``operand``'s length."""
    n, rows = send_sizes.shape[0], operand.shape[0]
    r = jnp.arange(rows)
    src_jr = jnp.where(r < send_sizes[:, None], input_offsets[:, None] + r, rows)
    send = operand.at[src_jr].get(mode="fill", fill_value=0)  # (n, rows, ...)
    recv = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # segment s from sender s
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dest_sr = jnp.where(r < recv_sizes[:, None], offsets[:, None] + r, output.shape[0])
    return output.at[dest_sr.reshape(-1)].set(
        recv.reshape(n * rows, *operand.shape[1:]), mode="drop"
    )


def ragged_all_to_all(*args: jax.Array, axis_name: str) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` where the backend implements it, else
    :func:`emulated_ragged_all_to_all` (same arguments and result)."""
    fn = jax.lax.ragged_all_to_all if native_ragged() else emulated_ragged_all_to_all
    return fn(*args, axis_name=axis_name)


def ragged_exchange(
    x_nd: jax.Array,
    expert_n: jax.Array,
    num_local: int,
    axis_name: str,
    n_shards: int,
    compute: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """Send rows ``x_nd (rows, d)``, sorted by global expert id ``expert_n (rows,)``, to the
    shards of ``axis_name`` that hold their experts (``num_local`` each), run
    ``compute(x, local_expert)`` there on the received rows (``(n_shards * rows, d)``; rows
    that hold nothing have local expert id ``num_local``), and bring the results back:
    ``(rows, d)``, row for row with ``x_nd``."""
    rows, d = x_nd.shape
    dest_n = expert_n // num_local
    count_j = jnp.bincount(dest_n, length=n_shards).astype(jnp.int32)  # rows to shard j
    start_j = jnp.cumsum(count_j) - count_j  # where they start here
    count_sj = jax.lax.all_gather(count_j, axis_name)  # (sender, receiver)
    start_sj = jax.lax.all_gather(start_j, axis_name)
    me = jax.lax.axis_index(axis_name)
    # On receiver j, the rows of sender s follow those of every lower-ranked sender.
    before_j = jnp.sum(jnp.where(jnp.arange(n_shards)[:, None] < me, count_sj, 0), axis=0)
    recv_s = count_sj[:, me]  # rows from each sender
    recv_start_s = jnp.cumsum(recv_s) - recv_s
    buffer = n_shards * rows
    send = (start_j, count_j, before_j, recv_s)
    recv_x = ragged_all_to_all(x_nd, jnp.zeros((buffer, d), x_nd.dtype), *send, axis_name=axis_name)
    local_n = (expert_n - num_local * dest_n).astype(jnp.int32)
    recv_e = ragged_all_to_all(
        local_n, jnp.full((buffer,), num_local, jnp.int32), *send, axis_name=axis_name
    )
    out = compute(recv_x, recv_e)
    # Back: sender s's rows go home to where they started there (start_sj[s, me]).
    back = (recv_start_s, recv_s, start_sj[:, me], count_j)
    return ragged_all_to_all(out, jnp.zeros_like(x_nd), *back, axis_name=axis_name)
