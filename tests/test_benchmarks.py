"""The benchmark scripts run (smoke shapes) and print well-formed JSON lines."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ffn_jax import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args):
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user would run it
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cpu", "gpu"])
def test_bench_train_smoke(mode):
    """The GPU mode's logic (bf16, datasheet peak lookup, shapes) runs on CPU too."""
    rows = run_bench(
        "benchmarks/bench_train.py",
        "--smoke",
        f"--mode={mode}",
        "--variants=swiglu,moe_capacity",
        "--steps=1",
    )
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
    # "auto" attention is the einsum one on CPU; the rows and the ratio name what ran.
    assert [r["attention"] for r in steps] == ["einsum", "einsum"] == [ratio["attention"]] * 2
    assert ratio["step_ratio"] == pytest.approx(steps[1]["step_s"] / steps[0]["step_s"])
    assert ratio["step_ratio_min"] == pytest.approx(steps[1]["step_s_min"] / steps[0]["step_s_min"])
    for r, peak in zip(steps, peaks, strict=True):
        assert r["mfu"] == pytest.approx(
            r["flops_per_token"] * r["tokens_per_s"] / peak["flops_per_s"]
        )
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        assert r["dtype"] == ("float32" if mode == "cpu" else "bfloat16")
        assert r["step_s"] > 0 and 0 < r["mfu"] < 1.5 and r["memory_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / r["step_s"])
    # Same active FLOPs for the MoE row and the dense rows (matched by construction).
    assert steps[1]["flops_per_token"] == pytest.approx(steps[0]["flops_per_token"], rel=0.02)


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("cpu", None),
    ],
)
def test_datasheet_peak_matches_the_specific_part(kind, peak):
    assert flops.datasheet_peak(SimpleNamespace(device_kind=kind)) == peak


@pytest.mark.slow
def test_bench_train_reports_a_failing_row_and_goes_on():
    """cuDNN attention cannot run on CPU: that row is an error line, the xla row still runs,
    and the exit status says something failed."""
    args = [
        "benchmarks/bench_train.py",
        "--smoke",
        "--mode=gpu",
        "--variants=swiglu",
        "--attention=xla,cudnn",
        "--steps=1",
    ]
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    steps = [r for r in rows if r["measurement"] == "train_step"]
    assert [r["attention"] for r in steps] == ["xla", "cudnn"]
    assert "error" not in steps[0] and steps[0]["step_s"] > 0
    assert "step_s" not in steps[1] and steps[1]["error"]


def test_bench_train_rejects_unknown_names():
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_train.py", "--variants=swiglu,sqrelu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "--variants: unknown ['sqrelu']" in proc.stderr


@pytest.mark.slow
def test_bench_moe_single_smoke():
    rows = run_bench(
        "benchmarks/bench_moe.py",
        "--part=single",
        "--d_model=32",
        "--batch=2",
        "--length=16",
        "--layers=2",
        "--repeats=1",
        "--dtype=bfloat16",
    )
    assert [(r["bench"], r["impl"]) for r in rows] == [
        (bench, impl)
        for bench in ("layer_fwd_bwd", "stack_fwd_bwd")
        for impl in ("dense", "capacity", "loop", "ragged")
    ]
    for r in rows:
        assert r["dtype"] == "bfloat16" and r["ms_min"] <= r["ms"]
        assert r["vs_dense"] == 1.0 if r["impl"] == "dense" else r["vs_dense"] > 0
