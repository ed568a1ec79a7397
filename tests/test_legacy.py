"""Run directories written before the typed specs still work.

``tests/fixtures/legacy_sweep`` holds the ``sweep.json`` and the runs' ``config.json`` that
commit 77b930f (the last one before ``ffn_jax/spec.py``) wrote for
``train.py --config=configs/compare.py:quick --config.sweep.variants=relu,moe_top1
--config.sweep.seeds=1 --config.train.steps=4``: no ``group``, the run's variant only in
its name. The test trains those runs into copies of their directories with today's code
(which must accept each old config as its own), then reads them back through ``eval.py``:
a single run, the sweep report, and ``--inspect``.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from ffn_jax.run import load_spec
from ffn_jax.spec import from_config
from ffn_jax.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "legacy_sweep")
RUNS = ("relu-s0", "moe_top1-s0")


def eval_cli(*flags):
    return subprocess.run(
        [sys.executable, "eval.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_legacy_config_resolves_to_the_same_run():
    for run in RUNS:
        spec = load_spec(os.path.join(FIXTURE, run), {"data": 1})
        assert spec.group == {"variant": run.rsplit("-s", 1)[0], "seed": 0}
        assert spec.model.vocab_size == 384 and spec.train.steps == 4
    moe = load_spec(os.path.join(FIXTURE, "moe_top1-s0"), {"data": 1}).model.moe
    assert moe is not None and (moe.num_experts, moe.top_k, moe.router) == (8, 1, "topk")


@pytest.mark.slow
def test_legacy_run_dirs_load_in_eval_report_and_inspect(tmp_path):
    sweep = tmp_path / "legacy"
    shutil.copytree(FIXTURE, sweep)
    for run in RUNS:
        with open(sweep / run / "config.json") as f:
            old = json.load(f)
        train_and_evaluate(from_config(old), str(sweep / run))  # not refused as different

    one = eval_cli(f"--workdir={sweep / 'relu-s0'}")
    assert one.returncode == 0, one.stderr[-2000:]
    assert json.loads(one.stdout)["step"] == 4
    report = eval_cli(f"--workdir={sweep}")
    assert report.returncode == 0, report.stderr[-2000:]
    with open(sweep / "results.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"relu", "moe_top1"} and rows["relu"]["significant"] == "reference"
    inspect = eval_cli(
        f"--workdir={sweep / 'moe_top1-s0'}", "--inspect", "--neurons=0", "--windows=2"
    )
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    assert (sweep / "moe_top1-s0" / "inspect.md").stat().st_size > 0
