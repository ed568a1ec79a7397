"""Train-step benchmark: step time, tokens/s, MFU, compile time and memory per FFN variant
and MoE path, printed as one JSON line per measurement.

    python benchmarks/bench_train.py                      # CPU shape, every dense variant + MoE
    python benchmarks/bench_train.py --mode=gpu           # ~125M model, seq 1024, bf16
    python benchmarks/bench_train.py --variants=swiglu --remat=none,full,dots
    python benchmarks/bench_train.py --mode=gpu --variants=swiglu --attention=xla,cudnn

Shapes: CPU d_model 512, 8 layers, seq 256, vocab 8192 (batch 8); GPU d_model 768,
12 layers, 12 heads, seq 1024, vocab 50304 (GPT-2 small: 124M params with the tied embedding,
batch 32), attention through cuDNN's fused kernel (``model.attention="auto"``).

MFU = model FLOPs/token (ffn_jax.flops: 3 x forward, attention included) x tokens/s over the
matmul peak measured in this process (float32 on CPU, bf16 on GPU): the best of every
measurement so far, at start and just before and just after each row (on a shared machine
the matmul sometimes runs at half speed for seconds, and a peak measured then would inflate
the MFU). On a GPU with a known datasheet peak, ``mfu_datasheet`` is beside it (a measured
bf16 matmul peak is below the datasheet's, so ``mfu`` reads higher).

Step time is the median of ``--steps`` steps timed one by one (min and max beside it).
Memory is the compiled step's memory analysis (arguments + outputs + temporaries - aliased
donations). The process first sets the XLA:CPU flags and re-executes itself with huge-page
malloc (ffn_jax/host.py), as train.py does. When the SwiGLU row and MoE rows are measured, a
``moe_vs_dense`` line per MoE row gives its step time over SwiGLU's (medians, and mins:
interference on a shared machine only adds time, so the ratio of mins is the steadier one).
A row that fails (out of memory, say) prints its ``train_step`` line with an ``error`` and
the others still run; the exit status is then 1. Default rows: every dense variant and the
MoE paths fast on the mode (:func:`default_variants`).
``--smoke`` shrinks every shape (for tests).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ffn_jax.host import prepare_process  # noqa: E402

prepare_process()  # XLA:CPU flags, then huge-page malloc (ffn_jax/host.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.base import get_config  # noqa: E402
from ffn_jax import flops, sharding  # noqa: E402
from ffn_jax.ffn import VARIANTS  # noqa: E402
from ffn_jax.model import ATTENTION_IMPLS, REMAT_POLICIES  # noqa: E402
from ffn_jax.run import build_run_state  # noqa: E402
from ffn_jax.spec import ConfigError, RunSpec, from_config  # noqa: E402
from ffn_jax.trainer import make_train_step  # noqa: E402

SHAPES = {
    "cpu": dict(
        d_model=512, n_layers=8, n_heads=8, seq_len=256, vocab=8192, batch=8, dtype="float32"
    ),
    "gpu": dict(
        d_model=768, n_layers=12, n_heads=12, seq_len=1024, vocab=50304, batch=32, dtype="bfloat16"
    ),
}
SMOKE = dict(d_model=64, n_layers=2, n_heads=4, seq_len=32, vocab=384, batch=4)
# MoE rows: 8 experts, top-2, capacity factor 1.25, expert width = half the dense SwiGLU
# width (granularity-style), so active FLOPs equal the dense SwiGLU row.
DENSE_REFERENCE = "swiglu"  # the dense row each MoE row is compared with (moe_vs_dense lines)
MOE_PATHS = {
    "moe_capacity": dict(dispatch="capacity"),
    "moe_dropless_loop": dict(dispatch="dropless", dropless_impl="loop"),
    "moe_dropless_ragged": dict(dispatch="dropless", dropless_impl="ragged"),
}


def make_config(mode: str, variant: str, remat: str, smoke: bool, attention: str = "auto"):
    """The benchmark config for ``variant`` (a dense variant or a MOE_PATHS key)."""
    shape = {**SHAPES[mode], **(SMOKE if smoke else {})}
    c = get_config("swiglu,size=tiny")
    m = c.model
    m.d_model, m.n_layers, m.n_heads = shape["d_model"], shape["n_layers"], shape["n_heads"]
    m.n_kv_heads, m.dtype = shape["n_heads"], shape["dtype"]
    m.remat, m.attention = remat, attention
    c.data.seq_len, c.data.batch_size = shape["seq_len"], shape["batch"]
    c.data.tokenizer, c.data.vocab_size = "bpe", shape["vocab"]  # the vocabulary, no data
    c.mesh.shape.data = 1
    if variant in MOE_PATHS:
        m.ffn = "swiglu"
        m.moe.update(
            num_experts=4, granularity=2, top_k=1, capacity_factor=1.25, **MOE_PATHS[variant]
        )
    else:
        m.ffn = variant
    return c


def measure(spec: RunSpec, steps: int) -> dict:
    """Compile and time the train step of ``spec`` on one device (MFU left to the caller)."""
    mesh = sharding.single_device_mesh()
    rs = build_run_state(spec, mesh)
    b, t = spec.data.batch_size, spec.data.seq_len
    with jax.set_mesh(mesh), sharding.axis_rules(rs.rules):
        jitted = jax.jit(
            make_train_step(rs.graphdef, spec.train),
            in_shardings=(rs.state_shardings, rs.batch_sharding),
            out_shardings=(rs.state_shardings, None),
            donate_argnums=0,
        )
        batch = jax.device_put(
            jax.random.randint(
                jax.random.key(0), (b, t + 1), 0, spec.model.vocab_size, dtype=jnp.int32
            ),
            rs.batch_sharding,
        )
        t0 = time.perf_counter()
        compiled = jitted.lower(rs.state, batch).compile()
        compile_s = time.perf_counter() - t0
        state = rs.state
        for _ in range(2):  # warm-up
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times = []
        for _ in range(steps):  # each step timed alone: the median resists a noisy neighbour
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
    mem = compiled.memory_analysis()
    peak_mem = None
    if mem is not None:
        peak_mem = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    fpt = flops.flops_per_token(spec.model, t)["train"]
    tps = b * t / step_s
    return {
        "step_s": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "steps_timed": steps,
        "tokens_per_s": tps,
        "compile_s": compile_s,
        "memory_bytes": peak_mem,
        "flops_per_token": fpt,
        "params": rs.n_params,
        "loss": float(metrics["loss"]),
    }


def default_variants(mode: str) -> list[str]:
    """Every dense variant (``silu`` is ``swish``) and the MoE paths that are fast on ``mode``:
    ragged_dot is a masked dense dot on XLA:CPU (E x the FLOPs), the tiled loop's per-tile
    ``lax.cond`` a host round trip on GPU."""
    slow = "moe_dropless_ragged" if mode == "cpu" else "moe_dropless_loop"
    return [v for v in VARIANTS if v != "silu"] + [p for p in MOE_PATHS if p != slow]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--mode",
        choices=list(SHAPES),
        default=None,
        help="cpu or gpu shapes (default: from the default backend)",
    )
    ap.add_argument(
        "--variants",
        default=None,
        help="comma-separated dense variants and MoE paths (default: all that are "
        "fast on the mode)",
    )
    ap.add_argument("--remat", default="none", help="comma-separated remat policies")
    ap.add_argument(
        "--attention",
        default="auto",
        help="comma-separated model.attention values (auto, xla, cudnn, splash)",
    )
    ap.add_argument("--steps", type=int, default=7, help="timed steps (median reported)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (tests)")
    args = ap.parse_args()
    mode = args.mode or ("cpu" if jax.default_backend() == "cpu" else "gpu")
    variants = args.variants.split(",") if args.variants else default_variants(mode)
    for flag, values, known in (
        ("variants", variants, [*VARIANTS, *MOE_PATHS]),
        ("remat", args.remat.split(","), list(REMAT_POLICIES)),
        ("attention", args.attention.split(","), list(ATTENTION_IMPLS)),
    ):
        if unknown := [v for v in values if v not in known]:
            ap.error(f"--{flag}: unknown {unknown}; use names from {known}")
    dev = jax.devices()[0]
    datasheet = flops.datasheet_peak(dev)
    peak_dtype = jnp.float32 if mode == "cpu" else jnp.bfloat16
    n = 256 if args.smoke else None
    first_peak = best_peak = flops.measure_matmul_peak(peak_dtype, n=n)
    failed = 0
    for remat, attention in itertools.product(args.remat.split(","), args.attention.split(",")):
        steps = {}
        for variant in variants:
            config = make_config(mode, variant, remat, args.smoke, attention)
            about = {
                "measurement": "train_step",
                "mode": mode,
                "variant": variant,
                "remat": remat,
                "dtype": config.model.dtype,
                "d_model": config.model.d_model,
                "n_layers": config.model.n_layers,
                "seq_len": config.data.seq_len,
                "batch": config.data.batch_size,
                "vocab": config.data.vocab_size,
                "attention": attention,
            }
            try:  # the spec resolves the attention backend (and refuses cuDNN where it can't)
                spec = from_config(config, num_devices=1)
            except ConfigError as e:
                failed += 1
                print(json.dumps({**about, "error": f"ConfigError: {e.problems[0]}"}), flush=True)
                continue
            about.update(vocab=spec.model.vocab_size, attention=spec.model.attention_impl)
            # The MFU denominator: the best matmul throughput measured in this process, at
            # start and around each row (a half-speed spell during one measurement is outvoted).
            before = flops.measure_matmul_peak(peak_dtype, n=n)
            try:
                row = measure(spec, args.steps)
            except Exception as e:  # noqa: BLE001 - one row's failure (e.g. OOM) is reported
                failed += 1
                first = (str(e).strip().splitlines() or [""])[0][:500]
                print(json.dumps({**about, "error": f"{type(e).__name__}: {first}"}), flush=True)
                continue
            after = flops.measure_matmul_peak(peak_dtype, n=n)
            best_peak = max(best_peak, before, after)
            useful = row["flops_per_token"] * row["tokens_per_s"]
            row["mfu"] = useful / best_peak
            if datasheet and mode == "gpu":
                row["mfu_datasheet"] = useful / datasheet
            print(
                json.dumps(
                    {
                        "measurement": "matmul_peak",
                        "device": dev.device_kind,
                        "dtype": jnp.dtype(peak_dtype).name,
                        "flops_per_s": best_peak,
                        "measured_at_start": first_peak,
                        "measured_before_row": before,
                        "measured_after_row": after,
                        "datasheet_bf16_flops_per_s": datasheet,
                    }
                ),
                flush=True,
            )
            print(json.dumps({**about, **row}), flush=True)
            steps[variant] = {**about, **row}
        for path in [v for v in steps if v in MOE_PATHS and DENSE_REFERENCE in steps]:
            moe, dense = steps[path], steps[DENSE_REFERENCE]
            print(
                json.dumps(
                    {
                        "measurement": "moe_vs_dense",
                        "variant": path,
                        "dense": DENSE_REFERENCE,
                        "remat": remat,
                        "attention": dense["attention"],
                        "step_ratio": moe["step_s"] / dense["step_s"],
                        "step_ratio_min": moe["step_s_min"] / dense["step_s_min"],
                    }
                ),
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
