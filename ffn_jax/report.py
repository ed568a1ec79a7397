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

The table is data: ``COLUMNS`` lists every column once (its record key, how seeds are
aggregated, its markdown header and cell), and the record, the aggregate, the markdown and
the CSV are all derived from it. A new column is one entry.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ffn_jax import stats
from ffn_jax.flops import flops_per_token
from ffn_jax.metrics import read_metrics
from ffn_jax.run import EVAL_FILE, PROVENANCE_FILE, latest_step, load_spec, read_json
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

    path = os.path.join(run_dir, EVAL_FILE)
    latest = latest_step(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints; finish the sweep with train.py")
    ev = read_json(path) if os.path.exists(path) else {}
    if ev.get("step") == latest and all(s in ev for s in splits):
        return ev
    missing = tuple(s for s in splits if s not in ev) if ev.get("step") == latest else splits
    log.info("evaluating %s (%s)", run_dir, ", ".join(missing))
    return evaluate_run(run_dir, splits=missing)


TIMING_KEYS = ("wall_s", "compile_s", "eval_s", "checkpoint_s", "train_s", "other_s")


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
    ``key_std``, ``"mean"``: mean of the runs that have it, ``"min"``: the smallest,
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
    Column("drop_fraction", "mean", "drops (train)", lambda r: _opt("{:.2%}")(r["drop_fraction"])),
    Column("tokens_per_s", "mean", "tokens/s", lambda r: _opt("{:,.0f}")(r["tokens_per_s"])),
    Column("train_time_s", "mean", "time (s)", lambda r: _opt("{:.0f}")(r["train_time_s"])),
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
    varied = {k for s in specs for k in s.group if k not in ("variant", "seed")}
    ref = _shared(specs[0], varied)
    for d, s in zip(run_dirs, specs, strict=True):
        diff = [k for k, v in _shared(s, varied).items() if v != ref[k]]
        if diff:
            raise ValueError(
                f"sweep directory holds runs of incompatible settings: {os.path.basename(d)} "
                f"differs from {os.path.basename(run_dirs[0])} in {', '.join(diff)}; "
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
            "curve": _curve(rows),
        }
        for split in SPLITS:
            for k in METRICS:
                rec[f"{split}_{k}"] = ev[split][k] if split in ev else math.nan
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


def aggregate(records: list[dict], tuned: str = "") -> list[dict]:
    """One row per cell (in first-seen order), derived from ``COLUMNS``: mean/SD over seeds
    and the contrasts against each row's reference (``contrasts``)."""
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
        row["label"] = label
        row["beats"] = ""
        row["per_seed"] = {
            r["seed"]: r["test_loss"] for r in runs if r["step"] >= r["target_steps"]
        }
        rows.append(row)
    contrasts(rows)
    return rows


def reference_of(row: dict) -> str:
    """The variant a row is compared with: ``relu`` for dense rows; for MoE rows the dense
    variant of their experts' FFN (the parameter-matched dense model, ``swiglu`` here)."""
    return row["ffn"] if row["moe"] else BASELINE


def contrasts(rows: list[dict]) -> None:
    """Fill each row's ``"paired"`` columns: the paired (same seed) difference of test loss
    from its reference at the same axis values, a 95% t interval, the raw p and the
    Holm-adjusted p over the family of every row's contrast, and the smallest effect the
    test detects with 80% power (from the observed SD of the differences)."""
    dense = {(r["base_variant"], r["axes"]): r for r in rows if not r["moe"]}
    family = []
    for row in rows:
        ref_name = reference_of(row)
        ref = dense.get((ref_name, row["axes"]))
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


def _write_csv(path: str, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r if k not in CSV_SKIP))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# ---- calibration, tuning and timing sections ---------------------------------------------


def beats(row: dict, base: dict) -> str:
    """The strongest n-gram baseline whose test bits/byte the row's mean beats."""
    beaten = [
        n for n, b in base.items() if row["test_bits_per_byte_mean"] < b["test"]["bits_per_byte"]
    ]
    return beaten[-1] if beaten else "none"


def baseline_section(base: dict, rows: list[dict]) -> str:
    lines = [
        "## Calibration: n-gram baselines on the same splits",
        "",
        "Interpolated Witten-Bell n-grams over the same token ids, fitted on the training split "
        "(all of it, not only the tokens a run sees), scored on every target of each split.",
        "",
        "| baseline | val loss | val bits/byte | test loss | test bits/byte | beaten by |",
        "|---|---|---|---|---|---|",
    ]
    for name, b in base.items():
        n = sum(r["test_bits_per_byte_mean"] < b["test"]["bits_per_byte"] for r in rows)
        lines.append(
            f"| {name} | {b['validation']['loss']:.4f} | {b['validation']['bits_per_byte']:.4f} "
            f"| {b['test']['loss']:.4f} | {b['test']['bits_per_byte']:.4f} | {n} of {len(rows)} |"
        )
    return "\n".join(lines)


def tuning_section(tuning: dict, rows: list[dict]) -> str:
    """The tuning stage: validation loss at every grid point, the chosen value, and how the
    ranking at each shared value compares with the tuned ranking (Spearman)."""
    from scipy.stats import rankdata

    field = next(iter(tuning.values()))["field"]
    grid = sorted({v for t in tuning.values() for v in t["values"]})
    lines = [
        f"## Tuning stage: validation loss by {field}",
        "",
        "Each variant trained at every grid value (seeds as in `sweep.tune.seeds`); the value "
        "of least validation loss (bold) was chosen, the grid extended past an edge when the "
        "best sat on it. The final table's runs of those seeds are these runs.",
        "",
        "| variant | " + " | ".join(f"{v:g}" for v in grid) + " | chosen | on an edge |",
        "|---|" + "---|" * (len(grid) + 2),
    ]
    for name, t in tuning.items():
        by_v = dict(zip(t["values"], t["val_loss"], strict=True))
        cells = []
        for v in grid:
            loss = by_v.get(v)
            text = (
                "" if loss is None else ("diverged" if not math.isfinite(loss) else f"{loss:.4f}")
            )
            cells.append(f"**{text}**" if v == t["chosen"] else text)
        edge = t["edge"] or "no"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {t['chosen']:g} | {edge} |")
    tuned_loss = {n: min(t["val_loss"]) for n, t in tuning.items()}
    shared = [v for v in grid if all(v in t["values"] for t in tuning.values())]
    if len(tuning) > 2 and shared:
        lines += ["", "Sensitivity: the ranking at one shared value against the tuned ranking:", ""]
        for v in shared:
            at = {
                n: dict(zip(t["values"], t["val_loss"], strict=True))[v] for n, t in tuning.items()
            }
            names = list(tuning)
            ranks = [rankdata([at[n] for n in names]), rankdata([tuned_loss[n] for n in names])]
            rho = float(np.corrcoef(ranks)[0, 1])  # Spearman: Pearson of the ranks
            order = ", ".join(sorted(names, key=lambda n: at[n]))
            lines.append(
                f"- {field}={v:g}: Spearman ρ = {rho:.2f} vs tuned; best to worst: {order}"
            )
    return "\n".join(lines)


SIZE_FIELD = "model.d_model"  # a sweep axis over it is a model-size axis


def scaling_fits(rows: list[dict]) -> dict[str, tuple[stats.PowerLaw, list[tuple[float, float]]]]:
    """Per variant with >= 3 sizes (a ``model.d_model`` axis): the fit of final validation
    loss against training FLOPs, ``L(C) = a * C^-b + c``, and its points ``(C, L)``."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if SIZE_FIELD in r:
            compute = r["flops_per_token"] * r["tokens"]
            points[r["base_variant"]].append((compute, r["validation_loss_mean"]))
    fits = {}
    for variant, pts in points.items():
        if len({c for c, _ in pts}) >= 3:
            pts.sort()
            fits[variant] = (stats.fit_power_law(*zip(*pts, strict=True)), pts)
    return fits


def scaling_section(fits: dict) -> str:
    """The size-scaling fits and each variant's compute multiplier against relu: how much
    more training compute relu needs to reach the variant's loss at its largest size."""
    ref = fits.get(BASELINE)
    lines = [
        "## Scaling with model size",
        "",
        "Final validation loss against training FLOPs (FLOPs per token x tokens) over the "
        "sweep's sizes, fitted by `L(C) = a·C^(−b) + c` (scipy least squares, one fit per "
        "variant through its seed means; no uncertainty on the fit is claimed). Compute "
        "multiplier: relu's compute to reach the variant's fitted loss at its largest size, "
        "over the variant's (> 1 = the variant is worth that much more compute).",
        "",
        "| variant | sizes | a | b | c | compute multiplier vs relu |",
        "|---|---|---|---|---|---|",
    ]
    for variant, (fit, pts) in fits.items():
        mult = math.nan
        if ref is not None and variant != BASELINE:
            mult = stats.compute_multiplier(fit, ref[0], float(fit(pts[-1][0])))
        cell = "—" if math.isnan(mult) else f"{mult:.2f}"
        lines.append(
            f"| {variant} | {len(pts)} | {fit.a:.4g} | {fit.b:.4f} | {fit.c:.4f} | {cell} |"
        )
    return "\n".join(lines)


def ranking_section(rows: list[dict]) -> str:
    """For each axis other than model size (e.g. ``model.ffn_init``): the dense variants'
    ranking by mean test loss at each of its values and the Spearman correlation of each
    ranking with the first value's, over the variants present at both ("does the ranking
    survive?")."""
    from scipy.stats import rankdata

    keys = [k for k in dict.fromkeys(k for r in rows for k, _ in r["axes"]) if k != SIZE_FIELD]
    lines = []
    for key in keys:
        by_value: dict[Any, dict[str, float]] = defaultdict(dict)
        for r in rows:
            axes = dict(r["axes"])
            if key in axes and not r["moe"]:
                by_value[axes[key]][r["base_variant"]] = r["test_loss_mean"]
        if len(by_value) < 2:
            continue
        (first, ref), *others = by_value.items()
        lines += [f"## Ranking across {key}", ""]
        lines.append(f"- {key}={first}: " + ", ".join(sorted(ref, key=lambda v: ref[v])))
        for value, losses in others:
            common = [v for v in ref if v in losses]
            ranks = [rankdata([ref[v] for v in common]), rankdata([losses[v] for v in common])]
            rho = float(np.corrcoef(ranks)[0, 1]) if len(common) > 2 else math.nan
            lines.append(
                f"- {key}={value}: "
                + ", ".join(sorted(losses, key=lambda v: losses[v]))
                + f" (Spearman ρ = {rho:.2f} with {key}={first}, {len(common)} variants)"
            )
        lines.append("")
    return "\n".join(lines)


def timing_line(sweep_dir: str, records: list[dict]) -> str:
    """The sweep's wall time and where it went (summed over every run, tuning included)."""
    path = os.path.join(sweep_dir, "sweep_timing.json")
    sums = {k: sum(r[k] or 0.0 for r in records) for k in TIMING_KEYS}
    wall = read_json(path)["wall_s"] if os.path.exists(path) else sums["wall_s"]
    other = wall - sums["train_s"] - sums["compile_s"] - sums["eval_s"]
    parts = [
        ("training", sums["train_s"]),
        ("compilation", sums["compile_s"]),
        ("evaluation", sums["eval_s"]),
        ("checkpoints, start-up and the rest", other),
    ]
    return (
        f"Sweep wall time {wall / 60:.1f} min over {len(records)} runs: "
        + ", ".join(f"{name} {100 * t / wall:.1f}%" for name, t in parts)
        + "."
    )


# ---- plots --------------------------------------------------------------------------------

MARKERS = "osD^v<>PX*hp"


def _styles(labels: list[str]) -> dict[str, dict]:
    """A distinct (colour, marker) per label: 20 colours, and a marker that changes with
    every colour, so no two of up to 20 labels look alike."""
    import matplotlib

    colours = [matplotlib.colormaps["tab20"](i / 19) for i in range(20)]
    return {
        label: {"color": colours[i % 20], "marker": MARKERS[i % len(MARKERS)]}
        for i, label in enumerate(labels)
    }


def _plots(sweep_dir: str, records: list[dict], rows: list[dict], base: dict, tuning: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(rows, key=lambda r: r["test_bits_per_byte_mean"])
    style = _styles([r["label"] for r in ordered])

    fig, ax = plt.subplots(figsize=(9, 5.5))
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_label[r["label"]].append(r)
    for row in ordered:
        runs = by_label[row["label"]]
        n = min(len(r["curve"]) for r in runs)
        if n == 0:
            continue
        tokens = np.array([t for t, _ in runs[0]["curve"][:n]])
        losses = np.array([[v for _, v in r["curve"][:n]] for r in runs])
        st = style[row["label"]]
        ax.plot(tokens, losses.mean(0), label=row["label"], markersize=4, **st)
        ax.fill_between(tokens, losses.min(0), losses.max(0), color=st["color"], alpha=0.15)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(
        "Validation loss on a fixed subsample spread over the split "
        "(mean over seeds; band = min..max)",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "loss_curves.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(ordered))
    ax.bar(
        x,
        [r["test_bits_per_byte_mean"] for r in ordered],
        yerr=[r["test_bits_per_byte_std"] for r in ordered],
        capsize=4,
        color=[style[r["label"]]["color"] for r in ordered],
    )
    lo = min(r["test_bits_per_byte_mean"] - 3 * r["test_bits_per_byte_std"] for r in ordered)
    hi = max(r["test_bits_per_byte_mean"] + 3 * r["test_bits_per_byte_std"] for r in ordered)
    for name, b in base.items():
        v = b["test"]["bits_per_byte"]
        if lo - 0.3 < v < hi + 0.3:
            ax.axhline(v, color="0.3", linestyle="--", linewidth=1)
            ax.text(len(ordered) - 0.5, v, f" {name}", va="bottom", ha="right", fontsize=8)
            lo, hi = min(lo, v), max(hi, v)
    ax.set_ylim(lo - 0.02, hi + 0.02)
    ax.set_xticks(x, [r["variant"] for r in ordered], rotation=45, ha="right")
    ax.set_ylabel("test bits per byte")
    ax.set_title("Test bits per byte (mean ± SD over seeds; dashed: n-gram baselines)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "bits_per_byte.png"), dpi=120)
    plt.close(fig)

    _forest(sweep_dir, rows, style, plt)
    if tuning:
        _lr_plot(sweep_dir, tuning, plt)
    fits = scaling_fits(rows)
    if fits:
        _scaling_plot(sweep_dir, fits, plt)


def _forest(sweep_dir: str, rows: list[dict], style: dict, plt) -> None:
    """Δ test loss vs each row's reference: the 95% t interval (thick) and the Bonferroni
    simultaneous interval over the family (thin), which Holm's decisions never contradict."""
    family = [r for r in rows if not math.isnan(r["d_test_loss_lo"])]
    if not family:
        return
    family.sort(key=lambda r: r["d_test_loss"])
    level = stats.bonferroni_level(0.95, len(family))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(family) + 1.5))
    for i, r in enumerate(family):
        ref = next(
            x for x in rows if x["base_variant"] == r["reference"] and x["axes"] == r["axes"]
        )
        seeds = sorted(set(r["per_seed"]) & set(ref["per_seed"]))
        wide = stats.paired([r["per_seed"][s] - ref["per_seed"][s] for s in seeds], level)
        st = style[r["label"]]
        ax.plot([wide.lo, wide.hi], [i, i], color=st["color"], linewidth=1)
        ax.plot([r["d_test_loss_lo"], r["d_test_loss_hi"]], [i, i], color=st["color"], linewidth=4)
        ax.plot(r["d_test_loss"], i, color="k", marker=st["marker"], markersize=6)
    ax.axvline(0, color="0.3", linewidth=1)
    ax.set_yticks(range(len(family)), [f"{r['label']} vs {r['reference']}" for r in family])
    ax.set_xlabel("Δ test loss (nats/token), paired over seeds; < 0 = better than reference")
    ax.set_title(
        f"Thick: 95% CI; thin: {100 * level:.2f}% (Bonferroni over {len(family)} contrasts)",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "forest.png"), dpi=120)
    plt.close(fig)


def _scaling_plot(sweep_dir: str, fits: dict, plt) -> None:
    """Validation loss against training FLOPs per variant, with the fitted power laws."""
    style = _styles(list(fits))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (fit, pts) in fits.items():
        c, loss = np.array(pts).T
        grid = np.geomspace(c.min(), c.max(), 50)
        st = style[name]
        ax.plot(c, loss, linestyle="none", label=name, **st)
        ax.plot(grid, fit(grid), color=st["color"], linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Loss vs training compute over model sizes (lines: a·C^-b + c fits)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "scaling.png"), dpi=120)
    plt.close(fig)


def _lr_plot(sweep_dir: str, tuning: dict, plt) -> None:
    """Validation loss against the tuned value, one line per variant (log x)."""
    style = _styles(list(tuning))
    fig, ax = plt.subplots(figsize=(8, 5))
    finite = []
    for name, t in tuning.items():
        v, loss = np.array(t["values"]), np.array(t["val_loss"])
        ok = np.isfinite(loss)
        finite += loss[ok].tolist()
        ax.plot(v[ok], loss[ok], label=name, markersize=5, **style[name])
        ax.plot(
            [t["chosen"]], [min(loss[ok])], color=style[name]["color"], marker="*", markersize=12
        )
    field = next(iter(tuning.values()))["field"]
    ax.set_xscale("log")
    if finite:
        lo = min(finite)
        ax.set_ylim(lo - 0.02, min(max(finite), lo + 0.6) + 0.02)
    ax.set_xlabel(field)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Tuning stage: validation loss vs {field} (star: chosen)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "lr_sweep.png"), dpi=120)
    plt.close(fig)


def provenance_line(run_dirs: list[str]) -> str:
    """Where the runs came from (their ``run.json``): code commits, versions, devices."""
    seen = []
    for d in run_dirs:
        path = os.path.join(d, PROVENANCE_FILE)
        if os.path.exists(path):
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

    diverged = [d for d in run_dirs if os.path.exists(os.path.join(d, DIVERGED_FILE))]
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


def write_report(sweep_dir: str, run_dirs: list[str]) -> str:
    """Evaluate the runs, write results.md / results.csv / runs.csv and the plots; returns
    the table."""
    from ffn_jax import data as data_lib
    from ffn_jax.baselines import baselines

    tuning_path = os.path.join(sweep_dir, "tuning.json")
    tuning = read_json(tuning_path) if os.path.exists(tuning_path) else {}
    tuned = next(iter(tuning.values()))["field"] if tuning else ""
    final, tune_only, diverged = _split_runs(run_dirs, tuning)
    spec0 = load_spec(final[0])
    prep = data_lib.prepare(spec0.data)
    train_tokens = prep.splits["train"].n_tokens
    records = collect(final, tuned, train_tokens)
    tune_records = collect(
        tune_only, tuned, train_tokens, splits={d: ("validation",) for d in tune_only}
    )
    rows = aggregate(records, tuned)
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
        "deviation, not an error). Δ: paired (same seed = same data order and init) "
        "difference of test loss from the row's reference (relu for dense rows, the dense "
        "variant of its experts for MoE rows) with its 95% t interval over seeds; Holm p: "
        f"two-sided paired t-test p, Holm-adjusted over the {n_family} "
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
        names = ", ".join(os.path.basename(d) for d in diverged)
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
    text += [baseline_section(base, rows), ""]
    if tuning:
        text += [tuning_section(tuning, rows), ""]
    fits = scaling_fits(rows)
    if fits:
        text += [scaling_section(fits), ""]
    text += [ranking_section(rows)]
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write("\n".join(text))
    _write_csv(os.path.join(sweep_dir, "results.csv"), rows)
    for r in records:
        r["stage"] = "final"
    for r in tune_records:
        r["stage"] = "tuning"
    _write_csv(os.path.join(sweep_dir, "runs.csv"), records + tune_records)
    _plots(sweep_dir, records, rows, base, tuning)
    return table
