"""The benchmark scripts run (smoke shapes) and print well-formed JSON lines."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args):
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user would run it
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cpu", "gpu"])
def test_bench_train_smoke(mode):
    """The GPU mode's logic (bf16, datasheet peak lookup, shapes) runs on CPU too."""
    rows = run_bench("benchmarks/bench_train.py", "--smoke", f"--mode={mode}",
                     "--variants=swiglu,moe_capacity", "--steps=1")
    # A matmul-peak line (the MFU denominator, measured around the row) before each train-step
    # line, then the MoE row's step time over the dense SwiGLU row's.
    kinds = ["matmul_peak", "train_step"] * 2 + ["moe_vs_dense"]
    assert [r["measurement"] for r in rows] == kinds
    peaks, steps, ratio = rows[:-1:2], rows[1:-1:2], rows[-1]
    seen = [peaks[0]["measured_at_start"]]
    for peak in peaks:  # the MFU denominator: the best of every measurement so far
        seen += [peak["measured_before_row"], peak["measured_after_row"]]
        assert peak["flops_per_s"] == max(seen) > 0
        assert peak["dtype"] == ("float32" if mode == "cpu" else "bfloat16")
    assert [r["variant"] for r in steps] == ["swiglu", "moe_capacity"]
    assert ratio["variant"] == "moe_capacity" and ratio["dense"] == "swiglu"
    assert ratio["step_ratio"] == pytest.approx(steps[1]["step_s"] / steps[0]["step_s"])
    assert ratio["step_ratio_min"] == pytest.approx(steps[1]["step_s_min"] / steps[0]["step_s_min"])
    for r, peak in zip(steps, peaks, strict=True):
        assert r["mfu"] == pytest.approx(
            r["flops_per_token"] * r["tokens_per_s"] / peak["flops_per_s"])
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        assert r["dtype"] == ("float32" if mode == "cpu" else "bfloat16")
        assert r["step_s"] > 0 and 0 < r["mfu"] < 1.5 and r["memory_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / r["step_s"])
    # Same active FLOPs for the MoE row and the dense rows (matched by construction).
    assert steps[1]["flops_per_token"] == pytest.approx(steps[0]["flops_per_token"], rel=0.02)
