"""Checking a config before anything is written, and the run's ``config.json``.

``validate_config`` collects every problem (one line each: field, value, fix) so a user
sees them all at once. ``check_workdir`` refuses to mix an incompatible config into a
workdir that already holds a run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

import jax
from ml_collections import ConfigDict

from ffn_jax import data as data_lib
from ffn_jax import optim, sharding
from ffn_jax.ffn import VARIANTS
from ffn_jax.model import LEGACY_DEFAULTS, dense_d_ff, model_problems, option

log = logging.getLogger(__name__)

# Fields that may change when a run is resumed (they do not change what is computed).
RESUMABLE_FIELDS = (
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "train.resume", "train.profile_steps",
    "data.cache_dir", "data.num_workers", "mesh.", "model.vocab_size", "model.attention",
    "model.remat", "model.scan_layers", "distributed.",
)


class ConfigError(ValueError):
    """One or more config problems; ``str()`` lists them one per line."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _train_problems(t: ConfigDict, batch_size: int) -> list[str]:
    p = []
    if t.steps <= 0:
        p.append(f"train.steps={t.steps} must be positive")
    if not t.lr > 0:
        p.append(f"train.lr={t.lr} must be positive, e.g. 1e-3")
    if t.warmup_steps < 0 or (t.steps > 0 and t.warmup_steps >= t.steps):
        p.append(f"train.warmup_steps={t.warmup_steps} must be in [0, train.steps={t.steps}); "
                 "shorten the warmup or train longer")
    if t.schedule not in optim.SCHEDULES:
        p.append(f"train.schedule={t.schedule!r} is unknown; use one of {optim.SCHEDULES}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    for field in ("weight_decay", "grad_clip", "logits_z_loss"):
        if t[field] < 0:
            p.append(f"train.{field}={t[field]} must be >= 0")
    if t.grad_accum < 1 or batch_size % max(1, t.grad_accum):
        p.append(f"train.grad_accum={t.grad_accum} must be >= 1 and divide data.batch_size="
                 f"{batch_size}")
    for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if t[field] < 1:
            p.append(f"train.{field}={t[field]} must be >= 1")
    for field in ("eval_every", "eval_batches"):
        if t[field] < 0:
            p.append(f"train.{field}={t[field]} must be >= 0 (0 = at the end / whole split)")
    m = re.fullmatch(r"(\d+):(\d+)", t.profile_steps) if t.profile_steps else None
    if t.profile_steps and not (m and int(m[1]) < int(m[2])):
        p.append(f"train.profile_steps={t.profile_steps!r} must be 'start:stop' with "
                 "start < stop, e.g. 10:15")
    return p


def _mesh_problems(config: ConfigDict, num_devices: int) -> list[str]:
    try:
        rules = sharding.rules_from_config(config.mesh)
        sizes = sharding.resolve_mesh_shape(dict(config.mesh.shape), num_devices)
    except ValueError as e:
        return [str(e)]

    def ways(logical: str) -> int:
        return sharding.shard_count(logical, rules, sizes)

    p = []
    b = config.data.batch_size
    dp = ways("batch") * max(1, config.train.grad_accum)
    if b % dp:
        p.append(f"data.batch_size={b} is not divisible by the data-parallel size {ways('batch')}"
                 f" x train.grad_accum={config.train.grad_accum}; use a multiple of {dp}")
    if b % jax.process_count():
        p.append(f"data.batch_size={b} is not divisible by the {jax.process_count()} processes")
    return p + sharded_dim_problems(config, ways)


def sharded_dim_problems(config: ConfigDict, ways) -> list[str]:
    """Model dimensions that the mesh axes they are sharded over do not divide."""
    m = config.model
    dims = [("embed", m.d_model, "model.d_model"), ("heads", m.n_heads, "model.n_heads"),
            ("kv_heads", m.n_kv_heads, "model.n_kv_heads")]
    if m.ffn in VARIANTS:
        dims.append(("mlp", dense_d_ff(m), "model.d_ff"))
    if m.vocab_size:
        dims.append(("vocab", m.vocab_size, "model.vocab_size"))
    if m.moe.num_experts > 0:
        dims.append(("expert", m.moe.num_experts * m.moe.granularity, "model.moe.num_experts"))
    p = []
    for logical, dim, field in dims:
        n = ways(logical)
        if dim > 0 and dim % n:
            p.append(f"{field}={dim} is not divisible by the {n}-way sharding of logical axis "
                     f"{logical!r}; change {field} or mesh.shape")
    return p


def check_sharded_dims(config: ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raise ConfigError if a model dimension does not divide its sharding (vocab included)."""
    rules = sharding.rules_from_config(config.mesh)

    def ways(logical: str) -> int:
        return sharding.shard_count(logical, rules, mesh.shape)

    problems = sharded_dim_problems(config, ways)
    if problems:
        raise ConfigError(problems)


def validate_config(config: ConfigDict, num_devices: int | None = None) -> list[str]:
    """Every problem of ``config`` (empty list if none), checked before anything is written."""
    num_devices = num_devices or jax.device_count()
    try:
        shape = sharding.resolve_mesh_shape(dict(config.mesh.shape), num_devices)
    except ValueError:
        shape = None  # reported by _mesh_problems
    p = model_problems(config.model, shape)
    p += data_lib.validate(config.data)
    if (option(config.model, "positions") == "learned"
            and config.data.seq_len > option(config.model, "max_seq_len")):
        p.append(f"data.seq_len={config.data.seq_len} is longer than model.max_seq_len="
                 f"{option(config.model, 'max_seq_len')} (learned positions); raise "
                 "model.max_seq_len")
    p += _train_problems(config.train, config.data.batch_size)
    p += _mesh_problems(config, num_devices)
    return list(dict.fromkeys(p))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """Fields that differ between two config dicts and matter for resuming."""
    a, b = _flatten(old), _flatten(json.loads(json.dumps(new)))
    for field, default in LEGACY_DEFAULTS.items():  # configs written before the field existed
        a.setdefault(f"model.{field}", default)
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys
        if a.get(k) != b.get(k) and not any(k.startswith(f) for f in RESUMABLE_FIELDS)
    ]


def load_config(workdir: str) -> ConfigDict:
    """The resolved config a run wrote to ``workdir/config.json``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir={workdir} holds no run (no config.json); train "
                                "into it first with train.py")
    with open(path) as f:
        return ConfigDict(json.load(f))


def check_workdir(config: ConfigDict, workdir: str) -> ConfigDict:
    """Refuse an incompatible existing run in ``workdir`` (unless ``train.resume=False``,
    which moves the old run aside to ``<workdir>.old-<time>`` so nothing is lost)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return config
    with open(path) as f:
        old = json.load(f)
    diff = config_diff(old, config.to_dict())
    if config.train.resume and diff:
        raise ConfigError(
            f"--workdir={workdir} holds a run with a different config ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}); use a new --workdir, or pass "
            "--config.train.resume=False to move the old run aside and start over"
        )
    if not config.train.resume and jax.process_index() == 0:
        aside = f"{workdir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(workdir, aside)
        log.warning("train.resume=False: moved the existing run in %s to %s", workdir, aside)
    return config


def write_config(config: ConfigDict, workdir: str) -> None:
    """Write the resolved config as JSON (atomically; process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
