"""Tests for ffn_jax.baselines: Witten-Bell n-grams against a dict-based reference, and
the cached baselines of a prepared dataset."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ffn_jax import baselines as bl
from ffn_jax import data
from tests.helpers import tiny


def reference_nll(
    train: list[int], evals: dict[str, list[int]], order: int, vocab_size: int
) -> dict[str, list[float]]:
    """Interpolated Witten-Bell, one token at a time with dicts: the slow twin."""
    grams: list[Counter] = [Counter() for _ in range(order + 1)]  # grams[k][(h, w)]
    for k in range(1, order + 1):
        for j in range(len(train) - k + 1):
            grams[k][tuple(train[j : j + k - 1]), train[j + k - 1]] += 1
    total: list[Counter] = [Counter() for _ in range(order + 1)]  # c(h)
    types: list[Counter] = [Counter() for _ in range(order + 1)]  # T(h)
    for k in range(1, order + 1):
        for (h, _), c in grams[k].items():
            total[k][h] += c
            types[k][h] += 1

    def prob(history: list[int], w: int) -> float:
        p = 1.0 / vocab_size
        for k in range(1, order + 1):
            if len(history) < k - 1:
                break
            h = tuple(history[len(history) - (k - 1) :])
            if total[k][h]:
                p = (grams[k][h, w] + types[k][h] * p) / (total[k][h] + types[k][h])
        return p

    return {
        name: [-math.log(prob(e[:i], e[i])) for i in range(1, len(e))] for name, e in evals.items()
    }


def test_matches_dict_reference():
    rng = np.random.default_rng(0)
    V = 7
    # Skewed, id 6 never in training, so some contexts and words are unseen.
    train = rng.choice(6, size=400, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])
    evals = {
        "a": rng.integers(0, V, 60),
        "b": np.concatenate([train[:30], [6, 6, 0]]),
        "one": np.array([3]),
        "two": np.array([3, 6]),
    }
    for order in (1, 2, 3):
        got = bl.ngram_losses(train, evals, order, V)
        want = reference_nll(train.tolist(), {k: e.tolist() for k, e in evals.items()}, order, V)
        for name in evals:
            assert got[name].shape == (len(evals[name]) - 1,)
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-9, err_msg=name)


def test_distributions_sum_to_one():
    V = 6
    train = np.array([0, 1, 2, 1, 2, 3, 0, 1, 2, 4, 4, 1, 2, 3, 0], np.int64)
    contexts = [[0, 1], [1, 2], [4, 4], [5, 5], [2, 5], [0], [3, 0, 1, 2]]
    for order in (1, 2, 3, 4):
        for ctx in contexts:
            evals = {str(w): np.array([*ctx, w]) for w in range(V)}
            nll = bl.ngram_losses(train, evals, order, V)
            total = sum(math.exp(-nll[str(w)][-1]) for w in range(V))
            assert total == pytest.approx(1.0, abs=1e-12), (order, ctx)


def test_higher_order_lowers_training_loss():
    rng = np.random.default_rng(1)
    pattern = rng.integers(0, 20, 12)
    stream = np.tile(pattern, 300)
    noisy = np.where(rng.random(len(stream)) < 0.05, rng.integers(0, 20, len(stream)), stream)
    losses = [bl.ngram_losses(noisy, {"t": noisy}, k, 20)["t"].mean() for k in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)), losses


def test_unigram_of_uniform_stream_is_log_vocab():
    V = 13
    train = np.tile(np.arange(V), 50)
    held_out = np.random.default_rng(2).integers(0, V, 500)
    nll = bl.ngram_losses(train, {"h": held_out}, 1, V)["h"]
    np.testing.assert_allclose(nll, math.log(V), rtol=0, atol=1e-12)


def test_unique_matches_numpy():
    rng = np.random.default_rng(3)
    for domain in (50, 10**7):  # the bincount and the argsort paths
        x = rng.integers(0, domain, 5000)
        want = np.unique(x, return_inverse=True, return_counts=True)
        for got_part, want_part in zip(bl._unique(x, domain), want, strict=True):
            np.testing.assert_array_equal(got_part, want_part)


def test_out_of_range_ids_name_vocab_size():
    with pytest.raises(ValueError, match="vocab_size=4"):
        bl.ngram_losses(np.array([0, 1, 5]), {}, 2, 4)
    with pytest.raises(ValueError, match="order=0"):
        bl.ngram_losses(np.array([0, 1]), {}, 0, 4)


@pytest.fixture
def small_prep(tmp_path) -> data.Prepared:
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(4)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "naïve", "café"]
    for i in range(12):
        (docs / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 60)) + "\n")
    cfg = tiny(
        **{
            "data.corpus": "text",
            "data.paths": str(docs),
            "data.heldout_fraction": 0.1,
            "data.tokenizer": "byte",
            "data.seq_len": 8,
            "data.cache_dir": str(tmp_path / "cache"),
        }
    ).data
    return data.prepare(cfg)


def test_baselines_of_a_prepared_dataset(small_prep, monkeypatch):
    result = bl.baselines(small_prep, orders=(1, 2, 3))
    assert list(result) == ["unigram", "2-gram", "3-gram"]
    for name, by_split in result.items():
        assert set(by_split) == {"validation", "test"}
        for split, r in by_split.items():
            shard = small_prep.splits[split]
            assert all(math.isfinite(v) for v in r.values()), (name, split)
            assert r["tokens"] == shard.n_tokens - 1 and r["bytes"] == shard.n_bytes
            want = r["loss"] * r["tokens"] / r["bytes"] / math.log(2)
            assert r["bits_per_byte"] == pytest.approx(want, rel=1e-12)
    # A better model of text: the trigram beats the unigram on held-out data.
    assert result["3-gram"]["test"]["loss"] < result["unigram"]["test"]["loss"]

    path = bl.cache_path(small_prep)
    assert path.parent == Path(small_prep.splits["train"].path).parent.parent / "baselines"
    assert json.loads(path.read_text()) == result

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(bl, "_nll_by_order", no_recompute)
    assert bl.baselines(small_prep, orders=(1, 2, 3)) == result
    assert bl.baselines(small_prep, orders=(2,)) == {"2-gram": result["2-gram"]}
    monkeypatch.undo()

    more = bl.baselines(small_prep, orders=(1, 4))  # a missing order: computed and merged
    assert more["unigram"] == result["unigram"]
    assert set(json.loads(path.read_text())) == {"unigram", "2-gram", "3-gram", "4-gram"}
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_baselines_match_ngram_losses(small_prep):
    """The summary is the per-token NLL of the full split, as a neural eval scores it."""
    ids = {s: np.asarray(small_prep.splits[s].tokens) for s in ("train", "validation")}
    nll = bl.ngram_losses(ids["train"], {"v": ids["validation"]}, 2, 257)["v"]
    got = bl.baselines(small_prep, orders=(2,))["2-gram"]["validation"]
    assert got["loss"] == pytest.approx(nll.mean(), rel=1e-12)
    n_bytes = small_prep.tokenizer.token_bytes[ids["validation"][1:]].sum()
    assert got["bits_per_byte"] == pytest.approx(data.bits_per_byte(nll.sum(), n_bytes))
