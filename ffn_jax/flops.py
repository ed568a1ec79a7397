"""Model FLOPs per token (the MFU numerator) and the machine's peak (the denominator).

Training FLOPs per token = 3 x forward (backward = 2 x forward), with forward =
  per layer: 2 x attention-projection params  (q, k, v, o matmuls)
           + 4 x seq_len x n_heads x head_dim (QK^T and AV over the full window, the
             PaLM-paper convention: causal masking is not subtracted)
           + the FFN's forward FLOPs (ffn.ffn_cost; active FLOPs for MoE layers)
  + 2 x d_model x vocab (the output projection). Norms, rotary and softmax are ignored.
MFU = FLOPs/token x tokens/s / peak FLOP/s.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from ffn_jax import ffn as ffn_lib

if TYPE_CHECKING:
    from ffn_jax.spec import ModelSpec

# Dense bf16 tensor-core peaks from vendor datasheets (FLOP/s), by device_kind substring; the
# first match wins, so the specific kinds come before the general ones ("NVIDIA H100 PCIe"
# before "NVIDIA H100 80GB HBM3", the SXM part).
DATASHEET_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),  # also GH200
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
)


def flops_per_token(m: ModelSpec, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (``train``) and its parts, for the model ``m``."""
    h = m.head_dim
    attn_params = m.d_model * h * (2 * m.n_heads + 2 * m.n_kv_heads)
    attn = 2 * attn_params + 4 * seq_len * m.n_heads * h
    ffn_total = 0.0
    for layer in range(m.n_layers):
        if m.is_moe_layer(layer):
            from ffn_jax.moe import moe_cost

            assert m.moe is not None
            ffn_total += moe_cost(m.moe, m.ffn, m.d_model)["flops_per_token"]
        else:
            ffn_total += ffn_lib.ffn_cost(m.ffn, m.d_model, m.d_ff, m.ffn_bias)["flops_per_token"]
    forward = m.n_layers * attn + ffn_total + 2 * m.d_model * m.vocab_size
    return {
        "train": 3.0 * forward,
        "forward": float(forward),
        "attention_forward": float(m.n_layers * attn),
        "ffn_forward": float(ffn_total),
    }


def measure_matmul_peak(
    dtype=jnp.float32,
    n: int | None = None,
    reps: int = 10,
    warmup_s: float = 0.5,
    batch: int | None = None,
) -> float:
    """Measured matmul throughput (FLOP/s) of the default device for ``dtype``.

    The best of at least ``reps`` timed trials, timed for at least ``warmup_s`` more, after
    ``warmup_s`` of untimed ones (a cold thread pool or clock otherwise gives a low peak, i.e.
    an inflated MFU). A trial dispatches ``batch`` ``n x n`` matmuls and waits once, so on an
    accelerator the dispatch and the wait (tens of microseconds against a ~1.5 ms matmul on
    an H100) are not charged to each matmul. Defaults: ``n`` 1024 on CPU and 8192 on
    accelerators, ``batch`` 1 on CPU (a ~10 ms matmul; the best single one is the higher
    peak on a noisy machine) and 4 on accelerators.
    """
    dev = jax.devices()[0]
    cpu = dev.platform == "cpu"
    n, batch = n or (1024 if cpu else 8192), batch or (1 if cpu else 4)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)

    def trial() -> float:
        t = time.perf_counter()
        jax.block_until_ready([mm(a, b) for _ in range(batch)])
        return time.perf_counter() - t

    trial()
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        trial()
    best, timed, start = float("inf"), 0, time.perf_counter()
    while timed < reps or time.perf_counter() - start < warmup_s:
        best, timed = min(best, trial()), timed + 1
    return 2.0 * n**3 * batch / best


def datasheet_peak(device: Any = None) -> float | None:
    """The vendor's dense bf16 peak for ``device`` (None if unknown, e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for key, peak in DATASHEET_PEAK_BF16:
        if key.lower() in kind.lower():
            return peak
    return None


@functools.cache
def peak_flops(compute_dtype: str = "float32") -> tuple[float, str]:
    """Peak FLOP/s per device for MFU and where it came from.

    CPU: the measured float32 matmul throughput. Accelerators: the datasheet bf16 peak when
    known, else the measured throughput in the compute dtype. Measured once per process
    (a sweep's runs share it: re-measuring at every run's start lets a slow spell move MFU).
    """
    dev = jax.devices()[0]
    if dev.platform != "cpu" and (peak := datasheet_peak(dev)):
        return peak, f"datasheet bf16 ({dev.device_kind})"
    dtype = jnp.bfloat16 if compute_dtype == "bfloat16" and dev.platform != "cpu" else jnp.float32
    peak = measure_matmul_peak(dtype, warmup_s=0.25)
    return peak, f"measured {jnp.dtype(dtype).name} matmul ({dev.platform})"
