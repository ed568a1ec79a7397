"""The comparison sweep end to end: train.py -> eval.py -> results files; resume; errors."""

import csv
import os
import subprocess
import sys
import time

import pytest

from configs import compare
from ffn_jax.configuration import ConfigError
from ffn_jax.sweep import run_configs, train_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FLAGS = ["--config=configs/compare.py:quick", "--config.sweep.variants=relu,swiglu",
               "--config.train.steps=30", "--config.train.warmup_steps=3",
               "--config.train.eval_every=10", "--config.train.checkpoint_every=10",
               "--config.train.log_every=5"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "sweep"
    # Interrupt the sweep: kill it once the second run has started.
    proc = subprocess.Popen([sys.executable, "train.py", *SWEEP_FLAGS, f"--workdir={workdir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    for f in ("results.md", "results.csv", "loss_curves.png", "bits_per_byte.png"):
        assert (workdir / f).stat().st_size > 0, f
    with open(workdir / "results.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"relu", "swiglu"}
    assert rows["relu"]["seeds"] == rows["swiglu"]["seeds"] == "2"
    assert rows["relu"]["significant"] == "baseline"
    assert rows["swiglu"]["significant"] in ("yes", "no")
    for r in rows.values():
        assert 0 < float(r["test_bits_per_byte_mean"]) < 8
        assert abs(float(r["params_total"]) / float(rows["relu"]["params_total"]) - 1) < 0.02
    md = (workdir / "results.md").read_text()
    assert "| relu |" in md and "| swiglu |" in md and "± " in md
    assert "relu" in ev.stdout and "swiglu" in ev.stdout  # the table is printed


def test_run_configs_share_data_order_and_differ_in_variant():
    c = compare.get_config("quick")
    runs = dict(run_configs(c))
    assert list(runs) == ["relu-s0", "swiglu-s0", "moe_top1-s0",
                          "relu-s1", "swiglu-s1", "moe_top1-s1"]
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
    c = compare.get_config("quick")
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
