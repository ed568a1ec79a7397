"""The comparison report on synthetic records: aggregation, the paired test, the table."""

import math

import numpy as np
import pytest

from ffn_jax import report


def record(variant, seed, test_loss, **group):
    """A run record as ``report.collect`` makes it, with made-up numbers."""
    g = {"variant": variant, **group, "seed": seed}
    rec = {
        "run": f"{variant}-s{seed}",
        "group": g,
        "label": report._label(g),
        "variant": variant,
        "seed": seed,
        "causal": variant != "ec",
        "tokens": 1000,
        "step": 10,
        "target_steps": 10,
        "flops_per_token": 2e6,
        "params_total": 10_000_000,
        "params_active": 5_000_000,
        "tokens_per_s": 100.0 + seed,
        "mfu": 0.5,
        "train_time_s": None if seed else 10.0,
        "curve": [(500, test_loss + 1), (1000, test_loss)],
    }
    for split in report.SPLITS:
        rec[f"{split}_loss"] = test_loss + (0.01 if split == "validation" else 0.0)
        rec[f"{split}_perplexity"] = math.exp(test_loss)
        rec[f"{split}_bits_per_byte"] = test_loss / math.log(2)
    return rec


RELU = [2.0, 2.1, 2.2]
SWIGLU = [1.9, 2.05, 2.1]  # diffs -0.1, -0.05, -0.1


def test_aggregate_means_stds_and_paired_test_by_hand():
    recs = [record("relu", s, v) for s, v in enumerate(RELU)]
    recs += [record("swiglu", s, v) for s, v in enumerate(SWIGLU)]
    rows = {r["variant"]: r for r in report.aggregate(recs)}
    relu, swiglu = rows["relu"], rows["swiglu"]
    assert relu["seeds"] == 3 and relu["significant"] == "baseline"
    assert relu["test_loss_mean"] == pytest.approx(2.1)
    assert relu["test_loss_std"] == pytest.approx(0.1)  # sample std (ddof 1)
    diffs = np.array(SWIGLU) - np.array(RELU)
    se = diffs.std(ddof=1) / math.sqrt(3)
    assert swiglu["d_test_loss"] == pytest.approx(diffs.mean())
    assert swiglu["d_test_loss_se"] == pytest.approx(se)
    t = abs(diffs.mean() / se)  # 8.66 > 4.303 (df 2)
    assert swiglu["significant"] == ("yes" if t > report.T_CRIT_95[2] else "no") == "yes"
    assert swiglu["train_time_s"] == 10.0  # mean over the runs that have it
    assert swiglu["tokens_per_s"] == pytest.approx(101.0)


def test_paired_test_edge_cases():
    assert report._paired_test([0.1])[2] == "n/a (1 seed)"
    assert report._paired_test([0.1, 0.1]) == (pytest.approx(0.1), 0.0, "yes")
    assert report._paired_test([0.1, -0.1])[2] == "no"
    recs = [record("swiglu", 0, 2.0)]  # no baseline in the sweep
    (row,) = report.aggregate(recs)
    assert row["significant"] == "no finished relu" and math.isnan(row["d_test_loss"])


def test_axes_make_groups_paired_at_the_same_value():
    recs = []
    for lr, shift in ((1e-3, 0.0), (3e-3, 0.5)):
        recs += [record("relu", s, v + shift, **{"train.lr": lr}) for s, v in enumerate(RELU)]
        recs += [record("swiglu", s, v + shift, **{"train.lr": lr}) for s, v in enumerate(SWIGLU)]
    rows = {r["variant"]: r for r in report.aggregate(recs)}
    assert set(rows) == {"relu lr=0.001", "swiglu lr=0.001", "relu lr=0.003", "swiglu lr=0.003"}
    # Paired against relu at the same learning rate: the 0.5 shift cancels.
    assert rows["swiglu lr=0.003"]["d_test_loss"] == pytest.approx(
        rows["swiglu lr=0.001"]["d_test_loss"]
    )
    assert rows["relu lr=0.003"]["train.lr"] == 3e-3
    assert "train.lr" in report.csv_fields(list(rows.values()))


def test_markdown_table_is_derived_from_the_columns():
    recs = [
        record(v, s, base + 0.3 * i)
        for i, v in enumerate(("relu", "ec"))
        for s, base in enumerate(RELU)
    ]
    table = report.markdown_table(report.aggregate(recs))
    head, rule, *lines = table.splitlines()
    headers = [h.strip() for h in head.strip("|").split("|")]
    assert headers == [h for h, _ in report._markdown_columns()]
    assert headers[:3] == ["variant", "params (total / active)", "train MFLOPs/tok"]
    assert "test bits/byte" in headers and headers[-1] == "time (s)"
    assert rule.count("---|") == len(headers)
    assert lines[0].startswith("| relu |") and lines[1].startswith("| ec (non-causal!) |")
    assert "10.000M / 5.000M" in lines[0] and "| — | baseline |" in lines[0]


def test_csv_fields_cover_every_column():
    rows = report.aggregate([record("relu", 0, 2.0)])
    fields = report.csv_fields(rows)
    assert fields[:2] == ["variant", "seeds"] and "label" not in fields
    for col in report.COLUMNS:
        if col.agg == "seeds":
            assert {f"{col.key}_mean", f"{col.key}_std"} <= set(fields)
        elif col.key not in ("label",):
            assert col.key in fields, col.key


def test_unfinished_runs_are_marked_and_never_a_baseline():
    recs = [record("relu", s, v) for s, v in enumerate(RELU)]
    recs += [record("swiglu", s, v) for s, v in enumerate(SWIGLU)]
    recs[0]["step"] = 6  # relu seed 0 stopped early (a signal, a fallback)
    rows = {r["variant"]: r for r in report.aggregate(recs)}
    assert rows["relu"]["step"] == 6 and rows["swiglu"]["step"] == 10
    diffs = np.array(SWIGLU[1:]) - np.array(RELU[1:])  # seed 0 is left out of the pairing
    assert rows["swiglu"]["d_test_loss"] == pytest.approx(diffs.mean())
    table = report.markdown_table(list(rows.values()))
    assert "| relu (unfinished: step 6 of 10) |" in table
    assert "| swiglu |" in table
