"""The comparison report of a sweep: ``results.md``, ``results.csv`` (one row per
variant), ``runs.csv`` (one row per run) and plots.

One row per *cell*: runs that differ only in the seed (a variant, or a variant at one point
of the sweep's axes; in a tuned sweep, at the cell's chosen value of the tuned field). Per
row: mean and sample SD over seeds of validation and test loss, perplexity and bits per
byte; parameters (total / active), training FLOPs per token, epochs; the paired difference
of test loss (same seeds = same data order) from the reference at the same axis values:
``relu`` for dense variants, the parameter-matched dense ``swiglu`` for MoE rows, each with
a 95% t interval and a Holm-adjusted p-value over the family of all such contrasts. Also:
the pre-declared primary contrast (mean of gated variants minus mean of ungated ones), the
n-gram baselines fitted on the same training split, per-run bootstrap intervals over
contiguous blocks of the test split, the tuning stage's loss-vs-LR table, and the sweep's
wall time split.

The sections beyond the main table are in ``ffn_jax.report_sections``, the plots in
``ffn_jax.report_plots``. The table is data: ``COLUMNS`` lists every column once (its record
key, how seeds are aggregated, its markdown header and cell), and the record, the
aggregate, the markdown and the CSV are all derived from it. A new column is one entry.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from ffn_jax import stats
from ffn_jax.files import PathLike, read_json, write_text_atomic
from ffn_jax.flops import flops_per_token
from ffn_jax.metrics import read_metrics
from ffn_jax.moe.health import summarise_run
from ffn_jax.report_plots import write_plots
from ffn_jax.report_sections import (
    TIMING_KEYS,
    baseline_section,
    beats,
    ranking_section,
    router_health_section,
    scaling_fits,
    scaling_section,
    timing_line,
    tuning_section,
)
from ffn_jax.run import EVAL_FILE, PROVENANCE_FILE, latest_step, load_spec
from ffn_jax.spec import ModelSpec, RunSpec, config_field_names

log = logging.getLogger(__name__)

BASELINE = "relu"  # the reference of dense rows
MOE_BASELINE = "swiglu"  # the reference of MoE rows: the dense FFN their experts match
GATED = ("glu", "bilinear", "reglu", "geglu", "geglu_tanh", "swiglu")
UNGATED = ("relu", "gelu", "gelu_tanh", "swish", "squared_relu")
ALPHA = 0.05  # family-wise error rate of the contrasts (Holm)
SPLITS = ("validation", "test")
METRICS = ("loss", "perplexity", "bits_per_byte")


def param_counts(m: ModelSpec) -> dict[str, int]:
    """Total parameters of the model ``m`` and those active per token (MoE: routed experts
    count only top-k of E)."""
    from ffn_jax.model import LM

    abstract = nnx.eval_shape(lambda: LM(m, rngs=nnx.Rngs(0)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    active = total
    if m.moe is not None:
        from ffn_jax.moe import moe_cost

        cost = moe_cost(m.moe, m.ffn, m.d_model)
        n_moe = m.ffn_kinds.count("moe")
        active -= n_moe * (cost["total_params"] - cost["active_params"])
    return {"params_total": int(total), "params_active": int(active)}


def _run_eval(run_dir: str, splits: tuple[str, ...] = SPLITS) -> dict:
    """``eval.json`` of the run with ``splits``, (re)computed if missing, incomplete or older
    than the last checkpoint."""
    from ffn_jax.evaluate import evaluate_run

    path = epath.Path(run_dir) / EVAL_FILE
    latest = latest_step(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints; finish the sweep with train.py")
    ev = read_json(path) if path.exists() else {}
    if ev.get("step") == latest and all(s in ev for s in splits):
        return ev
    missing = tuple(s for s in splits if s not in ev) if ev.get("step") == latest else splits
    log.info("evaluating %s (%s)", run_dir, ", ".join(missing))
    return evaluate_run(run_dir, splits=missing)


def _throughput(rows: list[dict]) -> dict:
    train = [r for r in rows if "tokens_per_s" in r]
    steady = train[1:] or train  # the first window includes warm-up
    end = [r for r in rows if r.get("event") == "end"]
    drops = [np.mean(r["moe/dropped_fraction"]) for r in steady if "moe/dropped_fraction" in r]
    return {
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steady])) if steady else None,
        "mfu": float(np.mean([r["mfu"] for r in steady])) if steady else None,
        "train_time_s": end[-1]["train_time_s"] if end else None,
        "drop_fraction": float(np.mean(drops)) if drops else None,
        **{k: (end[-1].get(k) if end else None) for k in TIMING_KEYS},
    }


# ---- the columns ------------------------------------------------------------------------

HEALTH_KEYS = (
    "max_violation_final",
    "max_violation_final_worst",
    "max_violation_layers_final",
    "max_violation_train_mean",
    "dead_experts_final",
    "collapse_alarm",
    "router_logit_rms_final",
)


def _pm(key: str, digits: int) -> Callable[[dict], str]:
    return lambda r: f"{r[f'{key}_mean']:.{digits}f} ± {r[f'{key}_std']:.{digits}f}"


def _delta(r: dict) -> str:
    if math.isnan(r["d_test_loss"]):
        return "—"
    if math.isnan(r["d_test_loss_lo"]):
        return f"{r['d_test_loss']:+.4f} (1 seed)"
    return f"{r['d_test_loss']:+.4f} [{r['d_test_loss_lo']:+.4f}, {r['d_test_loss_hi']:+.4f}]"


def _p(r: dict) -> str:
    if r["significant"] in ("reference", "no reference"):
        return r["significant"]
    return f"{r['p_holm']:.3f} ({r['significant']})"


def _opt(fmt: str) -> Callable[[Any], str]:
    return lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _marks(r: dict) -> str:
    out = "" if r["causal"] else " (non-causal!)"
    if r["step"] < r["target_steps"]:
        out += f" (unfinished: step {r['step']} of {r['target_steps']})"
    return out


@dataclasses.dataclass(frozen=True)
class Column:
    """One report column: ``key`` in the run record; ``agg`` how runs of a group combine
    (``"first"``: equal across seeds, ``"seeds"``: mean and sample std -> ``key_mean`` /
    ``key_std``, ``"mean"``: mean of the runs that have it, ``"present"``: that mean (of
    numbers, or per element of lists) with its sample std -> ``key_std`` and the number of
    runs that have it -> ``key_n``, ``"min"``: the smallest,
    ``"paired"``: the contrast against the row's reference, filled in by ``contrasts``);
    ``header``/``cell`` its markdown column (None: CSV only)."""

    key: str
    agg: str
    header: str | None = None
    cell: Callable[[dict], str] | None = None


COLUMNS: tuple[Column, ...] = (
    Column("label", "first", "variant", lambda r: r["label"] + _marks(r)),
    Column("seeds", "first"),
    Column("causal", "first"),
    Column("tuned", "first", "tuned", lambda r: _opt("{:g}")(r["tuned"])),
    Column(
        "params_total",
        "first",
        "params (total / active)",
        lambda r: f"{r['params_total'] / 1e6:.3f}M / {r['params_active'] / 1e6:.3f}M",
    ),
    Column("params_active", "first"),
    Column(
        "flops_per_token",
        "first",
        "train MFLOPs/tok",
        lambda r: f"{r['flops_per_token'] / 1e6:.2f}",
    ),
    Column("tokens", "first"),
    Column("epochs", "first", "epochs", lambda r: f"{r['epochs']:.2f}"),
    Column("step", "min"),  # the least-trained run of the group (eval.json's step)
    Column("target_steps", "first"),
    *(Column(f"{split}_{k}", "seeds") for split in SPLITS for k in METRICS),
    Column("reference", "paired"),
    Column("d_test_loss", "paired", "Δ test loss vs reference [95% CI]", _delta),
    Column("d_test_loss_lo", "paired"),
    Column("d_test_loss_hi", "paired"),
    Column("p_raw", "paired"),
    Column("p_holm", "paired", f"Holm p (sig. at {ALPHA:g})", _p),
    Column("significant", "paired"),
    Column("mde", "paired"),
    Column("test_loss_ci_halfwidth", "mean"),  # per-run bootstrap over blocks, mean of runs
    Column("beats", "first", "beats (test bits/byte)", lambda r: r["beats"]),
    Column(
        "drop_fraction", "present", "drops (train)", lambda r: _opt("{:.2%}")(r["drop_fraction"])
    ),
    Column("tokens_per_s", "mean", "tokens/s", lambda r: _opt("{:,.0f}")(r["tokens_per_s"])),
    Column("train_time_s", "mean", "time (s)", lambda r: _opt("{:.0f}")(r["train_time_s"])),
    # Router health (ffn_jax.moe.health.summarise_run; the report's router-health section).
    *(Column(k, "present") for k in HEALTH_KEYS),
)
# Markdown cells of the per-seed metrics, placed after the epochs column (± = SD over seeds).
METRIC_CELLS = (
    ("val loss", _pm("validation_loss", 4)),
    ("test loss", _pm("test_loss", 4)),
    ("test bits/byte", _pm("test_bits_per_byte", 4)),
)


# ---- records ------------------------------------------------------------------------------


def _shared(spec: RunSpec, varied: set[str]) -> dict[str, Any]:
    """The fields a comparison's runs must share (``shared`` spec metadata), minus the
    ones the sweep varies on purpose."""
    out = {}
    for field in config_field_names("shared"):
        if field in varied:
            continue
        section, name = field.split(".")
        out[field] = spec.source[section][name]
    return out


def load_specs(run_dirs: list[str]) -> list[RunSpec]:
    """The runs' specs; ValueError if they differ in settings a comparison must share."""
    specs = [load_spec(d) for d in run_dirs]
    if not specs:
        return []
    varied = {k for s in specs for k in s.group if k not in ("variant", "seed")}
    ref = _shared(specs[0], varied)
    for d, s in zip(run_dirs, specs, strict=True):
        diff = [k for k, v in _shared(s, varied).items() if v != ref[k]]
        if diff:
            raise ValueError(
                f"sweep directory holds runs of incompatible settings: {epath.Path(d).name} "
                f"differs from {epath.Path(run_dirs[0]).name} in {', '.join(diff)}; "
                "move it out or evaluate it on its own"
            )
    return specs


def _label(group: dict, tuned: str = "") -> str:
    """``variant axis=value ...`` (the seed and the tuned field left out)."""
    axes = [
        f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
        for k, v in group.items()
        if k not in ("variant", "seed", tuned)
    ]
    return " ".join([str(group["variant"]), *axes])


def collect(
    run_dirs: list[str], tuned: str = "", train_tokens: int = 0, splits: dict | None = None
) -> list[dict]:
    """One record per run: identity (group keys), sizes, eval results (``splits[run_dir]``
    of them, default both), throughput, timing, the validation curve. ``tuned`` is the
    sweep's tuned field (left out of the label); ``train_tokens`` the training split's
    size (for epochs)."""
    from ffn_jax.moe.routers import ROUTERS

    records = []
    for d, spec in zip(run_dirs, load_specs(run_dirs), strict=True):
        want = (splits or {}).get(d, SPLITS)
        ev = _run_eval(d, want)
        rows = read_metrics(d)
        m = spec.model
        tokens = spec.train.steps * spec.tokens_per_step
        rec = {
            "run": spec.name,
            "dir": d,
            "group": dict(spec.group),
            "label": _label(dict(spec.group), tuned),
            "tuned": spec.group.get(tuned) if tuned else None,
            "moe": m.moe is not None,
            "ffn": m.ffn,
            "variant": spec.group["variant"],
            "seed": spec.group.get("seed", spec.seed),
            "causal": m.moe is None or ROUTERS[m.moe.router].causal,
            "tokens": tokens,
            "epochs": tokens / train_tokens if train_tokens else math.nan,
            "step": int(ev["step"]),
            "target_steps": spec.train.steps,
            "flops_per_token": flops_per_token(m, spec.data.seq_len)["train"],
            **param_counts(m),
            **_throughput(rows),
            **summarise_run(rows),
            "curve": _curve(rows),
        }
        for split in SPLITS:
            for k in METRICS:
                rec[f"{split}_{k}"] = ev[split][k] if split in ev else math.nan
            rec[f"{split}_tokens"] = ev[split]["tokens"] if split in ev else 0
        rec["final_val_batches"] = spec.train.final_val_batches
        blocks = np.asarray(ev.get("test", {}).get("blocks", []), dtype=np.float64)
        rec["test_loss_lo"], rec["test_loss_hi"] = _bootstrap(blocks)
        rec["test_loss_ci_halfwidth"] = (rec["test_loss_hi"] - rec["test_loss_lo"]) / 2
        records.append(rec)
    return records


def _curve(rows: list[dict]) -> list[tuple[int, float]]:
    """The validation curve: the evaluations on the training-time subsample (the same
    windows each time), not the final full-split score."""
    evals = [r for r in rows if "val_loss" in r]
    if not evals:
        return []
    sub = min(r.get("val_tokens", 0) for r in evals)
    return [(r["tokens"], r["val_loss"]) for r in evals if r.get("val_tokens", 0) == sub]


def _bootstrap(blocks: np.ndarray) -> tuple[float, float]:
    """95% bootstrap interval of a run's test loss over the eval batches (each a contiguous
    block of ``data.batch_size`` windows of the split; nan without per-block sums)."""
    if blocks.ndim != 2 or len(blocks) < 2:
        return math.nan, math.nan
    return stats.bootstrap_ci(blocks[:, 0], blocks[:, 1])


# ---- aggregation --------------------------------------------------------------------------


def _axes_key(group: dict, tuned: str = "") -> tuple:
    return tuple(sorted((k, v) for k, v in group.items() if k not in ("variant", "seed", tuned)))


def aggregate(records: list[dict], tuned: str = "", reference: str = "") -> list[dict]:
    """One row per cell (in first-seen order), derived from ``COLUMNS``: mean/SD over seeds
    and the contrasts against each row's reference (``contrasts``; ``reference``: the
    sweep's ``sweep.reference``, "" = the default rule of ``reference_of``)."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_label[r["label"]].append(r)
    rows = []
    for label, runs in by_label.items():
        first = runs[0]
        row: dict[str, Any] = {"variant": label, "seeds": len(runs), "moe": first["moe"]}
        row["ffn"], row["base_variant"] = first["ffn"], first["variant"]
        row.update({k: v for k, v in first["group"].items() if k not in ("variant", "seed")})
        row["axes"] = _axes_key(first["group"], tuned)
        for col in COLUMNS:
            if col.agg == "first" and col.key not in ("label", "seeds", "beats"):
                row[col.key] = first[col.key]
            elif col.agg == "seeds":
                vals = [r[col.key] for r in runs]
                row[f"{col.key}_mean"] = float(np.mean(vals))
                row[f"{col.key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            elif col.agg == "min":
                row[col.key] = min(r[col.key] for r in runs)
            elif col.agg == "mean":
                vals = [r[col.key] for r in runs if r[col.key] is not None]
                vals = [v for v in vals if not math.isnan(v)]
                row[col.key] = float(np.mean(vals)) if vals else None
            elif col.agg == "present":
                row.update(_present(col.key, runs))
        row["label"] = label
        row["beats"] = ""
        row["per_seed"] = {
            r["seed"]: r["test_loss"] for r in runs if r["step"] >= r["target_steps"]
        }
        rows.append(row)
    contrasts(rows, reference)
    return rows


def _present(key: str, runs: list[dict]) -> dict[str, Any]:
    """The ``"present"`` aggregate of ``key`` over ``runs``: ``key`` (mean), ``key_std``
    (sample SD, 0 for one run) and ``key_n`` over the runs that have a value (not None or
    nan); lists (per-layer values) element-wise; None where no run has one."""
    vals = [r.get(key) for r in runs]
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {key: None, f"{key}_std": None, f"{key}_n": 0}
    a = np.asarray(vals, dtype=np.float64)
    sd = a.std(axis=0, ddof=1) if len(vals) > 1 else np.zeros_like(a[0])
    return {key: a.mean(axis=0).tolist(), f"{key}_std": sd.tolist(), f"{key}_n": len(vals)}


def reference_of(row: dict, reference: str = "") -> str:
    """The variant a row is compared with: the sweep's ``reference`` when set (e.g. the
    aux-loss router of the ``moe`` preset); else ``relu`` for dense rows and, for MoE rows,
    the dense variant of their experts' FFN (the parameter-matched dense model)."""
    if reference:
        return reference
    return row["ffn"] if row["moe"] else BASELINE


def contrasts(rows: list[dict], reference: str = "") -> None:
    """Fill each row's ``"paired"`` columns: the paired (same seed) difference of test loss
    from its reference at the same axis values, a 95% t interval, the raw p and the
    Holm-adjusted p over the family of every row's contrast, and the smallest effect the
    test detects with 80% power (from the observed SD of the differences)."""
    by_name = {(r["base_variant"], r["axes"]): r for r in rows}
    family = []
    for row in rows:
        ref_name = reference_of(row, reference)
        ref = by_name.get((ref_name, row["axes"]))
        row["reference"] = ref_name
        nan = math.nan
        row.update(d_test_loss=nan, d_test_loss_lo=nan, d_test_loss_hi=nan, p_raw=nan, mde=nan)
        row["p_holm"] = nan
        if ref is row:
            row["significant"] = "reference"
            continue
        seeds = sorted(set(row["per_seed"]) & set(ref["per_seed"])) if ref else []
        if ref is None or not seeds:
            row["significant"] = "no reference"
            continue
        diffs = [row["per_seed"][s] - ref["per_seed"][s] for s in seeds]
        t = stats.paired(diffs)
        row.update(d_test_loss=t.mean, d_test_loss_lo=t.lo, d_test_loss_hi=t.hi, p_raw=t.p)
        if len(diffs) > 1:
            row["mde"] = stats.min_detectable_effect(float(np.std(diffs, ddof=1)), len(diffs))
        family.append(row)
    for row, p in zip(family, stats.holm([r["p_raw"] for r in family]), strict=True):
        row["p_holm"] = p
        row["significant"] = "n/a" if math.isnan(p) else ("yes" if p <= ALPHA else "no")


def primary_contrast(rows: list[dict]) -> dict[tuple, stats.Paired]:
    """The pre-declared primary contrast at each axis point: mean test loss of the gated
    dense variants minus that of the ungated ones, paired over the seeds all of them have."""
    out = {}
    for axes in dict.fromkeys(r["axes"] for r in rows):
        at = [r for r in rows if r["axes"] == axes and not r["moe"]]
        gated = [r["per_seed"] for r in at if r["base_variant"] in GATED]
        ungated = [r["per_seed"] for r in at if r["base_variant"] in UNGATED]
        if gated and ungated:
            out[axes] = stats.mean_contrast(gated, ungated)
    return out


def _markdown_columns() -> list[tuple[str, Callable[[dict], str]]]:
    cols = [(c.header, c.cell) for c in COLUMNS if c.header and c.cell]
    at = next(i for i, (h, _) in enumerate(cols) if h == "epochs") + 1
    return cols[:at] + list(METRIC_CELLS) + cols[at:]


def markdown_table(rows: list[dict]) -> str:
    """The results table as markdown, sorted by test bits per byte."""
    cols = _markdown_columns()
    if all(r["tuned"] is None for r in rows):
        cols = [c for c in cols if c[0] != "tuned"]
    if all(r["drop_fraction"] is None for r in rows):
        cols = [c for c in cols if c[0] != "drops (train)"]
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: r["test_bits_per_byte_mean"]):
        lines.append("| " + " | ".join(cell(r) for _, cell in cols) + " |")
    return "\n".join(lines)


CSV_SKIP = ("curve", "label", "per_seed", "axes", "dir", "group")


def csv_fields(rows: list[dict]) -> list[str]:
    """The CSV columns: every plain key of the rows, in their order."""
    return [k for k in rows[0] if k not in CSV_SKIP]


def _write_csv(path: PathLike, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r if k not in CSV_SKIP))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, text.getvalue())


def scored_line(records: list[dict]) -> str:
    """What the final evaluation scored: every test token, and every validation token or
    the same evenly spaced batches of the validation split (``train.final_val_batches``)."""
    test = sorted({r["test_tokens"] for r in records if r["test_tokens"]})
    val = sorted({r["validation_tokens"] for r in records if r["validation_tokens"]})
    batches = sorted({r["final_val_batches"] for r in records})
    fmt = "/".join
    line = f"test: every token of the split ({fmt(f'{c:,}' for c in test)} tokens)"
    if batches == [0]:
        return line + f", validation likewise ({fmt(f'{c:,}' for c in val)} tokens)"
    return line + (
        f", validation: {fmt(map(str, batches))} evenly spaced batches of the split "
        f"({fmt(f'{c:,}' for c in val)} tokens, `train.final_val_batches`), the same for "
        "every run"
    )


def provenance_line(run_dirs: list[str]) -> str:
    """Where the runs came from (their ``run.json``): code commits, versions, devices."""
    seen = []
    for d in run_dirs:
        path = epath.Path(d) / PROVENANCE_FILE
        if path.exists():
            p = read_json(path)
            seen.append(
                f"commit {p.get('git_commit') or 'unknown'}, jax {p.get('jax')}, "
                f"flax {p.get('flax')}, optax {p.get('optax')}, orbax {p.get('orbax')}"
                f", {p.get('device_count')} x {p.get('device_kind')}"
            )
    if not seen:
        return "Provenance: not recorded (runs written before run.json existed)."
    distinct = list(dict.fromkeys(seen))
    return (
        "Provenance: "
        + "; ".join(distinct)
        + ("" if len(seen) == len(run_dirs) else f" ({len(run_dirs) - len(seen)} runs unrecorded)")
        + "."
    )


def _split_runs(run_dirs: list[str], tuning: dict) -> tuple[list[str], list[str], list[str]]:
    """(final-table runs, tuning-only runs, diverged runs) of a sweep: in a tuned sweep a
    run belongs to the table when its tuned value is its cell's chosen one."""
    from ffn_jax.sweep import DIVERGED_FILE

    diverged = [d for d in run_dirs if (epath.Path(d) / DIVERGED_FILE).exists()]
    live = [d for d in run_dirs if d not in diverged]
    if not tuning:
        return live, [], diverged
    field = next(iter(tuning.values()))["field"]
    chosen = {tuple(sorted(t["group"].items())): t["chosen"] for t in tuning.values()}
    final, tune_only = [], []
    for d in live:
        group = dict(load_spec(d).group)
        key = tuple(sorted((k, v) for k, v in group.items() if k not in ("seed", field)))
        (final if chosen.get(key) == group.get(field) else tune_only).append(d)
    return final, tune_only, diverged


def sweep_reference(sweep_dir: PathLike) -> str:
    """The sweep config's ``sweep.reference`` ("" when unset or without ``sweep.json``)."""
    from ffn_jax.sweep import SWEEP_FILE

    path = epath.Path(sweep_dir) / SWEEP_FILE
    config = read_json(path) if path.exists() else {}
    return str(config.get("sweep", {}).get("reference", ""))


def write_report(sweep_dir: PathLike, run_dirs: list[str]) -> str:
    """Evaluate the runs, write results.md / results.csv / runs.csv and the plots; returns
    the table."""
    from ffn_jax import data as data_lib
    from ffn_jax.baselines import baselines

    out = epath.Path(sweep_dir)
    tuning_path = out / "tuning.json"
    tuning = read_json(tuning_path) if tuning_path.exists() else {}
    tuned = next(iter(tuning.values()))["field"] if tuning else ""
    final, tune_only, diverged = _split_runs(run_dirs, tuning)
    spec0 = load_spec(final[0])
    prep = data_lib.prepare(spec0.data)
    train_tokens = prep.splits["train"].n_tokens
    records = collect(final, tuned, train_tokens)
    tune_records = collect(
        tune_only, tuned, train_tokens, splits={d: ("validation",) for d in tune_only}
    )
    reference = sweep_reference(sweep_dir)
    rows = aggregate(records, tuned, reference)
    base = baselines(prep)
    for r in rows:
        r["beats"] = beats(r, base)
    table = markdown_table(rows)
    primary = primary_contrast(rows)
    n_seeds = sorted({r["seeds"] for r in rows})
    m = spec0.model
    tokens = records[0]["tokens"]
    over = [r["label"] for r in rows if r["epochs"] > 1]
    mdes = [r["mde"] for r in rows if not math.isnan(r["mde"])]
    n_family = sum(1 for r in rows if not math.isnan(r["p_holm"]))
    text = [
        "# FFN variant comparison",
        "",
        f"**Regime.** {len(rows)} variants × {'/'.join(map(str, n_seeds))} seeds; d_model "
        f"{m.d_model}, {m.n_layers} layers, {m.n_heads} heads, seq {spec0.data.seq_len}, "
        f"batch {spec0.data.batch_size}, {spec0.data.tokenizer} tokens of {spec0.data.corpus}; "
        f"{tokens:,} training tokens per run ({records[0]['epochs']:.2f} epochs of the "
        f"{train_tokens:,}-token training split, {tokens / records[0]['params_active']:.2f} "
        "tokens per active parameter)."
        + (
            f" Learning rate tuned per variant ({tuned}, see the tuning stage below)."
            if tuning
            else ""
        ),
        "",
        "**Statistics.** val/test loss and bits/byte: mean ± SD over seeds (± is a standard "
        f"deviation, not an error); {scored_line(records)}. Δ: paired (same seed = same data "
        "order and init) difference of test loss from the row's reference ("
        + (reference or "relu for dense rows, the dense variant of its experts for MoE rows")
        + ") with its 95% t interval over "
        f"seeds; Holm p: two-sided paired t-test p, Holm-adjusted over the {n_family} "
        f"contrasts of the table (sig. = family-wise error ≤ {ALPHA:g}). "
        + (
            f"With this many seeds the smallest difference a contrast detects with 80% power "
            f"is about {np.median(mdes):.4f} nats (median over contrasts, from the observed SDs). "
            if mdes
            else ""
        )
        + "beats: the strongest n-gram baseline whose test bits/byte the mean is below. "
        "drops: fraction of MoE routing assignments dropped in training (evaluation is dropless).",
        "",
        timing_line(sweep_dir, records + tune_records),
        "",
        provenance_line(final),
        "",
    ]
    if over:
        text += [f"**Warning:** {', '.join(over)} trained past one epoch (repeated data).", ""]
    if diverged:
        names = ", ".join(epath.Path(d).name for d in diverged)
        text += [f"Diverged runs (loss became NaN/inf; left out): {names}.", ""]
    text += [table, ""]
    for axes, t in primary.items():
        where = " at " + ", ".join(f"{k}={v}" for k, v in axes) if axes else ""
        text += [
            f"**Primary contrast{where}** (declared before the runs): mean test loss of the "
            f"gated variants minus that of the ungated ones, paired over {t.n} seeds: "
            f"{t.mean:+.4f} nats, 95% CI [{t.lo:+.4f}, {t.hi:+.4f}], p = {t.p:.3g}.",
            "",
        ]
    halfwidths = [r["test_loss_ci_halfwidth"] for r in records]
    if halfwidths and not all(math.isnan(h) for h in halfwidths):
        text += [
            "Per-run uncertainty from the finite test split: a 95% bootstrap interval over "
            "contiguous blocks of the split (one eval batch each) has a median half-width of "
            f"{np.nanmedian(halfwidths):.4f} nats (per run in runs.csv); seed-to-seed "
            "variation is what the Δ intervals above carry.",
            "",
        ]
    health = router_health_section(rows)
    if health:
        text += [health, ""]
    text += [baseline_section(base, rows), ""]
    if tuning:
        text += [tuning_section(tuning, rows), ""]
    fits = scaling_fits(rows)
    if fits:
        text += [scaling_section(fits), ""]
    text += [ranking_section(rows)]
    write_text_atomic(out / "results.md", "\n".join(text))
    _write_csv(out / "results.csv", rows)
    for r in records:
        r["stage"] = "final"
    for r in tune_records:
        r["stage"] = "tuning"
    _write_csv(out / "runs.csv", records + tune_records)
    write_plots(sweep_dir, records, rows, base, tuning, fits)
    return table
