"""The report's plots: validation curves, test bits per byte against the n-gram
baselines, a forest plot of the contrasts, validation loss against the tuned learning rate,
and loss against training compute over model sizes. Each variant keeps one colour and
marker across them."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from etils import epath

from ffn_jax import stats
from ffn_jax.files import PathLike, write_figure

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


def write_plots(
    sweep_dir: PathLike, records: list[dict], rows: list[dict], base: dict, tuning: dict, fits: dict
) -> None:
    """Write every plot of the report into ``sweep_dir`` (the LR plot for a tuned sweep,
    the scaling plot when ``fits`` has any)."""
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
    write_figure(fig, epath.Path(sweep_dir) / "loss_curves.png")
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
    write_figure(fig, epath.Path(sweep_dir) / "bits_per_byte.png")
    plt.close(fig)

    _forest(sweep_dir, rows, style, plt)
    if tuning:
        _lr_plot(sweep_dir, tuning, plt)
    if fits:
        _scaling_plot(sweep_dir, fits, plt)


def _forest(sweep_dir: PathLike, rows: list[dict], style: dict, plt) -> None:
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
    write_figure(fig, epath.Path(sweep_dir) / "forest.png")
    plt.close(fig)


def _scaling_plot(sweep_dir: PathLike, fits: dict, plt) -> None:
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
    write_figure(fig, epath.Path(sweep_dir) / "scaling.png")
    plt.close(fig)


def _lr_plot(sweep_dir: PathLike, tuning: dict, plt) -> None:
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
    write_figure(fig, epath.Path(sweep_dir) / "lr_sweep.png")
    plt.close(fig)
