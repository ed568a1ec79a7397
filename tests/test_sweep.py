"""The comparison sweep end to end: train.py -> eval.py -> results files; resume; errors."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import compare
from ffn_jax.configuration import ConfigError, resolve
from ffn_jax.sweep import evaluate_sweep, run_configs, train_sweep
from ffn_jax.sweep import runs as sweep_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FLAGS = [
    "--config=configs/compare.py:quick",
    "--config.sweep.variants=relu,swiglu",
    "--config.sweep.tune.field=",  # no tuning stage: the runs are known in advance
    "--config.train.steps=30",
    "--config.train.warmup_steps=3",
    "--config.train.eval_every=10",
    "--config.train.checkpoint_every=10",
    "--config.train.log_every=5",
]


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw
    )


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "sweep"
    # Interrupt the sweep: kill it once the second run has started.
    proc = subprocess.Popen(
        [sys.executable, "train.py", *SWEEP_FLAGS, f"--workdir={workdir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(workdir / "swiglu-s0" / "checkpoints" / "10"):
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (workdir / "relu-s0" / "eval.json").exists()
    relu_mtime = os.path.getmtime(workdir / "relu-s0" / "eval.json")
    assert not (workdir / "swiglu-s1").exists()

    done = cli("train.py", *SWEEP_FLAGS, f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "relu-s0: finished, skipped" in done.stderr
    assert os.path.getmtime(workdir / "relu-s0" / "eval.json") == relu_mtime  # not retrained
    runs = sorted(d for d in os.listdir(workdir) if (workdir / d).is_dir())
    assert runs == ["relu-s0", "relu-s1", "swiglu-s0", "swiglu-s1"]

    ev = cli("eval.py", f"--workdir={workdir}")
    assert ev.returncode == 0, ev.stderr[-2000:]
    for f in ("results.md", "results.csv", "runs.csv", "loss_curves.png", "forest.png"):
        assert (workdir / f).stat().st_size > 0, f
    with open(workdir / "results.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"relu", "swiglu"}
    assert rows["relu"]["seeds"] == rows["swiglu"]["seeds"] == "2"
    assert rows["relu"]["significant"] == "reference"
    assert rows["swiglu"]["significant"] in ("yes", "no")
    for r in rows.values():
        assert 0 < float(r["test_bits_per_byte_mean"]) < 8
        assert abs(float(r["params_total"]) / float(rows["relu"]["params_total"]) - 1) < 0.02
    md = (workdir / "results.md").read_text()
    assert "| relu |" in md and "| swiglu |" in md and "± " in md
    assert "relu" in ev.stdout and "swiglu" in ev.stdout  # the table is printed


def untuned(preset: str):
    c = compare.get_config(preset)
    c.sweep.tune.field = ""
    return c


def test_run_configs_share_data_order_and_differ_in_variant():
    c = untuned("quick")
    runs = dict(run_configs(c))
    assert list(runs) == [
        "relu-s0",
        "swiglu-s0",
        "moe_top1-s0",
        "relu-s1",
        "swiglu-s1",
        "moe_top1-s1",
    ]
    assert runs["relu-s1"].seed == runs["swiglu-s1"].seed == 1
    assert runs["moe_top1-s0"].model.moe.num_experts == 8
    assert runs["moe_top1-s0"].model.moe.top_k == 1
    assert runs["relu-s0"].model.moe.num_experts == 0
    assert runs["relu-s0"].data == runs["moe_top1-s0"].data
    assert "sweep" not in runs["relu-s0"]


def test_unknown_variant_in_sweep_is_an_error(tmp_path):
    c = compare.get_config("quick")
    c.sweep.variants = "relu,swigloo"
    msg = r"sweep.variants: unknown variant 'swigloo'; valid: relu"
    with pytest.raises(ConfigError, match=msg):
        train_sweep(c, str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_sweep_dir_with_incompatible_settings_is_refused(tmp_path):
    c = untuned("quick")
    c.sweep.variants = "relu"
    c.sweep.seeds = 1
    c.train.steps, c.train.warmup_steps, c.train.eval_every = 4, 1, 0
    workdir = str(tmp_path / "s")
    train_sweep(c, workdir)
    c.data.seq_len = 32
    msg = r"holds a sweep with incompatible settings \(data.seq_len"
    with pytest.raises(ConfigError, match=msg):
        train_sweep(c, workdir)


def test_eval_on_directory_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli("eval.py", f"--workdir={tmp_path / 'empty'}")
    assert proc.returncode == 2
    assert "holds no run" in proc.stderr
    proc = cli("eval.py", f"--workdir={tmp_path / 'missing'}")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_axes_sweep_any_field_with_the_group_in_each_run():
    c = untuned("quick")
    c.sweep.variants, c.sweep.seeds = "relu,moe_top1", 2
    c.sweep.axes = "train.lr=1e-3,3e-3; model.d_model=32"
    runs = dict(run_configs(c))
    assert list(runs)[:4] == [
        "relu-lr=0.001-d_model=32-s0",
        "relu-lr=0.003-d_model=32-s0",
        "moe_top1-lr=0.001-d_model=32-s0",
        "moe_top1-lr=0.003-d_model=32-s0",
    ]
    r = runs["moe_top1-lr=0.003-d_model=32-s1"]
    assert (r.train.lr, r.model.d_model, r.seed, r.model.moe.num_experts) == (3e-3, 32, 1, 8)
    run = {r.name: r for r in sweep_runs(c)}["moe_top1-lr=0.003-d_model=32-s1"]
    assert run.group == {"variant": "moe_top1", "train.lr": 3e-3, "model.d_model": 32, "seed": 1}
    assert resolve(r, group=run.group).group == run.group
    c.sweep.axes = "train.learning_rate=1e-3"
    with pytest.raises(ConfigError, match=r"'train.learning_rate' is not a config field"):
        run_configs(c)
    c.sweep.axes = "train.lr"
    with pytest.raises(ConfigError, match=r"sweep.axes: 'train.lr' is not 'field=v1,v2'"):
        run_configs(c)


@pytest.mark.slow
def test_sweep_over_the_learning_rate_gives_one_group_per_value(tmp_path):
    """train.lr is a field every run of a comparison shares, unless the sweep varies it:
    then each value is its own group, paired against the baseline at the same value."""
    c = untuned("quick")
    c.sweep.variants, c.sweep.seeds, c.sweep.axes = "relu,swiglu", 1, "train.lr=1e-3,3e-3"
    c.train.steps, c.train.warmup_steps, c.train.eval_every = 4, 1, 0
    c.train.log_every = c.train.checkpoint_every = 2
    workdir = str(tmp_path / "lr")
    train_sweep(c, workdir)
    evaluate_sweep(workdir)
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"relu lr=0.001", "relu lr=0.003", "swiglu lr=0.001", "swiglu lr=0.003"}
    assert {rows[k]["train.lr"] for k in rows} == {"0.001", "0.003"}
    with open(os.path.join(workdir, "swiglu-lr=0.003-s0", "config.json")) as f:
        assert json.load(f)["group"] == {"variant": "swiglu", "train.lr": 0.003, "seed": 0}
    assert rows["relu lr=0.003"]["significant"] == "reference"
    assert rows["swiglu lr=0.003"]["significant"] == "n/a"  # 1 seed: paired with relu at 3e-3
    assert rows["relu lr=0.001"]["test_loss_mean"] != rows["relu lr=0.003"]["test_loss_mean"]


@pytest.mark.slow
def test_sigterm_stops_the_whole_sweep_after_saving(tmp_path):
    workdir = tmp_path / "sweep"
    flags = [*SWEEP_FLAGS, "--config.train.steps=2000", "--config.train.checkpoint_every=1000"]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *flags, f"--workdir={workdir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / "relu-s0" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and "loss" in metrics.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped the sweep after saving relu-s0" in err
    assert not (workdir / "swiglu-s0").exists()  # the next run was not started
    saved = [d for d in os.listdir(workdir / "relu-s0" / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and 0 < int(saved[0]) < 2000


def test_tuning_extends_past_an_edge_then_trains_each_variant_at_its_value(tmp_path, monkeypatch):
    """The tuning stage on made-up validation losses (no training): relu's best is inside
    the grid; swiglu's lies beyond its high edge, so the grid grows twice; a diverged point
    counts as infinitely bad; the final stage reuses the tuning run of the chosen value."""
    from ffn_jax import sweep

    c = compare.get_config("quick")
    c.sweep.variants, c.sweep.seeds = "relu,swiglu", 3
    c.sweep.tune.grid, c.sweep.tune.max_extend = "1e-3,2e-3,4e-3", 2
    best = {"relu": 2e-3, "swiglu": 8e-3}
    trained, completed = [], []

    def fake_train(self, run, extra=None):
        trained.append((run.name, dict(extra or {})))
        d = os.path.join(self.workdir, run.name)
        os.makedirs(d, exist_ok=True)
        lr, variant = run.group["train.lr"], run.group["variant"]
        if variant == "relu" and lr == 4e-3:
            sweep.write_json_atomic(os.path.join(d, sweep.DIVERGED_FILE), {"config": {}})
            return
        loss = 2.0 + np.log(lr / best[variant]) ** 2 + 0.001 * run.group["seed"]
        sweep.write_json_atomic(os.path.join(d, "eval.json"), {"validation": {"loss": loss}})

    monkeypatch.setattr(sweep._SweepTrainer, "train", fake_train)
    monkeypatch.setattr(
        sweep._SweepTrainer, "complete_eval", lambda self, r: completed.append(r.name)
    )
    train_sweep(c, str(tmp_path))
    with open(tmp_path / "tuning.json") as f:
        tuning = json.load(f)
    assert tuning["relu"]["values"] == [1e-3, 2e-3, 4e-3] and tuning["relu"]["extended"] == 0
    assert tuning["relu"]["val_loss"][2] == float("inf") and tuning["relu"]["chosen"] == 2e-3
    sw = tuning["swiglu"]
    assert sw["values"] == [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2] and sw["extended"] == 2
    assert sw["chosen"] == 8e-3 and sw["edge"] is None
    tune_runs = {n for n, extra in trained if extra == {"train.eval_splits": "validation"}}
    assert len(tune_runs) == 3 + 5 and "swiglu-lr=0.016-s0" in tune_runs  # (finished: skipped)
    final = [n for n, extra in trained if not extra]
    assert final == [f"{v}-lr={best[v]:g}-s{s}" for s in range(3) for v in ("relu", "swiglu")]
    assert completed == ["relu-lr=0.002-s0", "swiglu-lr=0.008-s0"]  # the test split added
    assert os.path.exists(tmp_path / "sweep_timing.json")


def test_bad_tune_block_is_one_line():
    c = compare.get_config("quick")
    c.sweep.tune.grid = "1e-3"
    with pytest.raises(ConfigError, match=r"sweep.tune.grid='1e-3' needs >= 2 distinct numbers"):
        sweep_runs(c)
    c.sweep.tune.grid, c.sweep.tune.seeds = "1e-3,2e-3", 5
    with pytest.raises(ConfigError, match=r"sweep.tune.seeds=5 must be in \[1, sweep.seeds=2\]"):
        sweep_runs(c)


def test_fields_joined_by_plus_move_together_as_one_axis():
    c = untuned("quick")
    c.sweep.variants, c.sweep.seeds = "relu", 1
    c.sweep.axes = "model.d_model+model.n_heads+model.n_kv_heads=32/2/2,64/4/4; train.lr=1e-3"
    runs = dict(run_configs(c))
    assert list(runs) == [
        "relu-d_model=32-n_heads=2-n_kv_heads=2-lr=0.001-s0",
        "relu-d_model=64-n_heads=4-n_kv_heads=4-lr=0.001-s0",
    ]
    assert runs["relu-d_model=64-n_heads=4-n_kv_heads=4-lr=0.001-s0"].model.n_heads == 4
    c.sweep.axes = "model.d_model+model.n_heads=32/2,64"
    with pytest.raises(ConfigError, match=r"is not 'field=v1,v2' \(or 'f1\+f2=a1/b1,a2/b2'\)"):
        run_configs(c)
