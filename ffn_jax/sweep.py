"""Sweeps: train every variant x seed of a comparison config into ``DIR/<variant>-s<seed>/``.

A sweep config is a base config plus a ``sweep`` block:

    sweep.variants   comma-separated names: dense variants of the FFN registry, or presets
                     named in ``sweep.presets`` (each a dict of ``config.model`` and
                     ``config.model.moe`` fields, e.g. an MoE or the 2017 post-norm block)
    sweep.seeds      number of seeds (0 .. n-1); seed s fixes init *and* data order, so every
                     variant sees the same batches for the same seed

The sweep directory holds ``sweep.json`` (the sweep config) and one run directory per
variant x seed. A finished run is skipped and a partial one resumed, so re-running an
interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os

from ml_collections import ConfigDict

from ffn_jax.configuration import ConfigError, config_diff
from ffn_jax.ffn import VARIANTS

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"


def is_sweep(config: ConfigDict) -> bool:
    """Whether ``config`` is a sweep config (has a ``sweep`` block)."""
    return "sweep" in config


def is_sweep_dir(workdir: str) -> bool:
    """Whether ``workdir`` holds a sweep (``sweep.json``, or run directories and no run of
    its own)."""
    if os.path.exists(os.path.join(workdir, SWEEP_FILE)):
        return True
    return not os.path.exists(os.path.join(workdir, "config.json")) and bool(run_dirs(workdir))


def variant_names(config: ConfigDict) -> list[str]:
    """The sweep's variant names, checked against the registry and the MoE presets."""
    names = [v.strip() for v in config.sweep.variants.split(",") if v.strip()]
    valid = list(VARIANTS) + list(config.sweep.presets.keys())
    bad = [n for n in names if n not in valid]
    if bad:
        raise ConfigError(
            f"sweep.variants: unknown variant {bad[0]!r}; valid: {', '.join(valid)}"
        )
    if not names:
        raise ConfigError("sweep.variants is empty; list at least one variant")
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep.variants={config.sweep.variants!r} lists a variant twice")
    return names


def run_configs(config: ConfigDict) -> list[tuple[str, ConfigDict]]:
    """``(run name, run config)`` for every variant x seed, in training order (seed-major,
    so an interrupted sweep has complete seeds of every variant first)."""
    if config.sweep.seeds < 1:
        raise ConfigError(f"sweep.seeds={config.sweep.seeds} must be >= 1")
    names = variant_names(config)
    base = config.to_dict()
    base.pop("sweep")
    out = []
    for seed in range(config.sweep.seeds):
        for name in names:
            c = ConfigDict(json.loads(json.dumps(base)))
            c.model.moe.num_experts = 0
            if name in config.sweep.presets:
                _apply_preset(c, name, dict(config.sweep.presets[name]))
            else:
                c.model.ffn = name
            c.seed = seed
            c.name = f"{name}-s{seed}"
            out.append((c.name, c))
    return out


def _apply_preset(c: ConfigDict, name: str, preset: dict) -> None:
    """Set each preset field on ``c.model.moe`` if it is an MoE field, else on ``c.model``."""
    for k, v in preset.items():
        if k in c.model.moe:
            c.model.moe[k] = v
        elif k in c.model:
            c.model[k] = v
        else:
            raise ConfigError(f"sweep.presets.{name}.{k}: not a model or model.moe field; "
                              "fix the preset in the sweep config")


def _check_sweep_dir(config: ConfigDict, workdir: str) -> None:
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = config.to_dict()
    diff = [d for d in config_diff(old, new) if not d.startswith("sweep.")]
    if diff:
        raise ConfigError(
            f"--workdir={workdir} holds a sweep with incompatible settings ({'; '.join(diff[:3])}"
            "); use a new --workdir for a different comparison"
        )


def train_sweep(config: ConfigDict, workdir: str) -> list[dict]:
    """Train every run of the sweep (skipping finished ones); returns each run's result."""
    from ffn_jax.configuration import validate_config
    from ffn_jax.trainer import run_is_finished, train_and_evaluate

    runs = run_configs(config)
    problems = []
    for _, c in runs[: len(variant_names(config))]:
        problems += [p for p in validate_config(c) if p not in problems]
    if problems:
        raise ConfigError(problems)
    _check_sweep_dir(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, SWEEP_FILE + ".tmp"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(os.path.join(workdir, SWEEP_FILE + ".tmp"), os.path.join(workdir, SWEEP_FILE))

    results = []
    for i, (name, c) in enumerate(runs):
        run_dir = os.path.join(workdir, name)
        if run_is_finished(run_dir, c.train.steps):
            log.info("[%d/%d] %s: finished, skipped", i + 1, len(runs), name)
            continue
        log.info("[%d/%d] %s: training", i + 1, len(runs), name)
        results.append({"name": name, **train_and_evaluate(c, run_dir)})
    return results


def run_dirs(workdir: str) -> list[str]:
    """Run directories of a sweep (those holding a config.json), sorted by name."""
    if not os.path.isdir(workdir):
        return []
    return sorted(
        os.path.join(workdir, d) for d in os.listdir(workdir)
        if os.path.exists(os.path.join(workdir, d, "config.json"))
    )


def evaluate_sweep(workdir: str) -> str:
    """Evaluate every run of the sweep in ``workdir`` and write the report; returns the
    markdown table."""
    from ffn_jax.report import write_report

    dirs = run_dirs(workdir)
    if not dirs:
        raise FileNotFoundError(f"--workdir={workdir} holds no runs; train the sweep first "
                                "with train.py --config=configs/compare.py --workdir=...")
    return write_report(workdir, dirs)
