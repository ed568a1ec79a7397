"""The comparison report on synthetic records: aggregation, the contrasts and their
multiplicity correction, the table."""

import math

import numpy as np
import pytest
import scipy.stats

from ffn_jax import report, report_sections


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
        "moe": variant.startswith("moe"),
        "ffn": "swiglu" if variant.startswith("moe") else variant,
        "tuned": None,
        "tokens": 1000,
        "epochs": 0.5,
        "step": 10,
        "target_steps": 10,
        "flops_per_token": 2e6,
        "params_total": 10_000_000,
        "params_active": 5_000_000,
        "tokens_per_s": 100.0 + seed,
        "mfu": 0.5,
        "train_time_s": None if seed else 10.0,
        "drop_fraction": None,
        "test_loss_ci_halfwidth": 0.01,
        "curve": [(500, test_loss + 1), (1000, test_loss)],
    }
    for split in report.SPLITS:
        rec[f"{split}_loss"] = test_loss + (0.01 if split == "validation" else 0.0)
        rec[f"{split}_perplexity"] = math.exp(test_loss)
        rec[f"{split}_bits_per_byte"] = test_loss / math.log(2)
    return rec


RELU = [2.0, 2.1, 2.2]
SWIGLU = [1.9, 2.05, 2.1]  # diffs -0.1, -0.05, -0.1


def test_aggregate_means_stds_and_paired_interval_by_hand():
    recs = [record("relu", s, v) for s, v in enumerate(RELU)]
    recs += [record("swiglu", s, v) for s, v in enumerate(SWIGLU)]
    rows = {r["variant"]: r for r in report.aggregate(recs)}
    relu, swiglu = rows["relu"], rows["swiglu"]
    assert relu["seeds"] == 3 and relu["significant"] == "reference"
    assert relu["test_loss_mean"] == pytest.approx(2.1)
    assert relu["test_loss_std"] == pytest.approx(0.1)  # sample std (ddof 1)
    diffs = np.array(SWIGLU) - np.array(RELU)
    se = diffs.std(ddof=1) / math.sqrt(3)
    half = 4.302652729911275 * se  # t_{0.975, df=2}
    assert swiglu["d_test_loss"] == pytest.approx(diffs.mean())
    assert swiglu["d_test_loss_lo"] == pytest.approx(diffs.mean() - half)
    assert swiglu["d_test_loss_hi"] == pytest.approx(diffs.mean() + half)
    assert swiglu["p_raw"] == pytest.approx(scipy.stats.ttest_1samp(diffs, 0).pvalue)
    assert swiglu["p_holm"] == swiglu["p_raw"]  # a family of one
    assert swiglu["significant"] == "yes"  # p = 0.013
    assert swiglu["train_time_s"] == 10.0  # mean over the runs that have it
    assert swiglu["tokens_per_s"] == pytest.approx(101.0)


def test_holm_over_the_family_and_moe_rows_against_dense_swiglu():
    shifts = {"gelu": [-0.05, -0.06, -0.04], "swish": [0.01, -0.01, 0.02]}
    recs = [record("relu", s, v) for s, v in enumerate(RELU)]
    recs += [record("swiglu", s, v) for s, v in enumerate(SWIGLU)]
    recs += [record(n, s, RELU[s] + d[s]) for n, d in shifts.items() for s in range(3)]
    recs += [record("moe_top1", s, SWIGLU[s] + 0.02 + 0.001 * s) for s in range(3)]
    rows = {r["variant"]: r for r in report.aggregate(recs)}
    assert rows["moe_top1"]["reference"] == "swiglu"
    assert rows["moe_top1"]["d_test_loss"] == pytest.approx(0.021)
    assert rows["gelu"]["reference"] == "relu"
    family = ["swiglu", "gelu", "swish", "moe_top1"]
    raw = [rows[n]["p_raw"] for n in family]
    m, order = len(raw), np.argsort(raw)
    want, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):  # Holm's step-down, written out
        running = max(running, min(1.0, (m - rank) * raw[i]))
        want[i] = running
    assert [rows[n]["p_holm"] for n in family] == pytest.approx(want)
    assert rows["swish"]["significant"] == "no" and rows["moe_top1"]["significant"] == "yes"


def test_sweep_reference_pairs_every_row_against_one_moe_arm(tmp_path):
    """``sweep.reference`` (the ``moe`` preset's aux-loss arm) replaces the default rule:
    MoE rows are paired against it, with no dense row in the sweep."""
    aux = [2.0, 2.1, 2.05]
    recs = [record("moe_aux", s, v) for s, v in enumerate(aux)]
    recs += [record("moe_free", s, v - 0.01 * (s + 1)) for s, v in enumerate(aux)]
    default = {r["variant"]: r for r in report.aggregate(recs)}
    assert default["moe_free"]["significant"] == "no reference"  # no dense swiglu here
    rows = {r["variant"]: r for r in report.aggregate(recs, reference="moe_aux")}
    assert rows["moe_aux"]["significant"] == "reference"
    assert rows["moe_free"]["reference"] == "moe_aux"
    assert rows["moe_free"]["d_test_loss"] == pytest.approx(-0.02)
    (tmp_path / "sweep.json").write_text('{"sweep": {"reference": "moe_aux"}}')
    assert report.sweep_reference(str(tmp_path)) == "moe_aux"
    assert report.sweep_reference(str(tmp_path / "none")) == ""


def test_primary_contrast_is_gated_minus_ungated_per_seed():
    recs = [record("relu", s, v) for s, v in enumerate(RELU)]
    recs += [record("gelu", s, v + 0.02) for s, v in enumerate(RELU)]
    recs += [record("swiglu", s, v) for s, v in enumerate(SWIGLU)]
    recs += [record("geglu", s, v - 0.02) for s, v in enumerate(SWIGLU)]
    (t,) = report.primary_contrast(report.aggregate(recs)).values()
    per_seed = np.array(SWIGLU) - np.array(RELU) - 0.02  # (s + g)/2 - (r + ge)/2
    assert t.n == 3 and t.mean == pytest.approx(per_seed.mean())


def test_single_seed_and_missing_reference():
    (row,) = report.aggregate([record("swiglu", 0, 2.0)])  # no relu in the sweep
    assert row["significant"] == "no reference" and math.isnan(row["d_test_loss"])
    rows = {
        r["variant"]: r for r in report.aggregate([record("relu", 0, 2.0), record("gelu", 0, 1.9)])
    }
    assert (
        rows["gelu"]["d_test_loss"] == pytest.approx(-0.1) and rows["gelu"]["significant"] == "n/a"
    )


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
    shown = [h for h, _ in report._markdown_columns() if h not in ("tuned", "drops (train)")]
    assert headers == shown  # untuned, no MoE: those two columns are left out
    assert headers[:3] == ["variant", "params (total / active)", "train MFLOPs/tok"]
    assert "test bits/byte" in headers and headers[-1] == "time (s)"
    assert rule.count("---|") == len(headers)
    assert lines[0].startswith("| relu |") and lines[1].startswith("| ec (non-causal!) |")
    assert "10.000M / 5.000M" in lines[0] and "| — | reference |" in lines[0]


def test_csv_fields_cover_every_column():
    rows = report.aggregate([record("relu", 0, 2.0)])
    fields = report.csv_fields(rows)
    assert fields[:2] == ["variant", "seeds"] and "label" not in fields
    for col in report.COLUMNS:
        if col.key in ("label", "beats"):
            continue
        if col.agg == "seeds":
            assert {f"{col.key}_mean", f"{col.key}_std"} <= set(fields)
        else:
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


def test_size_axis_gives_power_law_fits_and_compute_multipliers():
    laws = {"relu": (60.0, 0.3, 1.4), "swiglu": (50.0, 0.3, 1.4)}
    recs = []
    for d_model, fpt in ((64, 1e6), (128, 4e6), (256, 1.6e7), (512, 6.4e7)):
        for variant, (a, b, c) in laws.items():
            for seed in range(2):
                r = record(variant, seed, 2.0, **{"model.d_model": d_model})
                r["flops_per_token"] = fpt
                r["validation_loss"] = a * (fpt * r["tokens"]) ** -b + c
                recs.append(r)
    fits = report_sections.scaling_fits(report.aggregate(recs))
    assert set(fits) == {"relu", "swiglu"}
    fit, pts = fits["swiglu"]
    assert len(pts) == 4 and (fit.a, fit.b, fit.c) == pytest.approx(laws["swiglu"], rel=1e-4)
    section = report_sections.scaling_section(fits)
    # relu needs (60 / 50)^(1 / 0.3) = 1.84x swiglu's compute for any loss above 1.4.
    want = (60.0 / 50.0) ** (1 / 0.3)
    assert "| swiglu | 4 |" in section and f"{want:.2f}" in section


def test_ranking_across_an_axis_with_its_rank_correlation():
    recs = []
    for init, order in (
        ("default", ("relu", "gelu", "swiglu")),
        ("unit_variance", ("swiglu", "gelu", "relu")),
    ):
        for i, variant in enumerate(order):
            recs += [
                record(variant, s, 2.0 + 0.1 * i + 0.01 * s, **{"model.ffn_init": init})
                for s in range(2)
            ]
    text = report_sections.ranking_section(report.aggregate(recs))
    assert "- model.ffn_init=default: relu, gelu, swiglu" in text
    assert "- model.ffn_init=unit_variance: swiglu, gelu, relu (Spearman ρ = -1.00" in text
    # relu: 2.00/2.01 at default, 2.20/2.21 at unit_variance: +0.2 on each seed.
    assert "| relu | 2.0050 | 2.2050 | +0.2000 (+0.2000, +0.2000) |" in text
    # Hidden SD at init: relu 0.584 < gelu 0.588 < swiglu 0.600 (the table), so
    # the default losses rise with it (rho +1) and the unit-variance losses fall (rho -1).
    assert "(N(0, 1) pre-activations): +1.00 at default, -1.00 at unit_variance" in text
