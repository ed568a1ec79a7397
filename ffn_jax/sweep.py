"""Sweeps: a list of runs ``(name, group, overrides)`` trained into ``DIR/<name>/``.

A sweep config is a base config plus a ``sweep`` block:

    sweep.variants   comma-separated names: dense variants of the FFN registry, or presets
                     named in ``sweep.presets`` (each a dict of ``config.model`` and
                     ``config.model.moe`` fields, e.g. an MoE or the 2017 post-norm block)
    sweep.seeds      number of seeds (0 .. n-1); seed s fixes init *and* data order, so every
                     variant sees the same batches for the same seed
    sweep.axes       optional grid over *any* config fields: ``"train.lr=1e-3,3e-3"``;
                     several axes are separated by ``;`` (every combination is trained);
                     fields joined by ``+`` move together: a model size is
                     ``"model.d_model+model.n_heads=256/4,512/8,768/12"``
    sweep.tune       optional tuning stage (``Tuning``): ``field`` (e.g. ``train.lr``; empty
                     = none), ``grid`` (its values), ``factor`` (its step, to extend past an
                     edge), ``max_extend``, ``seeds`` (per grid point); selection on
                     validation loss, then every variant trains at its own value
    sweep.reference  optional: the variant every row's paired contrast is against in the
                     report ("" = relu for dense rows, the experts' dense FFN for MoE rows)

Every run is ``(name, group, overrides)``: ``group`` holds its keys (``variant``, one per
axis, e.g. ``train.lr``, and ``seed``), stored in the run's ``config.json`` so the report
reads them back instead of parsing names; ``overrides`` are the dotted config fields the
run sets on the base config. The sweep directory holds ``sweep.json`` (the sweep config)
one run directory per run, ``tuning.json`` (a tuned sweep's grids, losses and chosen
values) and ``sweep_timing.json`` (its wall time). A finished run is skipped and a partial one
resumed, so re-running an interrupted sweep continues where it stopped; a run whose loss
became NaN/inf gets a ``diverged.json`` and the sweep goes on.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from ffn_jax import stats
from ffn_jax.configuration import ConfigError, resolve, validate_config
from ffn_jax.ffn import VARIANTS
from ffn_jax.files import PathLike, read_json, write_json_atomic
from ffn_jax.run import CONFIG_FILE, run_is_finished
from ffn_jax.spec import config_diff

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
TUNING_FILE = "tuning.json"  # the tuning stage's grid, losses and chosen value per cell
TIMING_FILE = "sweep_timing.json"  # the sweep's wall time, over every invocation
DIVERGED_FILE = "diverged.json"  # in a run directory: its loss became NaN/inf


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its directory name, its group keys and its config overrides."""

    name: str
    group: dict[str, Any]
    overrides: dict[str, Any]


def is_sweep(config: ConfigDict) -> bool:
    """Whether ``config`` is a sweep config (has a ``sweep`` block)."""
    return "sweep" in config


def is_sweep_dir(workdir: PathLike) -> bool:
    """Whether ``workdir`` holds a sweep (``sweep.json``, or run directories and no run of
    its own)."""
    root = epath.Path(workdir)
    if (root / SWEEP_FILE).exists():
        return True
    return not (root / CONFIG_FILE).exists() and bool(run_dirs(workdir))


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
    reference = str(sweep.get("reference", ""))
    if reference and reference not in names:
        raise ConfigError(
            f"sweep.reference={reference!r} is not in sweep.variants; name one of "
            f"{', '.join(names)} or leave it empty (relu / the experts' dense FFN)"
        )
    return names


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_axes(text: str) -> list[dict[str, list[Any]]]:
    """``"train.lr=1e-3,3e-3;model.d_model+model.n_heads=64/4,128/8"`` -> one dict per axis,
    field -> its values: ``[{"train.lr": [0.001, 0.003]}, {"model.d_model": [64, 128],
    "model.n_heads": [4, 8]}]``. Fields joined by ``+`` move together (a value is ``a/b``),
    e.g. a model size; ConfigError naming ``sweep.axes`` if malformed."""
    axes = []
    for entry in filter(None, (e.strip() for e in (text or "").split(";"))):
        field, sep, values = entry.partition("=")
        fields = [f.strip() for f in field.split("+")]
        points = [
            [_literal(x.strip()) for x in v.split("/")] for v in values.split(",") if v.strip()
        ]
        if not sep or not all(fields) or not points or any(len(p) != len(fields) for p in points):
            raise ConfigError(
                f"sweep.axes: {entry!r} is not 'field=v1,v2' (or 'f1+f2=a1/b1,a2/b2'); "
                "e.g. sweep.axes='train.lr=1e-3,3e-3'"
            )
        axes.append({f: [p[i] for p in points] for i, f in enumerate(fields)})
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


@dataclasses.dataclass(frozen=True)
class Cell:
    """One thing the sweep compares: a variant at one combination of the axes' values.
    ``group`` holds its keys (``variant`` and one per axis); ``overrides`` its config fields."""

    name: str
    group: dict[str, Any]
    overrides: dict[str, Any]

    def run(self, seed: int, extra: dict[str, Any] | None = None) -> Run:
        """The cell's run with ``seed`` and the ``extra`` fields (a tuned value) set."""
        picked = {**(extra or {})}
        label = "".join(f"-{f.rsplit('.', 1)[-1]}={_label(v)}" for f, v in picked.items())
        name = f"{self.name}{label}-s{seed}"
        group = {**self.group, **picked, "seed": seed}
        return Run(name, group, {**self.overrides, **picked, "seed": seed, "name": name})


def cells(config: ConfigDict) -> list[Cell]:
    """Every variant at every combination of ``sweep.axes``, in order."""
    sweep: Any = config.sweep
    axes = parse_axes(sweep.get("axes", ""))
    out = []
    for name in variant_names(config):
        base: dict[str, Any] = {"model.moe.num_experts": 0}
        if name in sweep.presets:
            base.update(_preset_overrides(config, name))
        else:
            base["model.ffn"] = name
        points = [  # each axis' points: {field: value} of its fields
            [
                {f: vals[i] for f, vals in axis.items()}
                for i in range(len(next(iter(axis.values()))))
            ]
            for axis in axes
        ]
        for combo in itertools.product(*points):
            picked = {f: v for point in combo for f, v in point.items()}
            label = "".join(f"-{f.rsplit('.', 1)[-1]}={_label(v)}" for f, v in picked.items())
            out.append(Cell(f"{name}{label}", {"variant": name, **picked}, {**base, **picked}))
    return out


def runs(config: ConfigDict) -> list[Run]:
    """Every run of an untuned sweep, in training order (seed-major, so an interrupted sweep
    has complete seeds of every variant first). A tuned sweep's runs depend on its results:
    see ``train_sweep``."""
    sweep: Any = config.sweep
    if sweep.seeds < 1:
        raise ConfigError(f"sweep.seeds={sweep.seeds} must be >= 1")
    tune = Tuning.of(config)
    the_cells = cells(config)
    if tune is None:
        return [cell.run(seed) for seed in range(sweep.seeds) for cell in the_cells]
    return [  # the first grid: what a tuned sweep trains before it reads a result
        cell.run(seed, {tune.field: v})
        for cell in the_cells
        for v in tune.values
        for seed in range(tune.seeds)
    ]


@dataclasses.dataclass(frozen=True)
class Tuning:
    """A sweep's tuning stage (``sweep.tune``): each cell trains ``field`` at every value of
    the grid with seeds ``0 .. seeds-1``; the value of least mean validation loss wins. When
    the winner is an end of the grid, the grid grows past it by ``factor`` (up to
    ``max_extend`` times per cell). The final stage then trains every cell at its own value
    with seeds ``0 .. sweep.seeds-1``, reusing the tuning runs of its value."""

    field: str
    values: tuple[float, ...]
    factor: float
    max_extend: int
    seeds: int

    @classmethod
    def of(cls, config: ConfigDict) -> Tuning | None:
        """The ``sweep.tune`` block, checked (None when ``tune.field`` is empty or absent)."""
        sweep: Any = config.sweep
        t = sweep.get("tune")
        if t is None or not t.field:
            return None
        try:
            values = tuple(float(v) for v in str(t.grid).split(",") if v.strip())
        except ValueError:
            values = ()
        if len(set(values)) < 2:
            raise ConfigError(
                f"sweep.tune.grid={t.grid!r} needs >= 2 distinct numbers, e.g. '1e-3,2e-3,4e-3'"
            )
        if not t.factor > 1:
            raise ConfigError(f"sweep.tune.factor={t.factor} must be > 1, e.g. 2.0")
        if not 1 <= t.seeds <= sweep.seeds:
            raise ConfigError(
                f"sweep.tune.seeds={t.seeds} must be in [1, sweep.seeds={sweep.seeds}]"
            )
        if t.max_extend < 0:
            raise ConfigError(f"sweep.tune.max_extend={t.max_extend} must be >= 0")
        return cls(str(t.field), tuple(sorted(values)), float(t.factor), t.max_extend, t.seeds)


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


def _check_sweep_dir(config: ConfigDict, workdir: PathLike) -> None:
    path = epath.Path(workdir) / SWEEP_FILE
    if not path.exists():
        return
    diff = [d for d in config_diff(read_json(path), config.to_dict()) if not d.startswith("sweep.")]
    if diff:
        raise ConfigError(
            f"--workdir={workdir} holds a sweep with incompatible settings ({'; '.join(diff[:3])}"
            "); use a new --workdir for a different comparison"
        )


def _write_shared(path: PathLike, obj: Any) -> None:
    """Write a sweep-level file from process 0 only (every process computes the same)."""
    if jax.process_index() == 0:
        write_json_atomic(path, obj)


class _Stopped(Exception):
    """A signal stopped a run: the sweep stops after it."""


class _SweepTrainer:
    """Trains the runs of one sweep directory: skips finished and diverged runs, records a
    divergence instead of stopping, and keeps the sweep's wall time in ``TIMING_FILE``."""

    def __init__(self, config: ConfigDict, workdir: PathLike):
        self.config, self.workdir = config, epath.Path(workdir)
        self.results: list[dict] = []
        self.started = time.perf_counter()
        timing = self.workdir / TIMING_FILE
        self.before = read_json(timing)["wall_s"] if timing.exists() else 0.0

    def save_timing(self) -> None:
        wall = self.before + time.perf_counter() - self.started
        _write_shared(self.workdir / TIMING_FILE, {"wall_s": wall})

    def train(self, run: Run, extra: dict[str, Any] | None = None) -> None:
        """Train ``run`` (its config plus the ``extra`` fields) unless done; raises
        ``_Stopped`` if a signal stopped it."""
        from ffn_jax.trainer import NonFiniteLossError, train_and_evaluate

        c = run_config(self.config, run)
        for field, value in (extra or {}).items():
            _set(c, field, value)
        spec = resolve(c, group=run.group)
        run_dir = self.workdir / run.name
        if diverged(run_dir, spec.source):
            log.info("%s: diverged before, skipped", run.name)
            return
        if run_is_finished(run_dir, spec.train.steps):
            log.info("%s: finished, skipped", run.name)
            return
        log.info("%s: training", run.name)
        try:
            result = train_and_evaluate(spec, run_dir)
        except NonFiniteLossError as e:
            log.warning("%s diverged; the sweep goes on: %s", run.name, e)
            marker = {"error": str(e), "config": dict(spec.source)}
            _write_shared(run_dir / DIVERGED_FILE, marker)
            return
        finally:
            self.save_timing()
        self.results.append({"name": run.name, **result})
        if result["preempted"]:  # a signal stops the sweep, not just this run
            log.warning(
                "stopped the sweep after saving %s at step %d; rerun the same command to continue",
                run.name,
                result["step"],
            )
            raise _Stopped

    def complete_eval(self, run: Run) -> None:
        """Score the splits a finished tuning run skipped (the final stage reuses it)."""
        from ffn_jax.evaluate import evaluate_run, read_eval

        run_dir = self.workdir / run.name
        ev = read_eval(run_dir)
        if ev is not None and "test" not in ev:
            log.info("%s: scoring the test split", run.name)
            evaluate_run(run_dir, splits=("test",))
            self.save_timing()


def diverged(run_dir: PathLike, source: dict | Any) -> bool:
    """Whether ``run_dir`` holds a divergence marker for this config."""
    path = epath.Path(run_dir) / DIVERGED_FILE
    return path.exists() and not config_diff(read_json(path)["config"], dict(source))


def validation_loss(run_dir: PathLike) -> float:
    """The run's final validation loss (``inf`` if it diverged)."""
    from ffn_jax.evaluate import read_eval

    if (epath.Path(run_dir) / DIVERGED_FILE).exists():
        return math.inf
    ev = read_eval(run_dir)
    if ev is None:
        raise FileNotFoundError(f"{run_dir} has no eval.json; rerun the sweep to finish it")
    return float(ev["validation"]["loss"])


def _tune(cell: Cell, tune: Tuning, trainer: _SweepTrainer) -> dict:
    """Train ``cell``'s grid (extended past an edge while allowed); its tuning record."""
    values, extended = list(tune.values), 0
    only_val = {"train.eval_splits": "validation"}  # selection reads validation only
    while True:
        for v in values:
            for seed in range(tune.seeds):
                trainer.train(cell.run(seed, {tune.field: v}), only_val)
        losses = [
            float(
                np.mean(
                    [
                        validation_loss(trainer.workdir / cell.run(s, {tune.field: v}).name)
                        for s in range(tune.seeds)
                    ]
                )
            )
            for v in values
        ]
        nxt = stats.extend_grid(values, losses, tune.factor) if extended < tune.max_extend else None
        if nxt is None:
            break
        log.info("%s: best %s is the grid's edge; trying %g", cell.name, tune.field, nxt)
        values.append(nxt)
        extended += 1
    order = np.argsort(values)
    values, losses = [values[i] for i in order], [losses[i] for i in order]
    return {
        "values": values,
        "val_loss": losses,
        "chosen": values[stats.best_index(losses)],
        "extended": extended,
        "edge": stats.grid_edge(values, losses),
    }


def train_sweep(config: ConfigDict, workdir: PathLike) -> list[dict]:
    """Train every run of the sweep (skipping finished ones): with a ``sweep.tune`` block,
    the tuning stage and then the final stage (``Tuning``). Returns each trained run's
    result."""
    tune = Tuning.of(config)
    all_cells = cells(config)
    problems: list[str] = []
    sweep: Any = config.sweep
    first = {tune.field: tune.values[0]} if tune else None
    for run in (cell.run(0, first) for cell in all_cells):  # one run of every cell
        problems += [p for p in validate_config(run_config(config, run)) if p not in problems]
    if problems:
        raise ConfigError(problems)
    _check_sweep_dir(config, workdir)
    _write_shared(epath.Path(workdir) / SWEEP_FILE, config.to_dict())

    trainer = _SweepTrainer(config, workdir)
    try:
        if tune is None:
            for run in runs(config):
                trainer.train(run)
            return trainer.results
        tuning = {}
        for cell in all_cells:
            tuning[cell.name] = {
                "group": cell.group,
                "field": tune.field,
                **_tune(cell, tune, trainer),
            }
            _write_shared(epath.Path(workdir) / TUNING_FILE, tuning)
        for cell in all_cells:
            if tuning[cell.name]["edge"]:
                log.warning(
                    "%s: the best %s (%g) is still an edge of the grid after %d extensions",
                    cell.name,
                    tune.field,
                    tuning[cell.name]["chosen"],
                    tune.max_extend,
                )
        for seed in range(sweep.seeds):
            for cell in all_cells:
                run = cell.run(seed, {tune.field: tuning[cell.name]["chosen"]})
                trainer.train(run)
                if seed < tune.seeds:
                    trainer.complete_eval(run)
    except _Stopped:
        pass
    finally:
        trainer.save_timing()
    return trainer.results


def run_dirs(workdir: PathLike) -> list[str]:
    """Run directories of a sweep (those holding a config.json), sorted by name."""
    root = epath.Path(workdir)
    if not root.is_dir():
        return []
    return sorted(os.fspath(d) for d in root.iterdir() if (d / CONFIG_FILE).exists())


def evaluate_sweep(workdir: PathLike) -> str:
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
