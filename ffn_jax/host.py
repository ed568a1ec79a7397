"""Host-process settings that must be in place before JAX starts: :func:`prepare_process`.

**XLA:CPU flags.** :data:`XLA_CPU_DEFAULTS` are added to ``XLA_FLAGS`` unless the user's
``XLA_FLAGS`` already names the flag. ``xla_cpu_experimental_ynn_fusion_type=-individual_dot,
-dot`` takes matmuls away from YNNPACK (XLA:CPU's default for them) and gives them to
Eigen, keeping YNNPACK's reductions and elementwise fusions: Eigen runs the MoE experts'
batched matmuls faster and leaves the dense steps as they were (measured in
``docs/perf.md``). XLA_FLAGS is read when the backend starts, so setting the environment
before the first JAX call is enough.

**Huge-page malloc.** XLA:CPU allocates a step's temporaries afresh on every execution.
glibc serves blocks that large with new anonymous mappings, so with 4 KiB pages the kernel
takes a page fault per page touched, on every step. The glibc tunable
``glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes malloc advise those mappings for
transparent huge pages, which removes almost all of those faults (the fault counts and step
times are in ``docs/perf.md``). Tunables are read only when a process starts, so
:func:`use_hugepage_malloc` re-executes the entry point once with it set.
"""

from __future__ import annotations

import os
import sys

XLA_CPU_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-dot",)
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FFN_JAX_NO_HUGEPAGES"  # set (to anything) to keep the process as it is
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def with_xla_cpu_defaults(xla_flags: str) -> str:
    """``xla_flags`` plus each :data:`XLA_CPU_DEFAULTS` flag it does not set itself."""
    given = {f.split("=", 1)[0] for f in xla_flags.split()}
    extra = [f for f in XLA_CPU_DEFAULTS if f.split("=", 1)[0] not in given]
    return " ".join([xla_flags.strip(), *extra]).strip()


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def _thp_on_request() -> bool:
    """Whether the kernel gives huge pages to mappings that ask (mode ``[madvise]``)."""
    try:
        with open(_THP_MODE) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def hugepage_malloc_wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether :func:`use_hugepage_malloc` would re-execute: Linux with glibc >= 2.35,
    THP in ``madvise`` mode (``always`` needs nothing), the tunable not yet set and no
    ``FFN_JAX_NO_HUGEPAGES`` opt-out."""
    env = os.environ if environ is None else environ
    if OPT_OUT in env or HUGEPAGE_TUNABLE in env.get("GLIBC_TUNABLES", ""):
        return False
    version = _glibc_version()
    return (
        sys.platform == "linux" and version is not None and version >= (2, 35) and _thp_on_request()
    )


def prepare_process() -> None:
    """Call first in an entry point, before JAX starts: sets the XLA:CPU defaults in
    ``XLA_FLAGS``, then (when it helps) re-executes the process with huge-page malloc."""
    os.environ["XLA_FLAGS"] = with_xla_cpu_defaults(os.environ.get("XLA_FLAGS", ""))
    use_hugepage_malloc()


def use_hugepage_malloc() -> None:
    """Re-execute this process with ``glibc.malloc.hugetlb=1`` when that helps (see module
    docstring); returns without doing anything otherwise. Call it first in an entry point,
    before anything slow has happened (the process image is replaced)."""
    if not hugepage_malloc_wanted():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), HUGEPAGE_TUNABLE) if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
