"""Calibration baselines for the comparison report: interpolated Witten-Bell n-grams.

A unigram and n-gram models of orders 2..N over token ids are fitted on the training
split and scored on validation and test, in the units the neural models report (loss in
nats per token, bits per UTF-8 byte), so the report can say which baseline each model
beats. Everything is vectorised numpy: fitting and scoring orders 1..5 on byte-level
Shakespeare (4.6M training tokens) takes a few seconds.

The model (Witten-Bell, interpolated, recursively from the uniform distribution)::

    P_0(w)     = 1 / V                              V = the tokenizer's vocab_size
    P_k(w | h) = (c(h, w) + T(h) * P_{k-1}(w | h')) / (c(h) + T(h))    if c(h) > 0
               = P_{k-1}(w | h')                                        otherwise

where ``h`` is the ``k - 1`` tokens before ``w``, ``h'`` drops its oldest token, ``c(h, w)``
counts the k-gram in the training stream, ``c(h) = sum_w c(h, w)`` and ``T(h)`` is the
number of distinct ``w`` seen after ``h``. Order 1 (empty ``h``) is the unigram smoothed
towards uniform. Every k-gram of the training stream is counted; the end-of-text id is an
ordinary token, as the neural models see it.

Scored positions are exactly those of a neural eval (``ffn_jax.data.evaluation``): the
targets ``t_1 .. t_{n-1}`` of a split (``t_0`` is its leading end-of-text), so the bytes
of the scored targets add up to the split's UTF-8 bytes. The context differs: an n-gram
sees the ``N - 1`` tokens before each target in the whole split, where a neural model's
context restarts at each ``seq_len`` window; the first ``k - 2`` targets, whose order-k
context would reach before ``t_0``, use the order ``k - 1`` estimate.

Implementation: k-grams get dense ids order by order. The id of the m-gram starting at
position j is the rank of the key ``id(m-1-gram at j) * V + t[j + m - 1]`` among the
training keys (``np.unique`` with ``return_inverse``), so no key ever exceeds
``n_train * V`` whatever the order; held-out k-grams are looked up with
``np.searchsorted`` (-1 when absent from training, which propagates to higher orders).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffn_jax.data.cache import digest, write_text_atomic
from ffn_jax.data.evaluation import bits_per_byte
from ffn_jax.data.pipeline import Prepared

FORMAT = 1  # bump when the model or the scored positions change (invalidates the cache)
EVAL_SPLITS = ("validation", "test")

log = logging.getLogger(__name__)


def order_name(order: int) -> str:
    """The report's name of the order-``order`` model: ``"unigram"``, ``"2-gram"``, ..."""
    return "unigram" if order == 1 else f"{order}-gram"


@dataclass(frozen=True)
class _Table:
    """The training counts of one order k >= 2, whose contexts are the (k-1)-grams.

    keys: int64 (G,), sorted: ``context id * V + w`` of every distinct k-gram; the
      position of a key is the k-gram's id (the context id of order k + 1).
    counts: int64 (G,), c(h, w) of each key.
    ctx_total, ctx_types: int64 (number of (k-1)-gram ids,), c(h) and T(h) by context id.
    """

    keys: np.ndarray
    counts: np.ndarray
    ctx_total: np.ndarray
    ctx_types: np.ndarray


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """``ids`` as a 1-D int64 array; ValueError naming ``name`` if any id is out of range."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"{name}: token ids must be a 1-D array, got shape {ids.shape}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"{name}: token ids span [{ids.min()}, {ids.max()}] but vocab_size={vocab_size}; "
            "pass the tokenizer's vocab_size"
        )
    return ids


def _wb_update(
    p_lower: np.ndarray, c_hw: np.ndarray, c_h: np.ndarray | int, t_h: np.ndarray | int
) -> np.ndarray:
    """One Witten-Bell step: P_k from P_{k-1} and the counts of each target's context.

    p_lower, c_hw: (J,) per target; c_h, t_h: (J,) per target, or one shared context.
    """
    seen = np.asarray(c_h) > 0
    denom = np.where(seen, c_h + t_h, 1)  # avoid 0/0 where the context is unseen
    return np.where(seen, (c_hw + t_h * p_lower) / denom, p_lower)


def _nll_by_order(
    train: np.ndarray, evals: dict[str, np.ndarray], max_order: int, vocab_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Yield, for orders 1..max_order in turn, ``{name: per-target NLL (nats)}``.

    Each eval array ``e`` of length L gets float64 (max(L - 1, 0),) NLLs of ``e[1:]``.
    """
    if max_order < 1:
        raise ValueError(f"order={max_order} must be at least 1 (1 = unigram)")
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    V = int(vocab_size)
    train = _check_ids("train", train, V)
    if train.size == 0:
        raise ValueError("train has no tokens; fit on a non-empty token array")
    evals = {k: _check_ids(f"evals[{k!r}]", e, V) for k, e in evals.items()}
    if len(train) * V >= 2**62:
        raise ValueError(f"{len(train)} training tokens x vocab_size={V} overflows int64 keys")

    # Order 1: the unigram, interpolated with the uniform distribution.
    unigram = np.bincount(train, minlength=V)
    n_types = int(np.count_nonzero(unigram))
    p = {k: np.full(max(len(e) - 1, 0), 1.0 / V) for k, e in evals.items()}
    p = {k: _wb_update(p[k], unigram[e[1:]], len(train), n_types) for k, e in evals.items()}
    yield {k: -np.log(v) for k, v in p.items()}

    # ids_*[j]: id of the m-gram starting at position j (1-grams: the token itself).
    train_ids = train
    eval_ids = dict(evals)
    n_ctx = V  # number of distinct context ids of the next order
    for k in range(2, max_order + 1):
        m = k - 1  # context length
        if len(train) < k:  # no k-gram in training: every context is unseen
            yield {name: -np.log(v) for name, v in p.items()}
            continue
        # Fit: the k-gram starting at j is (m-gram at j, token j + m).
        keys, train_ids, counts = _unique(train_ids[:-1] * V + train[m:], n_ctx * V)
        ctx = keys // V
        table = _Table(
            keys,
            counts,
            np.bincount(ctx, weights=counts, minlength=n_ctx).astype(np.int64),
            np.bincount(ctx, minlength=n_ctx),
        )
        n_ctx = len(keys)
        # Score: target i (i >= m) has context = the m-gram at i - m; p[name][i - 1].
        for name, e in evals.items():
            if len(e) <= m:
                eval_ids[name] = np.zeros(0, np.int64)
                continue
            hw_ids, c_hw = _lookup(table, eval_ids[name][:-1], e[m:], V)
            ctx_ids = eval_ids[name][:-1]
            known = ctx_ids >= 0
            safe = np.where(known, ctx_ids, 0)
            c_h = np.where(known, table.ctx_total[safe], 0)
            t_h = np.where(known, table.ctx_types[safe], 0)
            p[name][m - 1 :] = _wb_update(p[name][m - 1 :], c_hw, c_h, t_h)
            eval_ids[name] = hw_ids
        yield {name: -np.log(v) for name, v in p.items()}


def _unique(x: np.ndarray, domain: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(x, return_inverse=True, return_counts=True)`` for int64 x in [0, domain).

    A bincount over the domain when it is small, else one stable argsort: both several
    times faster than ``np.unique``'s own path (numpy 2.4) on millions of keys.
    """
    if domain <= 4 * len(x) + (1 << 20):
        counts = np.bincount(x, minlength=domain)
        keys = np.flatnonzero(counts)
        rank = np.cumsum(counts > 0) - 1
        return keys, rank[x], counts[keys]
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.empty(len(xs), bool)
    new[:1] = True
    np.not_equal(xs[1:], xs[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    inverse = np.empty(len(x), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return xs[starts], inverse, np.diff(starts, append=len(xs))


def _lookup(
    table: _Table, ctx_ids: np.ndarray, words: np.ndarray, V: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ids (-1 if unseen) and training counts of the k-grams (ctx_ids[j], words[j]).

    ctx_ids: int64 (J,), -1 for a context never seen in training; words: int64 (J,).
    """
    query = ctx_ids * V + words  # negative (never found) where the context is unseen
    pos = np.searchsorted(table.keys, query)
    pos_safe = np.minimum(pos, len(table.keys) - 1)
    found = table.keys[pos_safe] == query
    return np.where(found, pos_safe, -1), np.where(found, table.counts[pos_safe], 0)


def ngram_losses(
    train: np.ndarray, evals: dict[str, np.ndarray], order: int, vocab_size: int
) -> dict[str, np.ndarray]:
    """Per-token NLL (nats) of each eval array under the order-``order`` Witten-Bell model.

    train: 1-D int ids (n,) to count k-grams in; evals: ``{name: 1-D int ids (L,)}``;
    order: 1 = unigram (smoothed towards uniform), 2 = bigram, ...; vocab_size: ids are
    in ``[0, vocab_size)`` and the uniform base spreads over all of them.
    Returns ``{name: float64 (L - 1,)}``: the NLL of ``e[1], ..., e[L-1]`` (``e[0]``, a
    split's leading end-of-text, is context only), each given the ``order - 1`` tokens
    before it within ``e`` (fewer for the first ones).
    """
    result: dict[str, np.ndarray] = {}
    for nll in _nll_by_order(train, evals, order, vocab_size):
        result = nll
    return result


def _scores(nll: np.ndarray, n_bytes: int) -> dict[str, float]:
    """The neural eval's summary (``ffn_jax.evaluate.evaluate_split``) of per-target NLLs."""
    total = float(nll.sum())
    loss = total / max(len(nll), 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": bits_per_byte(total, n_bytes),
        "tokens": int(len(nll)),
        "bytes": int(n_bytes),
    }


def cache_path(prep: Prepared) -> Path:
    """Where the baselines of ``prep`` are cached: ``<data cache>/baselines/<key>.json``.

    The key hashes the three shard file names, which already hash the corpus content,
    its split rule and the tokenizer (``ffn_jax.data.shards.shard_path``), and the token
    counts; the data cache is the directory above ``shards/``.
    """
    train = prep.splits["train"]
    identity = [f"{s.path.name}:{s.n_tokens}" for _, s in sorted(prep.splits.items())]
    key = digest(*identity, str(prep.tokenizer.vocab_size), str(FORMAT))
    corpus = train.meta.get("corpus", "data")
    return train.path.parent.parent / "baselines" / f"{corpus}-{key}.json"


def _read_cache(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or corrupt: recompute
    return cached if isinstance(cached, dict) else {}


def baselines(
    prep: Prepared, orders: Sequence[int] = (1, 2, 3, 4, 5)
) -> dict[str, dict[str, dict[str, float]]]:
    """N-gram baselines of a prepared dataset, fitted on train, scored on held-out splits.

    Returns ``{order_name: {"validation"|"test": {"loss", "perplexity", "bits_per_byte",
    "tokens", "bytes"}}}`` (``"unigram"``, ``"2-gram"``, ...), in the units and over the
    positions of a full neural eval of the split. Cached as JSON in the data cache
    (:func:`cache_path`); orders missing from the cache are computed and added.
    """
    orders = sorted({int(k) for k in orders})
    if not orders or orders[0] < 1:
        raise ValueError(f"orders={orders} must be a non-empty list of integers >= 1")
    path = cache_path(prep)
    cached = _read_cache(path)
    wanted = [order_name(k) for k in orders]
    if all(name in cached for name in wanted):
        return {name: cached[name] for name in wanted}

    start = time.perf_counter()
    tok = prep.tokenizer
    evals = {s: np.asarray(prep.splits[s].tokens) for s in EVAL_SPLITS}
    n_bytes = {s: int(tok.token_bytes[e[1:]].sum()) for s, e in evals.items()}
    train = np.asarray(prep.splits["train"].tokens)
    results = dict(cached)
    for k, nll in enumerate(_nll_by_order(train, evals, orders[-1], tok.vocab_size), 1):
        if k in orders:
            results[order_name(k)] = {s: _scores(nll[s], n_bytes[s]) for s in EVAL_SPLITS}
    write_text_atomic(path, json.dumps(results, indent=2, sort_keys=True) + "\n")
    log.info(
        "n-gram baselines (orders %s) in %.1fs -> %s", orders, time.perf_counter() - start, path
    )
    return {name: results[name] for name in wanted}
