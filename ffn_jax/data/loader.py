"""The training loader (grain) and the process-local -> global batch helper.

Training draws windows of ``seq_len + 1`` tokens (inputs are ``[:-1]``, targets
``[1:]``) starting at every position of the split in a seeded random order: one epoch
is a permutation of all start positions (grain's index shuffle, lazy, O(1) memory),
each epoch reshuffled, repeated forever. The order depends only on the seed and the
global batch size, never on the number of processes: global batch ``k`` is elements
``k*B .. (k+1)*B - 1`` of that sequence, and process ``p`` of ``P`` gets the
contiguous rows ``p*B/P .. (p+1)*B/P - 1`` of it, so concatenating the processes' rows
in process order (what :func:`to_global` does) gives the same global batch on any
number of hosts.

Processes that hold replicas of the same rows (a ``tensor`` or other non-batch mesh axis
spanning hosts) must feed the same rows: :func:`batch_block` reads which block of the
global batch this process's devices hold from the batch sharding, and the loaders take
that block's index and the number of blocks as their ``process_index`` / ``process_count``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ffn_jax.data.shards import TokenShard


class _Windows:
    """Random-access source: element ``i`` is tokens[i : i + length] as int32 (length,).

    Holds the path, not the memmap, so it pickles cheaply into grain worker processes.
    """

    def __init__(self, path: Path, dtype: np.dtype, n_tokens: int, length: int) -> None:
        self._path, self._dtype, self._n_tokens, self._length = path, dtype, n_tokens, length
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return self._n_tokens - self._length + 1

    def __getitem__(self, i: int) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self._path, self._dtype, mode="r", shape=(self._n_tokens,))
        return np.asarray(self._tokens[i : i + self._length], np.int32)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


def process_rows(
    batch: int, process_index: int | None, process_count: int | None, what: str
) -> tuple[int, int, int]:
    """``(process_index, process_count, rows per process)``, defaulting to jax's values.

    Raises ValueError (naming ``what``) unless the batch divides evenly across processes.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
    if batch <= 0 or batch % pc:
        raise ValueError(f"{what}={batch} must be a positive multiple of process_count={pc}")
    return pi, pc, batch // pc


def train_iterator(
    shard: TokenShard,
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    start: int = 0,
) -> grain.DatasetIterator | BatchReader:
    """An infinite, seeded iterator of this process's rows of each training batch, from
    global batch ``start`` on.

    Yields int32 arrays (global_batch // process_count, seq_len + 1). Batch ``k`` depends
    only on the seed, the global batch size and ``k``, so a run resumed at step ``k``
    continues exactly with ``start=k``, on any number of processes (the checkpoint needs no
    iterator state). The iterator also has ``get_state()`` / ``set_state()``.
    ``num_workers=0`` reads each batch when asked, in the calling thread
    (:class:`BatchReader`); ``num_workers > 0`` reads ahead in that many grain worker
    processes (outside ``absl.app.run`` call ``absl.flags.FLAGS.mark_as_parsed()`` first).
    """
    pi, pc, rows = process_rows(global_batch, process_index, process_count, "global_batch")
    if seq_len <= 0:
        raise ValueError(f"data.seq_len={seq_len} must be positive")
    if shard.n_tokens < seq_len + 1:
        raise ValueError(
            f"data.seq_len={seq_len} needs {seq_len + 1} tokens but {shard.path.name} has "
            f"{shard.n_tokens}; lower data.seq_len or use more text"
        )
    source = _Windows(shard.path, shard.dtype, shard.n_tokens, seq_len + 1)
    # _Windows is a random-access source (__len__, __getitem__) without grain's base class.
    ds = grain.MapDataset.source(source)  # pyright: ignore[reportArgumentType]
    ds = ds.seed(seed).shuffle().repeat()
    ds = ds.batch(rows, drop_remainder=True)[pi::pc]
    if num_workers == 0:
        return BatchReader(ds, start)
    if start:
        ds = ds[start:]
    it_ds = ds.to_iter_dataset()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it_ds)


class BatchReader:
    """Iterator over a random-access dataset of batches from index ``start``, each batch
    read in the calling thread when it is asked for.

    Reading in-memory token windows is cheap, and the training loop overlaps it with the
    running step (async dispatch); grain's threaded iterator costs more CPU per batch and
    competes with XLA for the cores while it fills its read-ahead buffer (measured in
    docs/perf.md). ``get_state()`` / ``set_state()`` hold the next index.
    """

    def __init__(self, dataset: grain.MapDataset, start: int = 0):
        self.dataset, self._next = dataset, start

    def __iter__(self) -> BatchReader:
        return self

    def __next__(self) -> np.ndarray:
        batch = cast(np.ndarray, self.dataset[self._next])  # None only for filtered elements
        self._next += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next}

    def set_state(self, state: dict[str, int]) -> None:
        self._next = int(state["next_index"])


def batch_block(
    sharding: jax.sharding.Sharding, batch: int, devices: Iterable[Any] | None = None
) -> tuple[int, int]:
    """``(block, blocks)``: this process's rows of a global batch of ``batch`` rows laid out
    by ``sharding`` are rows ``block * batch / blocks .. (block + 1) * batch / blocks - 1``.

    Read from the rows ``sharding`` gives ``devices`` (default: this process's addressable
    devices). One process: ``(0, 1)``; processes along the batch axes: ``(p, P)``; processes
    that are replicas of each other (e.g. ``tensor`` across hosts) get the same block, so
    they feed the same rows. ValueError when the devices hold no single aligned block
    (a mesh whose batch axes interleave processes).
    """
    devices = sharding.addressable_devices if devices is None else set(devices)
    index_map = sharding.devices_indices_map((batch, 1))
    spans = {index_map[d][0].indices(batch)[:2] for d in devices}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    rows = hi - lo
    if sum(b - a for a, b in spans) != rows or batch % rows or lo % rows:
        raise ValueError(
            f"this process's devices hold rows {sorted(spans)} of the {batch}-row batch, not "
            "one aligned block; order the mesh so that each process's devices are contiguous "
            "along the batch axes (mesh.shape)"
        )
    return lo // rows, batch // rows


def to_global(
    batch_np: np.ndarray,
    mesh: jax.sharding.Mesh,
    spec: PartitionSpec,
    global_rows: int | None = None,
) -> jax.Array:
    """Assemble each process's rows (its :func:`batch_block` of the batch) into one global
    jax.Array of ``global_rows`` rows (default: local rows x processes, right only when no
    two processes hold the same rows), laid out on ``mesh`` as ``spec`` says (e.g.
    ``PartitionSpec("data")``).
    """
    sharding = NamedSharding(mesh, spec)
    local = np.asarray(batch_np)
    shape = None if global_rows is None else (global_rows, *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, shape)
