"""Router health (``ffn_jax.moe.health``): the per-window numbers by hand, the collapse alarm
and its resumable counts, TensorBoard's per-layer scalars, the config field, and the report's
router-health section and ``runs.csv`` columns on a fake sweep directory."""

import csv
import json
import logging
import math

import numpy as np
import pytest

from ffn_jax import report, report_sections
from ffn_jax.metrics import tensorboard_scalars
from ffn_jax.moe import health
from ffn_jax.run import CHECKPOINT_DIR, CONFIG_FILE, EVAL_FILE
from ffn_jax.spec import ConfigError, to_dict
from tests.helpers import run_spec, tiny

# Two MoE layers of four experts: one uneven with a dead expert, one perfectly balanced.
FRACTION = [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]


def test_window_health_by_hand():
    h = health.window_health(FRACTION, top_k=1)
    assert h["moe/dead_experts"] == [1.0, 0.0]
    # Layer 0's relative loads fraction * E = [2, 1, 1, 0], sorted [0, 1, 1, 2]; numpy's
    # linear percentile q sits at position q/100 * 3: 0.3 -> 0.3, 1.5 -> 1, 2.7 -> 1.7.
    assert h["moe/load_p10"] == pytest.approx([0.3, 1.0])
    assert h["moe/load_p50"] == pytest.approx([1.0, 1.0])
    assert h["moe/load_p90"] == pytest.approx([1.7, 1.0])
    assert h["moe/top_token_share"] == pytest.approx([0.5, 0.25])
    # With k = 2 each token makes two assignments: the top expert sees twice the share.
    assert health.window_health(FRACTION, top_k=2)["moe/top_token_share"] == pytest.approx(
        [1.0, 0.5]
    )


def _fractions(share_layer0: float) -> list[list[float]]:
    """Two layers of two experts (top-1): layer 0's top expert (1) at ``share_layer0``."""
    return [[1 - share_layer0, share_layer0], [0.5, 0.5]]


# Layer 0's top share per log window: above 0.5 three times, down (0.5 is not above), up.
SHARES = [0.6, 0.7, 0.8, 0.9, 0.5, 0.6, 0.6, 0.6]
ON = [0, 0, 1, 1, 0, 0, 0, 1]  # with collapse_windows = 3


def test_collapse_alarm_fires_after_n_windows_resets_and_warns_once_per_firing(caplog):
    alarm = health.CollapseAlarm(windows=3)
    with caplog.at_level(logging.WARNING, logger="ffn_jax.moe.health"):
        got = [alarm.update(_fractions(s), 1, step=10 * (i + 1)) for i, s in enumerate(SHARES)]
    assert [g[0] for g in got] == ON  # on after exactly 3 windows, not 2; off at 0.5
    assert all(g[1] == 0.0 for g in got)  # the balanced layer never
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "router collapse in MoE layer 0 at step 30: expert 1 took 80% of the layer's tokens "
        "for 3 log windows in a row; balance the router with model.moe.balance=aux (or a "
        "larger model.moe.lb_loss_coef) or model.moe.balance=loss_free",
        "router collapse in MoE layer 0 at step 80: expert 1 took 60% of the layer's tokens "
        "for 3 log windows in a row; balance the router with model.moe.balance=aux (or a "
        "larger model.moe.lb_loss_coef) or model.moe.balance=loss_free",
    ]


def test_collapse_alarm_off_logs_nothing(caplog):
    alarm = health.CollapseAlarm(windows=0)
    with caplog.at_level(logging.WARNING, logger="ffn_jax.moe.health"):
        assert [alarm.update(_fractions(0.9), 1, 1) for _ in range(4)][-1] == [0.0, 0.0]
        row = health.health_row(_fractions(0.9), 1, alarm, 5)
    assert not caplog.records and "moe/collapse" not in row
    assert "moe/top_token_share" in row


@pytest.mark.parametrize("cut", [1, 2, 3, 5])
def test_counts_restored_from_checkpoint_meta_continue_the_sequence(cut):
    """What the trainer does on a resume: the counts go through the JSON checkpoint meta
    into a fresh alarm, which then logs what the uninterrupted alarm logs."""
    straight = health.CollapseAlarm(windows=3)
    want = [straight.update(_fractions(s), 1, i)[0] for i, s in enumerate(SHARES)]
    before = health.CollapseAlarm(windows=3)
    got = [before.update(_fractions(s), 1, i)[0] for i, s in enumerate(SHARES[:cut])]
    meta = json.loads(json.dumps({"collapse_runs": before.runs}))
    after = health.CollapseAlarm(windows=3, runs=list(meta["collapse_runs"]))
    got += [after.update(_fractions(s), 1, i)[0] for i, s in enumerate(SHARES[cut:])]
    assert got == want == ON


def test_tensorboard_gets_per_layer_scalars_of_moe_lists():
    row = {
        "step": 5,
        "loss": 2.5,
        "moe/max_violation": [0.25, 1.5],
        "moe/expert_fraction": FRACTION,  # nested: JSONL only
        "event": "start",
    }
    assert tensorboard_scalars(row) == {
        "loss": 2.5,
        "moe/max_violation/layer_0": 0.25,
        "moe/max_violation/layer_1": 1.5,
    }


def test_negative_collapse_windows_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.collapse_windows=-1 must be >= 0"):
        run_spec(tiny(**{"train.collapse_windows": -1}))


# ---- the report -----------------------------------------------------------------------


HEALTH = ("max_violation", "dead_experts", "collapse", "router_logit_rms")


def _train_row(step, *health_l):
    """A training log row of two MoE layers with ``HEALTH``'s per-layer values, if given."""
    row = {"step": step, "loss": 2.0, "tokens_per_s": 100.0, "mfu": 0.1}
    row["moe/dropped_fraction"] = [0.1, 0.3]
    row["moe/expert_fraction"] = FRACTION
    return row | {f"moe/{k}": v for k, v in zip(HEALTH, health_l, strict=False)}


# Seed 0: two log rows (its alarm on in layer 1 at the end); seed 1: one row, healthy.
NEW_RUNS = {
    0: [
        _train_row(5, [0.2, 0.6], [0, 1], [0.0, 0.0], [1.0, 1.0]),
        _train_row(10, [0.4, 0.8], [1, 2], [0.0, 1.0], [1.0, 3.0]),
    ],
    1: [_train_row(10, [0.1, 0.3], [0, 0], [0.0, 0.0], [1.0, 1.0])],
}
OLD_RUN = [_train_row(5), _train_row(10)]  # logged before the health metrics


def _fake_run(root, variant, seed, rows):
    """A finished run directory as the report reads it: config.json, a checkpoint step,
    eval.json at that step and metrics.jsonl."""
    d = root / f"{variant}-s{seed}"
    (d / CHECKPOINT_DIR / "10").mkdir(parents=True)
    moe = {"model.moe.num_experts": 4, "model.moe.top_k": 1}
    c = tiny(**moe, **{"train.steps": 10, "train.warmup_steps": 1})
    raw = to_dict(c) | {"name": d.name, "seed": seed, "group": {"variant": variant, "seed": seed}}
    (d / CONFIG_FILE).write_text(json.dumps(raw))
    scores = {"loss": 2.0, "perplexity": math.exp(2.0), "bits_per_byte": 2.9, "tokens": 100}
    (d / EVAL_FILE).write_text(json.dumps({"step": 10, "validation": scores, "test": scores}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    dirs = [_fake_run(root, "moe_top1", s, rows) for s, rows in NEW_RUNS.items()]
    dirs.append(_fake_run(root, "moe_old", 0, OLD_RUN))
    records = report.collect(dirs)
    return root, records, report.aggregate(records)


def test_per_run_router_health_from_the_metrics_rows(sweep):
    _, records, _ = sweep
    s0, s1, old = records
    assert s0["max_violation_final"] == pytest.approx(0.6)  # mean of the last row's layers
    assert s0["max_violation_final_worst"] == pytest.approx(0.8)
    assert s0["max_violation_layers_final"] == pytest.approx([0.4, 0.8])
    assert s0["max_violation_train_mean"] == pytest.approx(0.5)  # mean of 0.4 and 0.6
    assert s0["dead_experts_final"] == 3.0 and s0["collapse_alarm"] == 1.0
    assert s0["router_logit_rms_final"] == pytest.approx(2.0)
    assert s1["collapse_alarm"] == 0.0 and s1["max_violation_train_mean"] == pytest.approx(0.2)
    assert all(old[k] is None for k in report.HEALTH_KEYS)
    assert old["drop_fraction"] == pytest.approx(0.2)  # still reported


def test_runs_csv_has_the_health_columns_blank_for_an_old_run(sweep):
    root, records, _ = sweep
    report._write_csv(str(root / "runs.csv"), records)
    with open(root / "runs.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    new, old = rows["moe_top1-s0"], rows["moe_old-s0"]
    assert float(new["max_violation_final"]) == pytest.approx(0.6)
    assert float(new["max_violation_train_mean"]) == pytest.approx(0.5)
    assert float(new["dead_experts_final"]) == 3.0 and float(new["collapse_alarm"]) == 1.0
    for key in ("max_violation_final", "max_violation_train_mean", "dead_experts_final"):
        assert old[key] == ""
    assert old["collapse_alarm"] == ""


def test_router_health_section_over_seeds(sweep):
    _, _, rows = sweep
    by = {r["variant"]: r for r in rows}
    new = by["moe_top1"]
    assert new["max_violation_final"] == pytest.approx(0.4)  # (0.6 + 0.2) / 2
    assert new["max_violation_final_std"] == pytest.approx(np.std([0.6, 0.2], ddof=1))
    assert new["max_violation_layers_final"] == pytest.approx([0.25, 0.55])
    assert new["collapse_alarm_n"] == 2
    text = report_sections.router_health_section(rows)
    head = next(line for line in text.splitlines() if line.startswith("| variant | MaxVio"))
    assert [h.strip() for h in head.strip("|").split("|")][1:] == [
        h for h, _ in report_sections.HEALTH_CELLS
    ]
    # end mean, end worst (0.8, 0.3), over training (0.5, 0.2), dead (3, 0), alarms,
    # drops (0.2 each), logit RMS (2.0, 1.0): mean ± sample SD over the two seeds.
    assert (
        "| moe_top1 | 0.400 ± 0.283 | 0.550 ± 0.354 | 0.350 ± 0.212 | 1.5 ± 2.1 | 1 of 2 "
        "| 20.00% ± 0.00% | 1.500 ± 0.707 |" in text
    )
    assert "| moe_old | — | — | — | — | — | 20.00% ± 0.00% | — |" in text
    assert "| moe_top1 | 0.250 | 0.550 |" in text and "| moe_old | — | — |" in text


def test_no_router_health_section_without_moe_rows(sweep):
    _, _, rows = sweep
    assert report_sections.router_health_section([r | {"moe": False} for r in rows]) == ""
