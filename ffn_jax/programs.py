"""Compiled programs shared by the runs of a sweep.

Runs that differ only in name, group, seed, learning rate and host-loop settings (the
points of an LR sweep, the seeds of a comparison, a tuning run scored on validation only)
compile to the same programs: the seed enters the initialiser
and the learning rate the optimiser state as traced values (``ffn_jax.optim``). So a
process keeps each program (initialiser, train step, eval step) under the *program key* of
its run, everything else of the run's config, and a sweep compiles each variant once.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from typing import Any, TypeVar

import jax

from ffn_jax.spec import RunSpec

T = TypeVar("T")

# Config fields that do not shape the programs: traced per run (seed, lr) or read only by
# the host loop (what to evaluate or save, and when).
PER_RUN = {
    "": ("name", "seed", "group"),
    "train": (
        "lr",
        "final_eval",
        "eval_splits",
        "log_every",
        "eval_every",
        "eval_batches",
        "final_val_batches",
        "checkpoint_every",
        "keep_checkpoints",
        "resume",
        "profile_steps",
    ),
}
MAX_PROGRAMS = 64  # a sweep of 11 variants holds 3 each; older ones are dropped first

_cache: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()


def program_key(spec: RunSpec) -> str:
    """Everything of ``spec`` that shapes its compiled programs: the resolved config without
    the per-run fields ``PER_RUN``, the resolved mesh shape and the devices."""
    src = {k: v for k, v in spec.source.items() if k not in PER_RUN[""]}
    src["train"] = {k: v for k, v in src["train"].items() if k not in PER_RUN["train"]}
    src["resolved_mesh"] = dict(spec.mesh.shape)
    src["devices"] = [d.id for d in jax.devices()]
    return json.dumps(src, sort_keys=True, default=str)


def cached(kind: str, spec: RunSpec, make: Callable[[], T]) -> tuple[T, bool]:
    """The program ``kind`` of ``spec``'s program key, made by ``make()`` on first use;
    returns ``(program, hit)``."""
    key = (kind, program_key(spec))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key], True
    program = _cache[key] = make()
    while len(_cache) > MAX_PROGRAMS:
        _cache.popitem(last=False)
    return program, False


def clear() -> None:
    """Forget every kept program (tests; a process that changes devices)."""
    _cache.clear()
