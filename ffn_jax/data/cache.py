"""The on-disk cache: where it lives, content keys, and atomic writes.

Every cache file is written under a temporary name in its final directory and moved
into place with ``os.replace``, so a crash or an error never leaves a half-written
file under a name that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

ENV_VAR = "FFN_JAX_CACHE"


def cache_root(cache_dir: str = "") -> Path:
    """``cache_dir`` if set, else ``$FFN_JAX_CACHE``, else ``~/.cache/ffn_jax`` (absolute)."""
    root = cache_dir or os.environ.get(ENV_VAR) or "~/.cache/ffn_jax"
    return Path(root).expanduser().absolute()


def digest(*parts: str, length: int = 16) -> str:
    """A short hex sha256 of the parts (joined by newlines): a stable cache key."""
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:length]


def file_sha256(path: Path) -> str:
    """The full hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success move it onto ``final``.

    On an exception the temporary file is removed and ``final`` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
