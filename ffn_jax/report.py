"""The comparison report of a sweep: ``results.md``, ``results.csv`` and two plots.

One row per group of runs that differ only in the seed (a variant, or a variant at one
point of the sweep's axes): mean +/- sample std over seeds of validation and test loss,
perplexity and bits per byte; parameters (total / active) and training FLOPs per token;
the paired difference of test loss from the ReLU baseline at the same axis values (same
seeds = same data order) with a paired t-test at 95%; throughput, MFU and wall time from
the runs' metrics.

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

from ffn_jax.flops import flops_per_token
from ffn_jax.metrics import read_metrics
from ffn_jax.run import EVAL_FILE, PROVENANCE_FILE, latest_step, load_spec, read_json
from ffn_jax.spec import ModelSpec, RunSpec, config_field_names

log = logging.getLogger(__name__)

BASELINE = "relu"
# Two-sided 95% critical values of Student's t by degrees of freedom (df > 10: 1.96).
T_CRIT_95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
}
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


def _run_eval(run_dir: str) -> dict:
    """``eval.json`` of the run, (re)computed if missing or older than the last checkpoint."""
    from ffn_jax.evaluate import evaluate_run

    path = os.path.join(run_dir, EVAL_FILE)
    latest = latest_step(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints; finish the sweep with train.py")
    if os.path.exists(path):
        ev = read_json(path)
        if ev.get("step") == latest:
            return ev
    log.info("evaluating %s", run_dir)
    return evaluate_run(run_dir)


def _throughput(rows: list[dict]) -> dict:
    train = [r for r in rows if "tokens_per_s" in r]
    steady = train[1:] or train  # the first window includes warm-up
    end = [r for r in rows if r.get("event") == "end"]
    return {
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steady])) if steady else None,
        "mfu": float(np.mean([r["mfu"] for r in steady])) if steady else None,
        "train_time_s": end[-1]["train_time_s"] if end else None,
    }


# ---- the columns ------------------------------------------------------------------------


def _pm(key: str, digits: int) -> Callable[[dict], str]:
    return lambda r: f"{r[f'{key}_mean']:.{digits}f} ± {r[f'{key}_std']:.{digits}f}"


def _delta(r: dict) -> str:
    if r["significant"] in ("baseline", "no finished relu"):
        return "—"
    return f"{r['d_test_loss']:+.4f} ± {r['d_test_loss_se']:.4f}"


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
    ``"paired"``: the paired test against the baseline); ``header``/``cell`` its markdown
    column (None: CSV only)."""

    key: str
    agg: str
    header: str | None = None
    cell: Callable[[dict], str] | None = None


COLUMNS: tuple[Column, ...] = (
    Column("label", "first", "variant", lambda r: r["label"] + _marks(r)),
    Column("seeds", "first"),
    Column("causal", "first"),
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
    Column("step", "min"),  # the least-trained run of the group (eval.json's step)
    Column("target_steps", "first"),
    *(Column(f"{split}_{k}", "seeds") for split in SPLITS for k in METRICS),
    Column("d_test_loss", "paired", "Δ test loss vs relu", _delta),
    Column("significant", "paired", "sig. (95%)", lambda r: r["significant"]),
    Column("tokens_per_s", "mean", "tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
    Column("mfu", "mean", "MFU", lambda r: f"{100 * r['mfu']:.1f}%"),
    Column("train_time_s", "mean", "time (s)", lambda r: f"{r['train_time_s']:.0f}"),
)
# Markdown cells of the per-seed metrics, placed after the FLOPs column.
METRIC_CELLS = (
    ("val loss", _pm("validation_loss", 4)),
    ("test loss", _pm("test_loss", 4)),
    ("test ppl", _pm("test_perplexity", 3)),
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


def _label(group: dict) -> str:
    axes = [
        f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
        for k, v in group.items()
        if k not in ("variant", "seed")
    ]
    return " ".join([str(group["variant"]), *axes])


def collect(run_dirs: list[str]) -> list[dict]:
    """One record per run: identity (group keys), sizes, eval results, throughput, the
    validation curve."""
    from ffn_jax.moe.routers import ROUTERS

    records = []
    for d, spec in zip(run_dirs, load_specs(run_dirs), strict=True):
        ev = _run_eval(d)
        rows = read_metrics(d)
        m = spec.model
        rec = {
            "run": spec.name,
            "group": dict(spec.group),
            "label": _label(dict(spec.group)),
            "variant": spec.group["variant"],
            "seed": spec.group.get("seed", spec.seed),
            "causal": m.moe is None or ROUTERS[m.moe.router].causal,
            "tokens": spec.train.steps * spec.tokens_per_step,
            "step": int(ev["step"]),
            "target_steps": spec.train.steps,
            "flops_per_token": flops_per_token(m, spec.data.seq_len)["train"],
            **param_counts(m),
            **_throughput(rows),
            "curve": [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r],
        }
        for split in SPLITS:
            for k in METRICS:
                rec[f"{split}_{k}"] = ev[split][k]
        records.append(rec)
    return records


# ---- aggregation --------------------------------------------------------------------------


def _paired_test(diffs: list[float]) -> tuple[float, float, str]:
    n = len(diffs)
    mean = float(np.mean(diffs))
    if n < 2:
        return mean, float("nan"), "n/a (1 seed)"
    se = float(np.std(diffs, ddof=1) / math.sqrt(n))
    crit = T_CRIT_95.get(n - 1, 1.96)
    if se == 0:
        return mean, se, "yes" if mean != 0 else "no"
    return mean, se, "yes" if abs(mean / se) > crit else "no"


def _axes_key(group: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in group.items() if k not in ("variant", "seed")))


def aggregate(records: list[dict]) -> list[dict]:
    """One row per group (in first-seen order), derived from ``COLUMNS``: mean/std over
    seeds, and the paired difference of test loss from the baseline variant at the same
    axis values."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_label[r["label"]].append(r)
    base: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r["variant"] == BASELINE and r["step"] >= r["target_steps"]:  # finished runs only
            base[_axes_key(r["group"])][r["seed"]] = r["test_loss"]
    rows = []
    for label, runs in by_label.items():
        first = runs[0]
        ref = base.get(_axes_key(first["group"]), {})
        paired = [r["test_loss"] - ref[r["seed"]] for r in runs if r["seed"] in ref]
        if first["variant"] == BASELINE:
            test: tuple[float, float, str] = (0.0, 0.0, "baseline")
        elif paired:
            test = _paired_test(paired)
        else:
            test = (float("nan"), float("nan"), "no finished relu")
        row: dict[str, Any] = {"variant": label, "seeds": len(runs)}
        row.update({k: v for k, v in first["group"].items() if k not in ("variant", "seed")})
        for col in COLUMNS:
            if col.agg == "first" and col.key not in ("label", "seeds"):
                row[col.key] = first[col.key]
            elif col.agg == "seeds":
                vals = [r[col.key] for r in runs]
                row[f"{col.key}_mean"] = float(np.mean(vals))
                row[f"{col.key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            elif col.agg == "min":
                row[col.key] = min(r[col.key] for r in runs)
            elif col.agg == "mean":
                vals = [r[col.key] for r in runs if r[col.key] is not None]
                row[col.key] = float(np.mean(vals)) if vals else float("nan")
            elif col.key == "d_test_loss":
                row["d_test_loss"], row["d_test_loss_se"] = test[0], test[1]
            elif col.key == "significant":
                row["significant"] = test[2]
        row["label"] = label
        rows.append(row)
    return rows


def _markdown_columns() -> list[tuple[str, Callable[[dict], str]]]:
    cols = [(c.header, c.cell) for c in COLUMNS if c.header and c.cell]
    at = next(i for i, (h, _) in enumerate(cols) if h == "train MFLOPs/tok") + 1
    return cols[:at] + list(METRIC_CELLS) + cols[at:]


def markdown_table(rows: list[dict]) -> str:
    """The results table as markdown, sorted by test bits per byte."""
    cols = _markdown_columns()
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: r["test_bits_per_byte_mean"]):
        lines.append("| " + " | ".join(cell(r) for _, cell in cols) + " |")
    return "\n".join(lines)


def csv_fields(rows: list[dict]) -> list[str]:
    """The CSV columns: every key of the aggregated rows, in their order (``label`` is the
    ``variant`` column already)."""
    return [k for k in rows[0] if k not in ("curve", "label")]


def _plots(sweep_dir: str, records: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_label[r["label"]].append(r)
    for variant, runs in by_label.items():
        n = min(len(r["curve"]) for r in runs)
        if n == 0:
            continue
        tokens = np.array([t for t, _ in runs[0]["curve"][:n]])
        losses = np.array([[v for _, v in r["curve"][:n]] for r in runs])
        (line,) = ax.plot(tokens, losses.mean(0), label=variant)
        ax.fill_between(tokens, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss (mean over seeds; band = min..max)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "loss_curves.png"), dpi=120)
    plt.close(fig)

    ordered = sorted(rows, key=lambda r: r["test_bits_per_byte_mean"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(ordered))
    ax.bar(
        x,
        [r["test_bits_per_byte_mean"] for r in ordered],
        yerr=[r["test_bits_per_byte_std"] for r in ordered],
        capsize=4,
        color="tab:blue",
    )
    lo = min(r["test_bits_per_byte_mean"] - 3 * r["test_bits_per_byte_std"] for r in ordered)
    hi = max(r["test_bits_per_byte_mean"] + 3 * r["test_bits_per_byte_std"] for r in ordered)
    ax.set_ylim(lo - 0.01, hi + 0.01)
    ax.set_xticks(x, [r["variant"] for r in ordered], rotation=45, ha="right")
    ax.set_ylabel("test bits per byte")
    ax.set_title("Final test bits per byte (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "bits_per_byte.png"), dpi=120)
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


def write_report(sweep_dir: str, run_dirs: list[str]) -> str:
    """Evaluate the runs, write results.md / results.csv / the plots; returns the table."""
    records = collect(run_dirs)
    rows = aggregate(records)
    table = markdown_table(rows)
    tokens = sorted({r["tokens"] for r in rows})
    header = (
        f"# FFN variant comparison\n\n{len(records)} runs, {len(rows)} variants, "
        f"{tokens[0]:,} training tokens per run. Mean ± std over seeds; "
        "Δ = paired (same seed) difference of test loss from relu ± its standard "
        "error; sig. = paired t-test at 95%. A run evaluated before its target step is "
        "marked unfinished and never used as the baseline.\n\n"
        f"{provenance_line(run_dirs)}\n\n"
    )
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write(header + table + "\n")
    fields = csv_fields(rows)
    with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    _plots(sweep_dir, records, rows)
    return table
