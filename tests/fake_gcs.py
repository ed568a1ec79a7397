"""A ``gs://`` filesystem without a network, for tests: fsspec's ``gcs`` protocol (what
``etils.epath`` opens ``gs://`` URLs with when TensorFlow is absent) served from a local
directory, and orbax's TensorStore kvstore for ``gs://`` pointed at the same directory.

``gs://bucket/run/config.json`` is ``<root>/bucket/run/config.json``. The code under test
sees only URLs and goes through epath -> fsspec as it would with gcsfs; orbax keeps its
object-store code paths (no rename: ``commit_success.txt`` markers), and only its
bucket-layout query (google-cloud-storage) and its TensorStore ``gcs`` driver are replaced.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils


class FakeGCS(DirFileSystem):
    """fsspec's ``gs``/``gcs`` protocol over the local directory ``root``."""

    protocol = ("gs", "gcs")
    cachable = False
    root = ""

    def __init__(self, *args, **kwargs):
        del args, kwargs  # gcsfs options (finalize_on_close, ...): nothing to configure
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))


def install(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve ``gs://`` from ``root`` until the test ends (``monkeypatch`` undoes it)."""
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(FakeGCS, "root", str(root))
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # fsspec, even next to TF
    registry = importlib.import_module("fsspec.registry")  # fsspec.registry: a mapping view
    for name in FakeGCS.protocol:
        monkeypatch.setitem(registry._registry, name, FakeGCS)
    forget_filesystems()

    def kvstore(path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, bucket, key)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)


def forget_filesystems() -> None:
    """Drop epath's cached fsspec filesystems (one per protocol), so the next ``gs://``
    access builds the one registered now; call again after the test."""
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
