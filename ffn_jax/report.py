"""The comparison report of a sweep: ``results.md``, ``results.csv`` and two plots.

Per variant (mean +/- sample std over seeds): validation and test loss, perplexity and bits
per byte; parameters (total / active) and training FLOPs per token; the paired difference
of test loss from the ReLU baseline (same seeds = same data order) with a paired t-test at
95%; throughput, MFU and wall time from the runs' metrics.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import defaultdict

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from ffn_jax.configuration import load_config
from ffn_jax.flops import flops_per_token
from ffn_jax.metrics import read_metrics

log = logging.getLogger(__name__)

BASELINE = "relu"
# Two-sided 95% critical values of Student's t by degrees of freedom (df > 10: 1.96).
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
             8: 2.306, 9: 2.262, 10: 2.228}
SPLITS = ("validation", "test")
METRICS = ("loss", "perplexity", "bits_per_byte")


def param_counts(config: ConfigDict) -> dict[str, int]:
    """Total parameters of the run's model and those active per token (MoE: routed experts
    count only top-k of E)."""
    from ffn_jax.model import LM, dense_d_ff, is_moe_layer

    m = config.model
    abstract = nnx.eval_shape(lambda: LM(m, rngs=nnx.Rngs(0)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    active = total
    if m.moe.num_experts > 0:
        from ffn_jax.moe import moe_cost

        cost = moe_cost(m.moe, m.ffn, m.d_model, dense_d_ff(m))
        n_moe = sum(is_moe_layer(i, m) for i in range(m.n_layers))
        active -= n_moe * (cost["total_params"] - cost["active_params"])
    return {"params_total": int(total), "params_active": int(active)}


def _run_eval(run_dir: str) -> dict:
    """``eval.json`` of the run, (re)computed if missing or older than the last checkpoint."""
    from ffn_jax.evaluate import evaluate_run
    from ffn_jax.trainer import latest_step

    path = os.path.join(run_dir, "eval.json")
    latest = latest_step(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints; finish the sweep with train.py")
    if os.path.exists(path):
        with open(path) as f:
            ev = json.load(f)
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


# Settings every run of a comparison must share.
SHARED_FIELDS = ("data", "train.steps", "train.lr", "train.schedule", "train.warmup_steps",
                 "model.d_model", "model.n_layers", "model.n_heads")


def _shared(config: ConfigDict) -> dict:
    flat = {}
    for field in SHARED_FIELDS:
        node = config
        for part in field.split("."):
            node = node[part]
        flat[field] = node.to_dict() if isinstance(node, ConfigDict) else node
    flat["data"].pop("cache_dir", None)
    flat["data"].pop("num_workers", None)
    return flat


def check_compatible(run_dirs: list[str]) -> list[ConfigDict]:
    """The runs' configs; ValueError if they differ in settings a comparison must share."""
    configs = [load_config(d) for d in run_dirs]
    ref = _shared(configs[0])
    for d, c in zip(run_dirs, configs, strict=True):
        diff = [k for k, v in _shared(c).items() if v != ref[k]]
        if diff:
            raise ValueError(
                f"sweep directory holds runs of incompatible settings: {os.path.basename(d)} "
                f"differs from {os.path.basename(run_dirs[0])} in {', '.join(diff)}; "
                "move it out or evaluate it on its own"
            )
    return configs


def collect(run_dirs: list[str]) -> list[dict]:
    """One record per run: identity, sizes, eval results, throughput and the val curve."""
    records = []
    for d, config in zip(run_dirs, check_compatible(run_dirs), strict=True):
        ev = _run_eval(d)
        rows = read_metrics(d)
        variant = config.name.rsplit("-s", 1)[0]
        rec = {
            "run": config.name, "variant": variant, "seed": config.seed,
            "causal": not (config.model.moe.num_experts > 0
                           and config.model.moe.router == "expert_choice"),
            "tokens": config.train.steps * config.data.batch_size * config.data.seq_len,
            "flops_per_token": flops_per_token(config.model, config.data.seq_len)["train"],
            **param_counts(config), **_throughput(rows),
            "curve": [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r],
        }
        for split in SPLITS:
            for k in METRICS:
                rec[f"{split}_{k}"] = ev[split][k]
        records.append(rec)
    return records


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


def aggregate(records: list[dict]) -> list[dict]:
    """One row per variant (in first-seen order) with mean/std over seeds and the paired
    difference of test loss from the ReLU baseline."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_variant[r["variant"]].append(r)
    base = {r["seed"]: r["test_loss"] for r in by_variant.get(BASELINE, [])}
    rows = []
    for variant, runs in by_variant.items():
        row = {"variant": variant, "seeds": len(runs), "causal": runs[0]["causal"]}
        for k in ("params_total", "params_active", "flops_per_token", "tokens"):
            row[k] = runs[0][k]
        for split in SPLITS:
            for k in METRICS:
                vals = [r[f"{split}_{k}"] for r in runs]
                row[f"{split}_{k}_mean"] = float(np.mean(vals))
                row[f"{split}_{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        paired = [r["test_loss"] - base[r["seed"]] for r in runs if r["seed"] in base]
        if variant == BASELINE:
            row["d_test_loss"], row["d_test_loss_se"], row["significant"] = 0.0, 0.0, "baseline"
        elif paired:
            row["d_test_loss"], row["d_test_loss_se"], row["significant"] = _paired_test(paired)
        else:
            nan = float("nan")
            row["d_test_loss"], row["d_test_loss_se"], row["significant"] = nan, nan, "no relu"
        for k in ("tokens_per_s", "mfu", "train_time_s"):
            vals = [r[k] for r in runs if r[k] is not None]
            row[k] = float(np.mean(vals)) if vals else float("nan")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The results table as markdown, sorted by test bits per byte."""
    head = ("| variant | params (total / active) | train MFLOPs/tok | val loss | test loss | "
            "test ppl | test bits/byte | Δ test loss vs relu | sig. (95%) | tokens/s | MFU | "
            "time (s) |")
    lines = [head, "|" + "---|" * 12]
    for r in sorted(rows, key=lambda r: r["test_bits_per_byte_mean"]):
        name = r["variant"] + ("" if r["causal"] else " (non-causal!)")
        d = ("—" if r["significant"] in ("baseline", "no relu")
             else f"{r['d_test_loss']:+.4f} ± {r['d_test_loss_se']:.4f}")
        lines.append(
            f"| {name} | {r['params_total'] / 1e6:.3f}M / {r['params_active'] / 1e6:.3f}M | "
            f"{r['flops_per_token'] / 1e6:.2f} | "
            f"{r['validation_loss_mean']:.4f} ± {r['validation_loss_std']:.4f} | "
            f"{r['test_loss_mean']:.4f} ± {r['test_loss_std']:.4f} | "
            f"{r['test_perplexity_mean']:.3f} ± {r['test_perplexity_std']:.3f} | "
            f"{r['test_bits_per_byte_mean']:.4f} ± {r['test_bits_per_byte_std']:.4f} | {d} | "
            f"{r['significant']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['train_time_s']:.0f} |"
        )
    return "\n".join(lines)


def _plots(sweep_dir: str, records: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_variant[r["variant"]].append(r)
    for variant, runs in by_variant.items():
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
    ax.bar(x, [r["test_bits_per_byte_mean"] for r in ordered],
           yerr=[r["test_bits_per_byte_std"] for r in ordered], capsize=4, color="tab:blue")
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


def write_report(sweep_dir: str, run_dirs: list[str]) -> str:
    """Evaluate the runs, write results.md / results.csv / the plots; returns the table."""
    records = collect(run_dirs)
    rows = aggregate(records)
    table = markdown_table(rows)
    tokens = sorted({r["tokens"] for r in rows})
    header = (f"# FFN variant comparison\n\n{len(records)} runs, {len(rows)} variants, "
              f"{tokens[0]:,} training tokens per run. Mean ± std over seeds; "
              "Δ = paired (same seed) difference of test loss from relu ± its standard "
              "error; sig. = paired t-test at 95%.\n\n")
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write(header + table + "\n")
    fields = [k for k in rows[0] if k != "curve"]
    with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    _plots(sweep_dir, records, rows)
    return table
