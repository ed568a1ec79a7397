"""Multi-host start-up: ``jax.distributed.initialize`` from the distributed spec
(``config.distributed``, see ``ffn_jax.spec.DistributedSpec``).

Every process of a multi-host job runs the same ``train.py`` command; before anything asks
jax about devices, :func:`initialize` connects the processes so that ``jax.devices()`` lists
the devices of all hosts and one jitted step runs on the global mesh.

``distributed.initialize`` says when to connect:

* ``"never"``: a single process (the default case on one CPU, one GPU or one TPU VM host).
* ``"always"``: call ``jax.distributed.initialize``; fields left at their "auto" values
  (``coordinator_address=""``, ``num_processes=0``, ``process_id=-1``) are detected by jax
  (Cloud TPU, SLURM, Kubernetes with ``jax[k8s]``, Open MPI, ``JAX_COORDINATOR_ADDRESS``).
* ``"auto"`` (default): connect when this process is evidently one of several
  (:func:`cluster_hint`): explicit fields (a coordinator address or ``num_processes > 1``),
  ``JAX_COORDINATOR_ADDRESS`` in the environment, a SLURM step with more than one task, or
  a Cloud TPU VM (multi-host TPU environment variables, or libtpu and TPU chips present).

An unreachable coordinator, or a process that never joins, would make jax abort the process
with a native stack trace once its own timeout passes; a watchdog ends it first with one
clear line and exit code :data:`TIMEOUT_EXIT_CODE` after ``distributed.timeout_s``.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import jax

if TYPE_CHECKING:
    from ffn_jax.spec import DistributedSpec

from ffn_jax.configuration import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

MODES = ("auto", "always", "never")
TIMEOUT_EXIT_CODE = 3
GRACE_S = 10  # jax's own initialization timeout = ours + this, so ours fires first
TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedInitError(RuntimeError):
    """``jax.distributed.initialize`` could not run (e.g. jax already started its backend)."""


def config_problems(cfg: DistributedSpec) -> list[str]:
    """Every problem of ``config.distributed``, one line each (field, value, fix)."""
    p = []
    if cfg.initialize not in MODES:
        p.append(f"distributed.initialize={cfg.initialize!r} is unknown; use one of {MODES}")
    if cfg.num_processes < 0:
        p.append(f"distributed.num_processes={cfg.num_processes} must be >= 0 (0 = detect)")
    if cfg.process_id < -1 or 0 < cfg.num_processes <= cfg.process_id:
        p.append(
            f"distributed.process_id={cfg.process_id} must be -1 (detect) or in "
            f"[0, distributed.num_processes={cfg.num_processes})"
        )
    if cfg.coordinator_address and not re.fullmatch(r".+:\d+", cfg.coordinator_address):
        p.append(
            f"distributed.coordinator_address={cfg.coordinator_address!r} must look "
            "like host:port, e.g. 10.0.0.1:1234 (or be empty to detect it)"
        )
    if not cfg.timeout_s > 0:
        p.append(f"distributed.timeout_s={cfg.timeout_s} must be positive, e.g. 300")
    if cfg.initialize == "never" and (cfg.coordinator_address or cfg.num_processes > 1):
        p.append(
            "distributed.initialize='never' contradicts distributed.coordinator_address/"
            "num_processes; use 'auto' or 'always'"
        )
    return p


def _on_cloud_tpu_vm() -> bool:
    """libtpu is installed and TPU chips are attached (accel or vfio device files)."""
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def cluster_hint(cfg: DistributedSpec, env: Mapping[str, str] | None = None) -> str | None:
    """Why this process looks like one of several (a short reason), or None."""
    env = os.environ if env is None else env
    if cfg.coordinator_address or cfg.num_processes > 1:
        return "distributed.coordinator_address/num_processes are set"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if tasks.isdigit() and int(tasks) > 1 and "SLURM_PROCID" in env:
        return f"SLURM step with {tasks} tasks"
    found = [v for v in TPU_ENV_VARS if env.get(v)]
    if found:
        return f"{found[0]} is set"
    if _on_cloud_tpu_vm():
        return "Cloud TPU VM"
    return None


def should_initialize(
    cfg: DistributedSpec, env: Mapping[str, str] | None = None
) -> tuple[bool, str]:
    """Whether to call ``jax.distributed.initialize`` and why (for the log)."""
    if cfg.initialize == "never":
        return False, "distributed.initialize='never'"
    if cfg.initialize == "always":
        return True, "distributed.initialize='always'"
    hint = cluster_hint(cfg, env)
    return (True, hint) if hint else (False, "no multi-process environment detected")


def _timeout_message(cfg: DistributedSpec) -> str:
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "(detected)"
    n = cfg.num_processes or "(detected)"
    pid = cfg.process_id if cfg.process_id >= 0 else "(detected)"
    return (
        f"jax.distributed.initialize did not finish within distributed.timeout_s="
        f"{cfg.timeout_s}: process {pid} of {n} could not reach the coordinator {address} "
        "or not every process joined; check that the address (host:port of process 0) is "
        "reachable from every host and the same on all, that num_processes is right and "
        "that every process was started"
    )


def _watchdog(cfg: DistributedSpec) -> threading.Timer:
    """A started timer that ends the process with one clear line after ``timeout_s``."""

    def expire() -> None:
        print(f"error: {_timeout_message(cfg)}", file=sys.stderr, flush=True)
        os._exit(TIMEOUT_EXIT_CODE)  # the main thread is blocked in native code

    timer = threading.Timer(cfg.timeout_s, expire)
    timer.daemon = True
    timer.start()
    return timer


def initialize(cfg: DistributedSpec) -> bool:
    """Connect this process to the others if ``cfg`` (``config.distributed``) says so.

    Call before anything touches jax devices. Returns True if jax.distributed is (now)
    initialised. Raises ConfigError on bad fields, DistributedInitError if jax refuses.
    """
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)
    if jax.distributed.is_initialized():
        return True
    go, why = should_initialize(cfg)
    if not go:
        log.debug("single process: %s", why)
        return False
    log.info("initialising jax.distributed (%s)", why)
    timer = _watchdog(cfg)
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address or None,
            num_processes=cfg.num_processes or None,
            process_id=cfg.process_id if cfg.process_id >= 0 else None,
            initialization_timeout=int(cfg.timeout_s) + GRACE_S,
        )
    except (RuntimeError, ValueError, TypeError) as e:
        raise DistributedInitError(
            f"jax.distributed.initialize failed ({why}): {str(e).splitlines()[0]}; "
            "set distributed.coordinator_address, num_processes and process_id explicitly, "
            "or distributed.initialize='never' for a single process"
        ) from e
    finally:
        timer.cancel()
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def log_from_process_zero_only() -> None:
    """Raise the root log level to WARNING on every process but 0 (INFO logs once per job)."""
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)


def process_zero_first(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on process 0, then on every other process once process 0 has finished it (a
    barrier named ``name``): e.g. preparing a shared corpus cache once, not once per process,
    the others then reading it. One process: just ``fn()``."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        out = fn()
        multihost_utils.sync_global_devices(name)
        return out
    multihost_utils.sync_global_devices(name)
    return fn()
