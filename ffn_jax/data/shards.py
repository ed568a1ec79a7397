"""Token shards: a split tokenised once into a memory-mapped array on disk.

A shard is ``<key>.bin`` (the ids, uint16 or uint32, native byte order) plus
``<key>.json`` (token count, UTF-8 byte count, tokenizer hash, dtype, ...), cached
under a key of (corpus content and split rule, split, tokenizer hash). The stream is
``EOT doc_1 EOT doc_2 ... EOT doc_n``: every document is preceded by the end-of-text
id, so every text token has a left context and the bytes of all tokens after the first
add up to the split's UTF-8 byte count. Both files are written atomically, the JSON
last, so a shard is either complete or absent.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ffn_jax.data.cache import atomic_path, digest, write_text_atomic
from ffn_jax.data.corpora import Corpus
from ffn_jax.data.tokenizer import Tokenizer

FORMAT = 1
CHUNK_CHARS = 8 << 20  # characters of text per encode_batch call

log = logging.getLogger(__name__)


@dataclass
class TokenShard:
    """One tokenised split on disk.

    path: the ``.bin`` file; n_tokens: ids in it (EOTs included); n_bytes: UTF-8 bytes
    of the split's text; dtype: the id dtype; meta: the whole JSON metadata.
    """

    path: Path
    n_tokens: int
    n_bytes: int
    dtype: np.dtype
    meta: dict[str, Any]

    @functools.cached_property
    def tokens(self) -> np.memmap:
        """The ids, a read-only 1-D memmap of shape (n_tokens,)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


def shard_path(cache: Path, corpus: Corpus, split: str, tokenizer: Tokenizer) -> Path:
    """Where the ``.bin`` of (corpus, split, tokenizer) lives; the ``.json`` sits beside it."""
    key = digest(corpus.key, split, tokenizer.hash, str(FORMAT))
    return cache / "shards" / f"{corpus.name}-{split}-{key}.bin"


def load_shard(path: Path, tokenizer: Tokenizer) -> TokenShard | None:
    """The complete shard at ``path`` made with ``tokenizer``, or None."""
    meta_path = path.with_suffix(".json")
    if not (meta_path.exists() and path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError):  # corrupt metadata: rebuild the shard
        log.warning("%s is corrupt; rebuilding the shard", meta_path)
        return None
    complete = path.stat().st_size == meta["n_tokens"] * dtype.itemsize
    if meta.get("format") != FORMAT or meta["tokenizer_hash"] != tokenizer.hash or not complete:
        return None
    return TokenShard(path, meta["n_tokens"], meta["n_bytes"], dtype, meta)


def _chunks(docs: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Group documents into lists of about ``max_chars`` characters."""
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def write_shard(path: Path, corpus: Corpus, split: str, tokenizer: Tokenizer) -> TokenShard:
    """Tokenise ``split`` of ``corpus`` into ``path`` (+ ``.json``) with a progress bar.

    Documents are encoded in parallel (``encode_batch``) a chunk at a time, so memory
    stays bounded by the chunk size whatever the corpus size.
    """
    dtype = tokenizer.dtype
    eot = np.array([tokenizer.eot_id], dtype).tobytes()
    n_tokens = n_bytes = n_docs = 0
    bar = tqdm(
        total=corpus.n_docs[split],
        unit="doc",
        desc=f"tokenize {corpus.name}/{split}",
        disable=None,
        leave=False,
    )
    with bar, atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in _chunks(corpus.documents(split), CHUNK_CHARS):
            for doc, ids in zip(chunk, tokenizer.encode_batch(chunk), strict=True):
                f.write(eot)
                f.write(ids.astype(dtype).tobytes())
                n_tokens += 1 + len(ids)
                n_bytes += len(doc.encode("utf-8"))
            n_docs += len(chunk)
            bar.update(len(chunk))
        if n_docs == 0:
            raise ValueError(
                f"the {split} split of the {corpus.name} corpus has no documents; add documents "
                "or raise data.heldout_fraction"
            )
    meta = {
        "format": FORMAT,
        "corpus": corpus.name,
        "split": split,
        "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_documents": n_docs,
    }
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1))
    return TokenShard(path, n_tokens, n_bytes, dtype, meta)


def get_shard(cache: Path, corpus: Corpus, split: str, tokenizer: Tokenizer) -> TokenShard:
    """The cached shard of (corpus, split, tokenizer), tokenising it on first use."""
    path = shard_path(cache, corpus, split, tokenizer)
    return load_shard(path, tokenizer) or write_shard(path, corpus, split, tokenizer)
