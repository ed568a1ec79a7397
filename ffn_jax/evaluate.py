"""Evaluation: loss, perplexity and bits per byte of a run on its held-out splits, and
text sampling from a trained model.

``evaluate_run(workdir)`` restores a run's checkpoint in a fresh process, scores every
token of the test split exactly once (non-overlapping windows), and of the validation split
too unless the run's ``train.final_val_batches`` names a number of evenly spaced batches,
and writes ``eval.json``.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from ffn_jax import data as data_lib
from ffn_jax.data import Prepared
from ffn_jax.files import PathLike, read_json, write_json_atomic
from ffn_jax.model import token_nll
from ffn_jax.run import EVAL_FILE, RunState, restore
from ffn_jax.spec import DataSpec, RunSpec

log = logging.getLogger(__name__)

SPLITS = ("validation", "test")


def make_eval_step(graphdef: nnx.GraphDef, state_shardings, batch_sharding: NamedSharding):
    """Jitted ``(state, inputs, targets, mask) -> (sum of token NLL, scored tokens)``."""

    def step(state, inputs, targets, mask):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        logits, _ = model(inputs)
        nll, _ = token_nll(logits, targets)
        return jnp.sum(nll * mask), jnp.sum(mask)

    return jax.jit(
        step, in_shardings=(state_shardings, batch_sharding, batch_sharding, batch_sharding)
    )


def evaluate_split(
    eval_step,
    state,
    shard,
    data: DataSpec,
    rs: RunState,
    token_bytes: np.ndarray,
    max_batches: int = 0,
) -> dict:
    """Loss / perplexity / bits per byte over ``shard`` (``max_batches`` batches spread over
    it, or all of it when 0). ``rs`` supplies the mesh and batch sharding.

    ``blocks`` holds each batch's ``[nll, tokens, bytes]``: a batch is ``batch_size``
    consecutive windows, a contiguous block of the split, the unit a bootstrap resamples.
    """
    sums, block_bytes = [], []
    block, blocks = data_lib.batch_block(rs.batch_sharding, data.batch_size)
    batches = data_lib.eval_batches(
        shard,
        seq_len=data.seq_len,
        batch_size=data.batch_size,
        max_batches=max_batches,
        token_bytes=token_bytes,
        process_index=block,
        process_count=blocks,
    )
    spec = rs.batch_sharding.spec
    for b in batches:
        arrays = [
            data_lib.to_global(np.asarray(b[k]), rs.mesh, spec, data.batch_size)
            for k in ("inputs", "targets", "mask")
        ]
        sums.append(eval_step(state, *arrays))
        block_bytes.append(int(b["bytes"]))  # of the global batch, the same on every process
        if len(sums) % 8 == 0:
            # Bound the computations in flight: XLA:CPU's simulated devices can deadlock
            # in a collective when hundreds of them are queued at once.
            jax.block_until_ready(sums[-1])
    blocks = [
        [float(nll), int(n), nbytes]
        for (nll, n), nbytes in zip(jax.device_get(sums), block_bytes, strict=True)
    ]
    total_nll = sum(b[0] for b in blocks)
    total_tokens, total_bytes = sum(b[1] for b in blocks), sum(block_bytes)
    loss = total_nll / max(total_tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": data_lib.bits_per_byte(total_nll, total_bytes),
        "tokens": int(total_tokens),
        "bytes": int(total_bytes),
        "batches": len(blocks),
        "blocks": blocks,
    }


def evaluate_run(
    workdir: PathLike, step: int | None = None, splits: tuple[str, ...] = ("validation", "test")
) -> dict:
    """Score ``splits`` of the run in ``workdir`` and write ``workdir/eval.json`` (keeping
    the other splits it holds for the same step)."""
    r = restore(workdir, step)
    with jax.set_mesh(r.rs.mesh):
        eval_step = make_eval_step(r.rs.graphdef, r.rs.state_shardings, r.rs.batch_sharding)
        return score_splits(workdir, eval_step, r.state, r.step, r.spec, r.prep, r.rs, splits)


def read_eval(workdir: PathLike) -> dict | None:
    """The run's ``eval.json`` (None if absent)."""
    path = epath.Path(workdir) / EVAL_FILE
    return read_json(path) if path.exists() else None


def score_splits(
    workdir: PathLike,
    eval_step,
    state,
    step: int,
    spec: RunSpec,
    prep: Prepared,
    rs: RunState,
    splits: tuple[str, ...] = ("validation", "test"),
) -> dict:
    """Score ``splits`` with ``state`` and write ``workdir/eval.json``, with the other splits
    an ``eval.json`` of the same step already holds. Every token is scored, except that the
    validation split gets ``spec.train.final_val_batches`` evenly spaced batches when > 0."""
    old = read_eval(workdir) if jax.process_index() == 0 else None
    kept = {k: v for k, v in (old or {}).items() if k in SPLITS and old and old["step"] == step}
    results = {
        split: evaluate_split(
            eval_step,
            state,
            prep.splits[split],
            spec.data,
            rs,
            prep.tokenizer.token_bytes,
            max_batches=spec.train.final_val_batches if split == "validation" else 0,
        )
        for split in splits
    }
    out = {"step": step, "name": spec.name, **kept, **results}
    if jax.process_index() == 0:
        path = epath.Path(workdir) / EVAL_FILE
        try:
            write_json_atomic(path, out)
        except OSError as e:  # a read-only run: the scores are still returned and printed
            log.warning(
                "could not write %s (%s); the scores are printed only", path, e.strerror or e
            )
    return out


def sample(
    workdir: PathLike,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    seed: int = 0,
    step: int | None = None,
) -> str:
    """Continue ``prompt`` with the run's model: greedy when ``temperature == 0``.

    The model is restored onto the calling process's first local device, so every process
    of a multi-process job samples (each the same text for the same seed); all of them must
    call it, as the checkpoint restore agrees across processes.
    Each new token recomputes the forward pass over the last ``seq_len`` tokens (no KV
    cache: simple and fast enough for the small models this is for).
    """
    from ffn_jax.sharding import single_device_mesh

    r = restore(workdir, step, single_device_mesh())
    tok = r.prep.tokenizer
    seq_len = r.spec.data.seq_len
    ids = list(np.asarray(tok.encode(prompt), dtype=np.int64)) or [tok.eot_id]
    model, _ = nnx.merge(r.rs.graphdef, r.state)
    model.eval()
    mgd, mstate = nnx.split(model)

    @jax.jit
    def next_logits(mstate, window, pos):
        logits, _ = nnx.merge(mgd, mstate)(window[None])
        return logits[0, pos]

    key = jax.random.key(seed)
    with jax.set_mesh(r.rs.mesh):
        for _ in range(max_new_tokens):
            ctx = ids[-seq_len:]
            window = np.zeros(seq_len, np.int32)
            window[: len(ctx)] = ctx
            logits = next_logits(mstate, jnp.asarray(window), len(ctx) - 1)
            if temperature <= 0:
                nxt = int(jnp.argmax(logits))
            else:
                key, sub = jax.random.split(key)
                nxt = int(jax.random.categorical(sub, logits / temperature))
            if nxt == tok.eot_id:
                break
            ids.append(nxt)
    return tok.decode(ids)
