"""Hugging Face ``datasets`` corpora (``corpus="hf"``), split by document.

``data.hf_name`` is either a directory written by ``Dataset.save_to_disk`` (read with
``datasets.load_from_disk``, fully offline) or a dataset name for ``load_dataset``
(offline from the local HF cache when ``HF_DATASETS_OFFLINE=1``). With
``data.hf_streaming`` the rows are streamed, never all held in memory, and each split
is a separate pass over the stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ffn_jax.data.corpora import Corpus, assign_splits, stream_split

_ROWS_PER_READ = 1000


def _load(cfg: Any) -> Any:
    """The dataset (``Dataset`` or ``IterableDataset``) that ``cfg`` names."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "data.corpus='hf' needs the datasets package; install it: pip install datasets"
        ) from None
    name, split = cfg.hf_name, cfg.hf_split
    try:
        if os.path.isdir(os.path.expanduser(name)):
            ds = datasets.load_from_disk(os.path.expanduser(name))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(
                        f"data.hf_split={split!r} is not in {name!r}; use one of {list(ds)}"
                    )
                ds = ds[split]
            return ds.to_iterable_dataset() if cfg.hf_streaming else ds
        return datasets.load_dataset(
            name, cfg.hf_config or None, split=split, streaming=cfg.hf_streaming
        )
    except ValueError:
        raise
    except Exception as e:  # any loader failure becomes one actionable line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"data.hf_name={name!r}: could not load it ({type(e).__name__}: {msg}); check "
            "hf_name/hf_config/hf_split, or give a directory written by save_to_disk"
        ) from None


def _text(row: dict[str, Any], field: str, where: str) -> str:
    """The document text of one row; ValueError if the field is missing or not a string."""
    if field not in row:
        raise ValueError(f"data.hf_text_field={field!r} is not a column; columns: {list(row)}")
    value = row[field]
    if not isinstance(value, str):
        raise ValueError(
            f"data.hf_text_field={field!r}: {where} holds {type(value).__name__}, not text; "
            "pick a string column"
        )
    return value


def hf_corpus(cfg: Any) -> Corpus:
    """The ``hf`` corpus that the data config ``cfg`` describes."""
    import datasets

    ds = _load(cfg)
    field, fraction, max_docs = cfg.hf_text_field, cfg.heldout_fraction, cfg.hf_max_docs
    settings = [cfg.hf_name, cfg.hf_config, cfg.hf_split, field, max_docs, fraction]

    if isinstance(ds, datasets.IterableDataset):
        stream = ds.take(max_docs) if max_docs else ds

        def read_stream(split: str) -> Iterator[str]:
            for i, row in enumerate(stream):
                if stream_split(str(i), fraction) == split:
                    yield _text(row, field, f"row {i}")

        key = json.dumps({"hf": settings, "streaming": True})
        return Corpus("hf", key, read_stream, {"train": None, "validation": None, "test": None})

    if field not in ds.column_names:
        raise ValueError(
            f"data.hf_text_field={field!r} is not a column; columns: {ds.column_names}"
        )
    if max_docs:
        ds = ds.select(range(min(max_docs, len(ds))))
    split_idx = assign_splits(
        [str(i) for i in range(len(ds))], fraction, f"data.hf_name={cfg.hf_name!r}"
    )

    def read_rows(split: str) -> Iterator[str]:
        idx = split_idx[split]
        for start in range(0, len(idx), _ROWS_PER_READ):
            chunk = idx[start : start + _ROWS_PER_READ]
            for i, value in zip(chunk, ds.select(chunk)[field], strict=True):
                yield _text({field: value}, field, f"row {i}")

    files = [
        (f["filename"], os.path.getsize(f["filename"]), os.stat(f["filename"]).st_mtime_ns)
        for f in ds.cache_files
    ]
    key = json.dumps({"hf": settings, "files": files})
    return Corpus("hf", key, read_rows, {s: len(v) for s, v in split_idx.items()})
