"""Evaluation: loss, perplexity and bits per byte of a run on its held-out splits, and
text sampling from a trained model.

``evaluate_run(workdir)`` restores a run's checkpoint in a fresh process, scores every
token of the validation and test splits exactly once (non-overlapping windows) and
writes ``eval.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from ml_collections import ConfigDict

from ffn_jax import data as data_lib

log = logging.getLogger(__name__)


def make_eval_step(graphdef: nnx.GraphDef, state_shardings, batch_sharding: NamedSharding):
    """Jitted ``(state, inputs, targets, mask) -> (sum of token NLL, scored tokens)``."""

    def step(state, inputs, targets, mask):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        logits, _ = model(inputs)
        logz = jax.nn.logsumexp(logits, axis=-1)
        nll = logz - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask), jnp.sum(mask)

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding, batch_sharding,
                                       batch_sharding))


def evaluate_split(eval_step, state, shard, config: ConfigDict, rs, token_bytes: np.ndarray,
                   max_batches: int = 0) -> dict:
    """Loss / perplexity / bits per byte over ``shard`` (the first ``max_batches`` batches,
    or all of it when 0). ``rs`` supplies the mesh and batch sharding."""
    total_nll, total_tokens, total_bytes = 0.0, 0.0, 0
    sums = []
    batches = data_lib.eval_batches(
        shard, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
        max_batches=max_batches, token_bytes=token_bytes,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    spec = rs.batch_sharding.spec
    for b in batches:
        arrays = [data_lib.to_global(b[k], rs.mesh, spec) for k in ("inputs", "targets", "mask")]
        sums.append(eval_step(state, *arrays))
        total_bytes += int(b["bytes"])  # of the global batch, the same on every process
        if len(sums) % 8 == 0:
            # Bound the computations in flight: XLA:CPU's simulated devices can deadlock
            # in a collective when hundreds of them are queued at once.
            jax.block_until_ready(sums[-1])
    for nll, n in jax.device_get(sums):
        total_nll += float(nll)
        total_tokens += float(n)
    loss = total_nll / max(total_tokens, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": data_lib.bits_per_byte(total_nll, total_bytes),
        "tokens": int(total_tokens),
        "bytes": int(total_bytes),
    }


def restore_run(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
    """Rebuild a run from ``workdir`` and restore its checkpoint (latest or ``step``) onto
    ``mesh`` (default: the run's configured mesh on the current devices).

    Returns ``(config, prep, run_state, state, step)``.
    """
    from ffn_jax.checkpoint import Checkpointer
    from ffn_jax.configuration import load_config
    from ffn_jax.trainer import build_run_state

    config = load_config(workdir)
    ckpt = Checkpointer(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
    if not ckpt.steps():
        raise FileNotFoundError(f"--workdir={workdir} has no checkpoints; train it first "
                                "(python train.py --workdir=... with its config)")
    prep = data_lib.prepare(config.data, workdir)
    rs = build_run_state(config, mesh)
    restored = ckpt.restore(rs.state, None, step)
    ckpt.close()
    state, _, step = restored
    return config, prep, rs, state, step


def evaluate_run(workdir: str, step: int | None = None,
                 splits: tuple[str, ...] = ("validation", "test")) -> dict:
    """Score ``splits`` of the run in ``workdir`` and write ``workdir/eval.json``."""
    config, prep, rs, state, step = restore_run(workdir, step)
    with jax.set_mesh(rs.mesh):
        eval_step = make_eval_step(rs.graphdef, rs.state_shardings, rs.batch_sharding)
        return score_splits(workdir, eval_step, state, step, config, prep, rs, splits)


def score_splits(workdir: str, eval_step, state, step: int, config: ConfigDict, prep, rs,
                 splits: tuple[str, ...] = ("validation", "test")) -> dict:
    """Score every token of ``splits`` with ``state`` and write ``workdir/eval.json``."""
    results = {
        split: evaluate_split(eval_step, state, prep.splits[split], config, rs,
                              prep.tokenizer.token_bytes)
        for split in splits
    }
    out = {"step": step, "name": config.name, **results}
    if jax.process_index() == 0:
        path = os.path.join(workdir, "eval.json")
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(path + ".tmp", path)
    return out


def sample(workdir: str, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.0,
           seed: int = 0, step: int | None = None) -> str:
    """Continue ``prompt`` with the run's model: greedy when ``temperature == 0``.

    Each new token recomputes the forward pass over the last ``seq_len`` tokens (no KV
    cache: simple and fast enough for the small models this is for).
    """
    from ffn_jax.sharding import single_device_mesh

    config, prep, rs, state, _ = restore_run(workdir, step, single_device_mesh())
    tok = prep.tokenizer
    seq_len = config.data.seq_len
    ids = list(np.asarray(tok.encode(prompt), dtype=np.int64)) or [tok.eot_id]
    model, _ = nnx.merge(rs.graphdef, state)
    model.eval()
    mgd, mstate = nnx.split(model)

    @jax.jit
    def next_logits(mstate, window, pos):
        logits, _ = nnx.merge(mgd, mstate)(window[None])
        return logits[0, pos]

    key = jax.random.key(seed)
    with jax.set_mesh(rs.mesh):
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
