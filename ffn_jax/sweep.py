"""Sweeps: a list of runs ``(name, group, overrides)`` trained into ``DIR/<name>/``.

A sweep config is a base config plus a ``sweep`` block:

    sweep.variants   comma-separated names: dense variants of the FFN registry, or presets
                     named in ``sweep.presets`` (each a dict of ``config.model`` and
                     ``config.model.moe`` fields, e.g. an MoE or the 2017 post-norm block)
    sweep.seeds      number of seeds (0 .. n-1); seed s fixes init *and* data order, so every
                     variant sees the same batches for the same seed
    sweep.axes       optional grid over *any* config fields: ``"train.lr=1e-3,3e-3"``;
                     several axes are separated by ``;`` (every combination is trained)

Every run is ``(name, group, overrides)``: ``group`` holds its keys (``variant``, one per
axis, e.g. ``train.lr``, and ``seed``), stored in the run's ``config.json`` so the report
reads them back instead of parsing names; ``overrides`` are the dotted config fields the
run sets on the base config. The sweep directory holds ``sweep.json`` (the sweep config)
and one run directory per run. A finished run is skipped and a partial one resumed, so
re-running an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import logging
import os
from typing import Any

from ml_collections import ConfigDict

from ffn_jax.configuration import ConfigError, resolve, validate_config
from ffn_jax.ffn import VARIANTS
from ffn_jax.run import CONFIG_FILE, read_json, run_is_finished, write_json_atomic
from ffn_jax.spec import config_diff

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its directory name, its group keys and its config overrides."""

    name: str
    group: dict[str, Any]
    overrides: dict[str, Any]


def is_sweep(config: ConfigDict) -> bool:
    """Whether ``config`` is a sweep config (has a ``sweep`` block)."""
    return "sweep" in config


def is_sweep_dir(workdir: str) -> bool:
    """Whether ``workdir`` holds a sweep (``sweep.json``, or run directories and no run of
    its own)."""
    if os.path.exists(os.path.join(workdir, SWEEP_FILE)):
        return True
    return not os.path.exists(os.path.join(workdir, CONFIG_FILE)) and bool(run_dirs(workdir))


def variant_names(config: ConfigDict) -> list[str]:
    """The sweep's variant names, checked against the registry and the presets."""
    sweep: Any = config.sweep
    names = [v.strip() for v in sweep.variants.split(",") if v.strip()]
    valid = list(VARIANTS) + list(sweep.presets.keys())
    bad = [n for n in names if n not in valid]
    if bad:
        raise ConfigError(f"sweep.variants: unknown variant {bad[0]!r}; valid: {', '.join(valid)}")
    if not names:
        raise ConfigError("sweep.variants is empty; list at least one variant")
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep.variants={sweep.variants!r} lists a variant twice")
    return names


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_axes(text: str) -> list[tuple[str, list[Any]]]:
    """``"train.lr=1e-3,3e-3;model.d_model=64,128"`` -> ``[("train.lr", [0.001, 0.003]),
    ("model.d_model", [64, 128])]``; ConfigError naming ``sweep.axes`` if malformed."""
    axes = []
    for entry in filter(None, (e.strip() for e in (text or "").split(";"))):
        field, sep, values = entry.partition("=")
        vals = [_literal(v.strip()) for v in values.split(",") if v.strip()]
        if not sep or not field.strip() or not vals:
            raise ConfigError(
                f"sweep.axes: {entry!r} is not 'field=v1,v2'; e.g. sweep.axes='train.lr=1e-3,3e-3'"
            )
        axes.append((field.strip(), vals))
    return axes


def _preset_overrides(config: ConfigDict, name: str) -> dict[str, Any]:
    """A ``sweep.presets`` entry as dotted overrides (``model.moe.*`` for MoE fields, else
    ``model.*``)."""
    model: Any = config.model
    sweep: Any = config.sweep
    out = {}
    for k, v in dict(sweep.presets[name]).items():
        if k in model.moe:
            out[f"model.moe.{k}"] = v
        elif k in model:
            out[f"model.{k}"] = v
        else:
            raise ConfigError(
                f"sweep.presets.{name}.{k}: not a model or model.moe field; "
                "fix the preset in the sweep config"
            )
    return out


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def runs(config: ConfigDict) -> list[Run]:
    """Every run of the sweep, in training order (seed-major, so an interrupted sweep has
    complete seeds of every variant first)."""
    sweep: Any = config.sweep
    if sweep.seeds < 1:
        raise ConfigError(f"sweep.seeds={sweep.seeds} must be >= 1")
    names = variant_names(config)
    axes = parse_axes(sweep.get("axes", ""))
    out = []
    for seed in range(sweep.seeds):
        for name in names:
            base: dict[str, Any] = {"model.moe.num_experts": 0}
            if name in sweep.presets:
                base.update(_preset_overrides(config, name))
            else:
                base["model.ffn"] = name
            for combo in itertools.product(*(values for _, values in axes)):
                picked = dict(zip((field for field, _ in axes), combo, strict=True))
                label = "".join(f"-{f.rsplit('.', 1)[-1]}={_label(v)}" for f, v in picked.items())
                run_name = f"{name}{label}-s{seed}"
                group = {"variant": name, **picked, "seed": seed}
                out.append(Run(run_name, group, {**base, **picked, "seed": seed, "name": run_name}))
    return out


def _set(c: ConfigDict, field: str, value: Any) -> None:
    *parents, leaf = field.split(".")
    node: Any = c
    for part in parents:
        if part not in node or not isinstance(node[part], ConfigDict):
            raise ConfigError(f"sweep: {field!r} is not a config field; fix sweep.axes")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"sweep: {field!r} is not a config field; fix sweep.axes")
    node[leaf] = value


def run_config(config: ConfigDict, run: Run) -> ConfigDict:
    """The full config of ``run``: the sweep's base config (no ``sweep`` block) with the
    run's overrides (its ``group`` is added when it is resolved: ``resolve(c, run.group)``)."""
    base = config.to_dict()
    base.pop("sweep")
    c = ConfigDict(json.loads(json.dumps(base)))
    for field, value in run.overrides.items():
        _set(c, field, value)
    return c


def run_configs(config: ConfigDict) -> list[tuple[str, ConfigDict]]:
    """``(run name, run config)`` for every run of the sweep, in training order."""
    return [(r.name, run_config(config, r)) for r in runs(config)]


def _check_sweep_dir(config: ConfigDict, workdir: str) -> None:
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.exists(path):
        return
    diff = [d for d in config_diff(read_json(path), config.to_dict()) if not d.startswith("sweep.")]
    if diff:
        raise ConfigError(
            f"--workdir={workdir} holds a sweep with incompatible settings ({'; '.join(diff[:3])}"
            "); use a new --workdir for a different comparison"
        )


def train_sweep(config: ConfigDict, workdir: str) -> list[dict]:
    """Train every run of the sweep (skipping finished ones); returns each run's result."""
    from ffn_jax.trainer import train_and_evaluate

    all_runs = [(r, run_config(config, r)) for r in runs(config)]
    problems: list[str] = []
    sweep: Any = config.sweep
    for _, c in all_runs[: len(all_runs) // sweep.seeds]:  # every run of seed 0
        problems += [p for p in validate_config(c) if p not in problems]
    if problems:
        raise ConfigError(problems)
    _check_sweep_dir(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, SWEEP_FILE), config.to_dict())

    results = []
    for i, (run, c) in enumerate(all_runs):
        name, run_dir = run.name, os.path.join(workdir, run.name)
        spec = resolve(c, group=run.group)
        if run_is_finished(run_dir, spec.train.steps):
            log.info("[%d/%d] %s: finished, skipped", i + 1, len(all_runs), name)
            continue
        log.info("[%d/%d] %s: training", i + 1, len(all_runs), name)
        result = train_and_evaluate(spec, run_dir)
        results.append({"name": name, **result})
        if result["preempted"]:  # a signal stops the sweep, not just this run
            log.warning(
                "stopped the sweep after saving %s at step %d; rerun the same command to continue",
                name,
                result["step"],
            )
            break
    return results


def run_dirs(workdir: str) -> list[str]:
    """Run directories of a sweep (those holding a config.json), sorted by name."""
    if not os.path.isdir(workdir):
        return []
    return sorted(
        os.path.join(workdir, d)
        for d in os.listdir(workdir)
        if os.path.exists(os.path.join(workdir, d, CONFIG_FILE))
    )


def evaluate_sweep(workdir: str) -> str:
    """Evaluate every run of the sweep in ``workdir`` and write the report; returns the
    markdown table."""
    from ffn_jax.report import write_report

    dirs = run_dirs(workdir)
    if not dirs:
        raise FileNotFoundError(
            f"--workdir={workdir} holds no runs; train the sweep first "
            "with train.py --config=configs/compare.py --workdir=..."
        )
    return write_report(workdir, dirs)
