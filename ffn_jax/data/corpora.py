"""Corpora as documents split into train / validation / test, by document.

A :class:`Corpus` hands out the documents (strings) of one split at a time, lazily, so
that a corpus bigger than memory can be tokenised in chunks. ``key`` identifies the
corpus content and its split for the caches.

Local text (``corpus="text"``) and Hugging Face datasets (``corpus="hf"``) are split by
document: documents are ranked by the sha256 of their name (a file's base name, a
dataset row's index) and the first ``round(heldout_fraction * n)`` go to validation,
the next as many to test, the rest to train (at least one each, so at least 3
documents are needed). A streamed dataset, whose length is unknown, puts each row in a
split by its own hash instead (validation below ``heldout_fraction``, test below twice
that). The built-in Shakespeare corpus lives in :mod:`ffn_jax.data.shakespeare`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Corpus:
    """Documents by split.

    name: short tag used in cache file names.
    key: identity of the content and its split (file names, sizes, mtimes, settings).
    read: ``read(split)`` iterates that split's documents as strings.
    n_docs: documents per split, where known (for progress bars).
    """

    name: str
    key: str
    read: Callable[[str], Iterator[str]]
    n_docs: dict[str, int | None]

    def documents(self, split: str) -> Iterator[str]:
        """The documents of ``split`` ("train", "validation" or "test"), in a fixed order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        return self.read(split)


def _unit(name: str) -> float:
    """A deterministic pseudo-random number in [0, 1) from a document name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def assign_splits(names: Sequence[str], fraction: float, what: str) -> dict[str, list[int]]:
    """Split documents by hashed name: ``{split: sorted document indices}``.

    ``what`` names the config field for the error raised with fewer than 3 documents.
    """
    n = len(names)
    if n < 3:
        raise ValueError(
            f"{what}: found {n} document(s) but the by-document split needs at least 3 "
            "(train, validation, test); add documents or split the text into more files"
        )
    k = min(max(1, round(fraction * n)), (n - 1) // 2)
    order = sorted(range(n), key=lambda i: (_unit(names[i]), names[i], i))
    return {
        "validation": sorted(order[:k]),
        "test": sorted(order[k : 2 * k]),
        "train": sorted(order[2 * k :]),
    }


def stream_split(name: str, fraction: float) -> str:
    """The split of one streamed document, from its name's hash alone."""
    u = _unit(name)
    return "validation" if u < fraction else "test" if u < 2 * fraction else "train"


# ---- local text files -------------------------------------------------------------------


def _visible_files(directory: Path) -> list[Path]:
    """Regular files under ``directory``, recursively, skipping hidden files and folders."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def resolve_entry(entry: str) -> list[Path]:
    """The files one ``data.paths`` entry (file, directory or glob) names, each non-empty."""
    expanded = os.path.expanduser(entry)
    if glob.has_magic(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(
                f"data.paths: glob {entry!r} matches no files; fix the pattern or the directory"
            )
    elif os.path.isdir(expanded):
        files = _visible_files(Path(expanded))
        if not files:
            raise ValueError(f"data.paths: directory {entry!r} holds no files; add text files")
    elif os.path.isfile(expanded):
        files = [Path(expanded)]
    else:
        raise FileNotFoundError(
            f"data.paths: {entry!r} does not exist; give existing files, directories or globs"
        )
    for f in files:
        if f.stat().st_size == 0:
            raise ValueError(f"data.paths: {str(f)!r} is empty; remove it or add text to it")
    return files


def path_entries(paths: str) -> list[str]:
    """The comma-separated entries of ``data.paths``, stripped, empty ones dropped."""
    return [p.strip() for p in paths.split(",") if p.strip()]


def read_utf8(path: Path) -> str:
    """A file's text, exactly (no newline translation); ValueError naming it if not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data.paths: {str(path)!r} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); convert it to UTF-8 or remove it from data.paths"
        ) from None


def text_corpus(paths: str, heldout_fraction: float) -> Corpus:
    """Local text files (``data.paths``), one document per file, split by hashed file name."""
    if not path_entries(paths):
        raise ValueError("data.paths is empty; give comma-separated files, directories or globs")
    files = sorted({f.absolute() for e in path_entries(paths) for f in resolve_entry(e)})
    split_idx = assign_splits([f.name for f in files], heldout_fraction, f"data.paths={paths!r}")
    by_split = {s: [files[i] for i in idx] for s, idx in split_idx.items()}
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = json.dumps({"files": stats, "fraction": heldout_fraction})
    return Corpus(
        name="text",
        key=key,
        read=lambda split: (read_utf8(f) for f in by_split[split]),
        n_docs={s: len(v) for s, v in by_split.items()},
    )
