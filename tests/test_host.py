"""Host-process settings (ffn_jax/host.py): XLA:CPU default flags, huge-page malloc."""

import os
import subprocess
import sys

import pytest

from ffn_jax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints GLIBC_TUNABLES after use_hugepage_malloc(), then the minor page faults taken while a
# thread (as XLA's do) allocates, fills and frees 256 MiB three times.
PROBE = """
import ctypes, os, resource, threading
from ffn_jax.host import use_hugepage_malloc
use_hugepage_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def churn():
    for _ in range(3):
        p = libc.malloc(256 << 20)
        ctypes.memset(p, 1, 256 << 20)
        libc.free(ctypes.c_void_p(p))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=churn)
t.start()
t.join()
print(os.environ.get("GLIBC_TUNABLES", ""))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env_extra) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
    env.update(env_extra, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return out[0], int(out[1])


def test_wanted_respects_existing_tunable_and_opt_out():
    assert not host.hugepage_malloc_wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not host.hugepage_malloc_wanted({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"})
    assert not host.hugepage_malloc_wanted({host.OPT_OUT: "1"})


@pytest.mark.skipif(
    not host.hugepage_malloc_wanted({}), reason="needs Linux, glibc >= 2.35 and THP in madvise mode"
)
def test_reexec_sets_tunable_and_cuts_page_faults():
    tunables, faults = _probe(GLIBC_TUNABLES="glibc.malloc.check=0")
    assert tunables == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"  # kept, then appended
    _, faults_4k = _probe(**{host.OPT_OUT: "1"})
    # 3 x 256 MiB in 4 KiB pages is ~196k faults; huge pages take ~1/500 of that.
    assert faults_4k > 150_000
    assert faults < faults_4k / 20


YNN = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-dot"

# Prints whether the compiled CPU program of a matmul uses a YNNPACK fusion.
YNN_PROBE = """
import sys
if sys.argv[1] == "prepare":
    from ffn_jax.host import prepare_process
    prepare_process()
import jax, jax.numpy as jnp
x = jnp.ones((256, 256))
print("__ynn_fusion" in jax.jit(lambda a, b: a @ b).lower(x, x).compile().as_text())
"""


def test_xla_cpu_defaults_added_once_and_user_value_kept():
    assert host.with_xla_defaults("") == YNN
    flags = "--xla_force_host_platform_device_count=8"
    assert host.with_xla_defaults(f" {flags} ") == f"{flags} {YNN}"
    assert host.with_xla_defaults(f"{flags} {YNN}") == f"{flags} {YNN}"
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert host.with_xla_defaults(mine) == mine


def _uses_ynn(mode: str, xla_flags: str) -> bool:
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": xla_flags, host.OPT_OUT: "1"}
    out = subprocess.run(
        [sys.executable, "-c", YNN_PROBE, mode], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[-1] == "True"


def test_prepare_process_takes_matmuls_from_ynnpack():
    assert _uses_ynn("plain", "")  # XLA's default: the matmul is a YNNPACK fusion
    assert not _uses_ynn("prepare", "")
    # A user's own setting of the flag wins: here it asks for YNNPACK dots, and gets them.
    assert _uses_ynn("prepare", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
