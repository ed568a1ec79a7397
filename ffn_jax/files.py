"""Workdir files through ``etils.epath``: a local directory or an object-store URL.

A workdir is either a local path (made absolute, as before) or a URL that epath opens
through fsspec: ``gs://bucket/runs/x`` (needs ``gcsfs``; orbax checkpoints there also need
``google-cloud-storage``: ``pip install -e .[gcs]``), ``s3://`` (``s3fs``). Every file of a
run — config, metrics, TensorBoard events, eval and sweep files, reports and plots —
is read and written through these helpers or ``epath.Path``; orbax takes the same path.

Atomic writes: on a local disk a file is written under a unique temporary name next to
it and renamed into place (readers never see half a file, concurrent writers never
collide). An object store has no atomic rename (a rename is a copy and a delete) but
replaces an object whole on every upload, so there a file is written directly: readers
still see the old or the new content, never a mix.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import secrets
from typing import Any

from etils import epath

PathLike = epath.PathLike


def is_url(path: PathLike) -> bool:
    """Whether ``path`` names an object-store URL (``gs://...``), not a local file."""
    return "://" in os.fspath(path)


def normalize_workdir(workdir: PathLike) -> str:
    """The workdir the entry points use: a URL as it is, a local path made absolute
    (``os.path.abspath`` would turn ``gs://b/run`` into ``$PWD/gs:/b/run``)."""
    return os.fspath(workdir) if is_url(workdir) else os.path.abspath(workdir)


def check_workdir_backend(workdir: PathLike) -> None:
    """Raise ValueError (one line, with the fix) if the URL ``workdir`` names a filesystem
    this installation cannot open: fsspec's backend for it (gcsfs for ``gs://``) is missing
    and epath cannot fall back on TensorFlow's ``tf.io.gfile``. A local path passes."""
    if not is_url(workdir) or importlib.util.find_spec("tensorflow") is not None:
        return
    import fsspec

    protocol = os.fspath(workdir).split("://", 1)[0]
    try:
        fsspec.get_filesystem_class("gcs" if protocol == "gs" else protocol)
    except (ImportError, ValueError) as e:
        raise ValueError(
            f"--workdir={workdir}: {' '.join(str(e).split())}; for gs:// install the "
            "extras: pip install -e '.[gcs]'"
        ) from None


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, creating its directory: atomically (a unique
    temporary file renamed into place) on a local disk, one whole-object upload on an
    object store (see the module docstring)."""
    final = epath.Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_url(final):
        final.write_text(text, encoding="utf-8")
        return
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)


def read_text(path: PathLike) -> str:
    """The UTF-8 text of ``path`` (undecodable bytes replaced)."""
    return epath.Path(path).read_bytes().decode("utf-8", errors="replace")


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` with :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike) -> Any:
    """The JSON in ``path``; ValueError naming the file and the position if it is corrupt."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
            f"{e.colno}); restore it or move the run aside"
        ) from None


def files_under(root: PathLike) -> list[epath.Path]:
    """Every file below the directory ``root``, recursively, sorted. (``epath.Path.walk``
    yields its roots without the URL scheme on fsspec filesystems, so it is not used.)"""
    out = []
    for p in epath.Path(root).iterdir():
        out.extend(files_under(p) if p.is_dir() else [p])
    return sorted(out, key=os.fspath)


def write_figure(fig: Any, path: PathLike, dpi: int = 120) -> None:
    """Save the matplotlib figure ``fig`` as a PNG at ``path``, in one write."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    epath.Path(path).write_bytes(buf.getvalue())
