"""Evaluation batches that score every token of a split once, and bits per byte.

The split's ids ``t_0 .. t_{n-1}`` give ``n - 1`` targets ``t_1 .. t_{n-1}`` (``t_0`` is
the leading end-of-text id). Window ``w`` has inputs ``t[wT : wT + T]`` and targets
``t[wT + 1 : wT + T + 1]``, for ``W = ceil((n - 1) / T)`` non-overlapping windows; the
last one is zero-padded with mask 0. Windows are taken in order, ``batch_size`` per
global batch; process ``p`` of ``P`` gets the contiguous rows ``p*B/P .. (p+1)*B/P - 1``
(rows past the end are all padding), so every process yields the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ffn_jax.data.loader import process_rows
from ffn_jax.data.shards import TokenShard


def eval_batches(
    shard: TokenShard,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int = 0,
    token_bytes: np.ndarray,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray | int]]:
    """Iterate ``{"inputs", "targets", "mask", "bytes"}`` over the split in order.

    inputs, targets: int32 (batch_size // process_count, seq_len); mask: float32, same
    shape, 1 where the target is a real token. bytes: UTF-8 bytes of the scored targets
    of the whole *global* batch (all processes' rows), so it pairs with an NLL summed
    over the global batch; summed over a full pass it equals ``shard.n_bytes``.
    All batches when ``max_batches == 0``, else ``max_batches`` of them evenly spaced over
    the split (a subsample that covers it, not its beginning).
    """
    pi, _, rows = process_rows(batch_size, process_index, process_count, "batch_size")
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    tokens, n = shard.tokens, shard.n_tokens
    n_batches = math.ceil(math.ceil((n - 1) / seq_len) / batch_size)
    picked = range(n_batches)
    if max_batches and max_batches < n_batches:
        picked = np.unique(np.linspace(0, n_batches - 1, max_batches).round().astype(int))
    span = rows * seq_len
    for b in map(int, picked):
        start = b * batch_size * seq_len + pi * span  # first input position of our rows
        block = np.zeros(span + 1, np.int32)
        piece = np.asarray(tokens[min(start, n) : min(start + span + 1, n)], np.int32)
        block[: len(piece)] = piece
        position = start + 1 + np.arange(span)  # where each target sits in the split
        global_end = min((b + 1) * batch_size * seq_len + 1, n)
        scored = tokens[min(b * batch_size * seq_len + 1, n) : global_end]
        yield {
            "inputs": block[:-1].reshape(rows, seq_len),
            "targets": block[1:].reshape(rows, seq_len),
            "mask": (position < n).astype(np.float32).reshape(rows, seq_len),
            "bytes": int(token_bytes[scored].sum()),
        }


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte: total NLL in nats / (ln 2 * bytes); tokenizer-independent."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes} must be positive")
    return float(total_nll_nats) / (math.log(2) * n_bytes)
