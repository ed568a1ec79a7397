"""The report's sections beyond the main table: router health of the MoE rows, n-gram
calibration, the tuning stage, loss-vs-compute fits over model sizes, rankings across an
axis, and the sweep's wall time.

Each takes the aggregated rows (``ffn_jax.report.aggregate``) or the sweep's files and
returns markdown.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from etils import epath

from ffn_jax import stats
from ffn_jax.files import PathLike, read_json

BASELINE = "relu"  # the reference the compute multipliers are against
TIMING_KEYS = ("wall_s", "compile_s", "eval_s", "checkpoint_s", "train_s", "other_s")


def beats(row: dict, base: dict) -> str:
    """The strongest n-gram baseline whose test bits/byte the row's mean beats."""
    beaten = [
        n for n, b in base.items() if row["test_bits_per_byte_mean"] < b["test"]["bits_per_byte"]
    ]
    return beaten[-1] if beaten else "none"


def _pm_cell(row: dict, key: str, fmt: str) -> str:
    """``mean ± SD`` of a ``"present"`` aggregate (``—`` where no run logged it)."""
    if row.get(key) is None:
        return "—"
    return f"{fmt.format(row[key])} ± {fmt.format(row[f'{key}_std'])}"


def _collapse_cell(row: dict) -> str:
    n = row.get("collapse_alarm_n", 0)
    return f"{round(row['collapse_alarm'] * n)} of {n}" if n else "—"


HEALTH_CELLS = (  # (header, cell) of the router-health table
    ("MaxVio end (mean of layers)", lambda r: _pm_cell(r, "max_violation_final", "{:.3f}")),
    ("MaxVio end (worst layer)", lambda r: _pm_cell(r, "max_violation_final_worst", "{:.3f}")),
    ("MaxVio over training", lambda r: _pm_cell(r, "max_violation_train_mean", "{:.3f}")),
    ("dead experts end", lambda r: _pm_cell(r, "dead_experts_final", "{:.1f}")),
    ("collapse alarms (runs)", _collapse_cell),
    ("drops (train)", lambda r: _pm_cell(r, "drop_fraction", "{:.2%}")),
    ("router logit RMS end", lambda r: _pm_cell(r, "router_logit_rms_final", "{:.3f}")),
)


def router_health_section(rows: list[dict]) -> str:
    """Router health of the MoE rows (``ffn_jax.moe.health``), mean ± SD over seeds, and the
    per-layer MaxVio at the end of training; "" when the sweep has no MoE rows."""
    moe = [r for r in rows if r["moe"]]
    if not moe:
        return ""
    lines = [
        "## Router health (MoE rows)",
        "",
        "MaxVio (Wang et al. 2024): a layer's max expert load / mean load − 1 over a step's "
        "assignments before capacity drops (0 = perfect balance, E − 1 = all on one expert); "
        "end: the last log window, over training: averaged over every log window. Dead "
        "experts: no assignment in the last log window, summed over layers. Collapse alarms: "
        "runs in which a layer's most loaded expert took over half its tokens for "
        "`train.collapse_windows` log windows in a row. Drops: as in the main table. Router "
        "logit RMS: at the end, mean over layers. mean ± SD over seeds; — = not logged (dense, "
        "or runs older than the metric).",
        "",
        "| variant | " + " | ".join(h for h, _ in HEALTH_CELLS) + " |",
        "|---|" + "---|" * len(HEALTH_CELLS),
    ]
    lines += [f"| {r['label']} | " + " | ".join(c(r) for _, c in HEALTH_CELLS) + " |" for r in moe]
    layers = max((len(r.get("max_violation_layers_final") or []) for r in moe), default=0)
    if layers:
        lines += [
            "",
            "MaxVio per MoE layer at the end of training (mean over seeds):",
            "",
            "| variant | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
            "|---|" + "---|" * layers,
        ]
        for r in moe:
            per = r.get("max_violation_layers_final") or []
            cells = [f"{v:.3f}" for v in per] + ["—"] * (layers - len(per))
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import rankdata

    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1]) if len(a) > 2 else math.nan


def ranking_section(rows: list[dict]) -> str:
    """For each axis other than model size (e.g. ``model.ffn_init``): the dense variants'
    ranking by mean test loss at each of its values and the Spearman correlation of each
    ranking with the first value's, over the variants present at both ("does the ranking
    survive?"); a table of each variant's test loss at every value with the seed-paired
    change from the first; for ``model.ffn_init``, the correlation of the test loss with
    the SD of the variant's hidden activation at the default initialisation (the
    parameterisation hypothesis: larger activations, larger steps at a shared rate)."""
    from ffn_jax.ffn import unit_variance_gain

    keys = [k for k in dict.fromkeys(k for r in rows for k, _ in r["axes"]) if k != SIZE_FIELD]
    lines = []
    for key in keys:
        by_value: dict[Any, dict[str, dict]] = defaultdict(dict)
        for r in rows:
            axes = dict(r["axes"])
            if key in axes and not r["moe"]:
                by_value[axes[key]][r["base_variant"]] = r
        if len(by_value) < 2:
            continue
        (first, ref), *others = by_value.items()
        loss = {v: {n: r["test_loss_mean"] for n, r in rs.items()} for v, rs in by_value.items()}
        lines += [f"## Ranking across {key}", ""]
        lines.append(f"- {key}={first}: " + ", ".join(sorted(ref, key=lambda n: loss[first][n])))
        for value, _ in others:
            common = [n for n in ref if n in loss[value]]
            rho = _spearman([loss[first][n] for n in common], [loss[value][n] for n in common])
            lines.append(
                f"- {key}={value}: "
                + ", ".join(sorted(loss[value], key=lambda n: loss[value][n]))
                + f" (Spearman ρ = {rho:.2f} with {key}={first}, {len(common)} variants)"
            )
        lines += [
            "",
            "| variant | "
            + " | ".join(f"test loss, {value}" for value in by_value)
            + " | "
            + " | ".join(f"Δ {value} − {first} (per seed)" for value, _ in others)
            + " |",
            "|---|" + "---|" * (len(by_value) + len(others)),
        ]
        for n in sorted(ref, key=lambda n: loss[first][n]):
            cells = [f"{loss[v].get(n, math.nan):.4f}" for v in by_value]
            for _, rs in others:
                a, b = ref[n]["per_seed"], rs[n]["per_seed"] if n in rs else {}
                seeds = sorted(set(a) & set(b))
                d = [b[s] - a[s] for s in seeds]
                cells.append(
                    f"{np.mean(d):+.4f} ({', '.join(f'{x:+.4f}' for x in d)})" if d else "—"
                )
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        if key == "model.ffn_init":
            sd = {n: 1.0 / unit_variance_gain(n) for n in ref}
            rhos = []
            for v in by_value:
                names = [n for n in loss[v] if n in sd]
                rho = _spearman([sd[n] for n in names], [loss[v][n] for n in names])
                rhos.append(f"{rho:+.2f} at {v}")
            lines += [
                "",
                "Spearman ρ of the test loss with the SD of the variant's hidden activation at "
                f"the default initialisation (N(0, 1) pre-activations): {', '.join(rhos)}. Seeds "
                f"{', '.join(map(str, sorted(ref[next(iter(ref))]['per_seed'])))}; Δ < 0: "
                "lower loss at the second value.",
            ]
        lines.append("")
    return "\n".join(lines)


def timing_line(sweep_dir: PathLike, records: list[dict]) -> str:
    """The sweep's wall time and where it went (summed over every run, tuning included)."""
    path = epath.Path(sweep_dir) / "sweep_timing.json"
    sums = {k: sum(r[k] or 0.0 for r in records) for k in TIMING_KEYS}
    wall = read_json(path)["wall_s"] if path.exists() else sums["wall_s"]
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
