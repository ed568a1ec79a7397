"""Host-process settings that must be in place before JAX starts: :func:`prepare_process`.

**XLA flags.** On CPU (:func:`guess_platform`) :data:`XLA_CPU_DEFAULTS` are added to
``XLA_FLAGS``, on GPU :data:`XLA_GPU_DEFAULTS`, unless the user's ``XLA_FLAGS`` already
names the flag (so each is overridable); ``FFN_JAX_NO_XLA_DEFAULTS=1`` adds none.
``xla_cpu_experimental_ynn_fusion_type=-individual_dot,-dot`` takes matmuls away from
YNNPACK (XLA:CPU's default for them) and gives them to Eigen, keeping YNNPACK's reductions
and elementwise fusions: Eigen runs the MoE experts' batched matmuls faster and leaves the
dense steps as they were (measured in ``docs/perf.md``). XLA_FLAGS is read when the backend
starts, so setting the environment before the first JAX call is enough.

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
# On GPU: XLA's latency-hiding scheduler overlaps collectives with compute (what MaxText
# and the JAX GPU performance guide turn on first for data/FSDP parallel training).
XLA_GPU_DEFAULTS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
OPT_OUT_XLA = "FFN_JAX_NO_XLA_DEFAULTS"  # set (to anything) to add no XLA flags
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FFN_JAX_NO_HUGEPAGES"  # set (to anything) to keep the process as it is
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def with_xla_defaults(xla_flags: str, defaults: tuple[str, ...] = XLA_CPU_DEFAULTS) -> str:
    """``xla_flags`` plus each flag of ``defaults`` it does not set itself."""
    given = {f.split("=", 1)[0] for f in xla_flags.split()}
    extra = [f for f in defaults if f.split("=", 1)[0] not in given]
    return " ".join([xla_flags.strip(), *extra]).strip()


def guess_platform(environ: dict[str, str] | None = None, root: str = "/dev") -> str:
    """The platform JAX will start on (``"cpu"``, ``"gpu"`` or ``"tpu"``), guessed before it
    starts (its flags must be set by then): the first of ``JAX_PLATFORMS`` when set, else
    an NVIDIA or AMD GPU device node (``nvidia0``, ``kfd``) means ``gpu`` and a TPU one
    (``accel0``, ``vfio/0``) ``tpu``; ``cpu`` otherwise. Each platform gets only its own XLA
    flags: a flag XLA does not know is a fatal error."""
    env = os.environ if environ is None else environ
    first = env.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if first:
        return {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}.get(first, "cpu")
    if any(os.path.exists(os.path.join(root, n)) for n in ("nvidia0", "kfd")):
        return "gpu"
    if any(os.path.exists(os.path.join(root, n)) for n in ("accel0", "vfio/0")):
        return "tpu"
    return "cpu"


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
    """Call first in an entry point, before JAX starts: adds the platform's XLA defaults
    (:data:`XLA_CPU_DEFAULTS` or :data:`XLA_GPU_DEFAULTS`, by :func:`guess_platform`; none
    with ``FFN_JAX_NO_XLA_DEFAULTS`` set) to ``XLA_FLAGS``, then (when it helps)
    re-executes the process with huge-page malloc."""
    defaults = {"cpu": XLA_CPU_DEFAULTS, "gpu": XLA_GPU_DEFAULTS}.get(guess_platform(), ())
    if OPT_OUT_XLA not in os.environ:
        os.environ["XLA_FLAGS"] = with_xla_defaults(os.environ.get("XLA_FLAGS", ""), defaults)
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
