"""Device memory of a training step: an estimate per device from the config and the mesh,
and XLA's memory analysis of the compiled step to compare it with.

The estimate (bytes per device) has four parts:

* ``params`` and ``optimizer``: exact, the per-device shard of every leaf of the model and
  optimiser state (their shardings come from the logical rules);
* ``gradients``: one more copy of the parameter shards (two with ``train.grad_accum > 1``:
  the accumulator and the micro-batch's gradients);
* ``activations``: what the backward pass keeps, per token of the device's micro-batch,
  summed over layers for the kinds of tensors the remat policy saves (see
  :data:`SAVED_BY_POLICY`), plus one layer's full working set and the float32 logits.

The activation part is a model of what XLA does, not a measurement: compare it with
``compiled.memory_analysis()`` (printed side by side at the start of a run) before trusting
it for a config that does not fit yet.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ffn_jax.ffn import get_variant
from ffn_jax.model import get_dtype

if TYPE_CHECKING:
    from ffn_jax.spec import ModelSpec, RunSpec

log = logging.getLogger(__name__)

# The kinds of per-layer activations each remat policy keeps for the backward pass:
# stream: the residual stream; matmul: outputs of the weight matmuls; attention: the
# (length x length) scores and probabilities (XLA) or the log-sum-exp (cuDNN); elementwise:
# norms, rotary, FFN activations.
SAVED_BY_POLICY = {
    "none": ("stream", "matmul", "attention", "elementwise"),
    "dots": ("stream", "matmul", "attention"),
    "dots_no_batch": ("stream", "matmul"),
    "full": ("stream",),
}
LOGIT_COPIES = 3  # float32 logits, their softmax and its gradient are live at once
GIB = 2**30


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays (or ShapeDtypeStructs) with shardings."""

    def one(x) -> int:
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        return math.prod(shape) * np.dtype(x.dtype).itemsize

    leaves = jax.tree.leaves(tree)
    return sum(one(x) for x in leaves if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key))


def _ways(logical: str, mesh: jax.sharding.Mesh, rules) -> int:
    """How many ways the rules split the logical axis ``logical`` on ``mesh``."""
    target = dict(rules).get(logical)
    axes = () if target is None else (target,) if isinstance(target, str) else target
    return math.prod(mesh.shape[a] for a in axes)


def _ffn_parts(m: ModelSpec, layer: int, tp: int) -> dict[str, float]:
    """Elements per token of one FFN's saved activations (matmul / elementwise)."""
    d = m.d_model
    gated = get_variant(m.ffn).gated
    s = m.moe
    if s is None or not m.is_moe_layer(layer):
        f = m.d_ff / tp
        return {"matmul": (2 * f if gated else f) + d, "elementwise": (2 * f if gated else f)}
    slots = s.slots_per_token
    f = s.expert_width  # experts are not tensor-parallel inside the shard_map
    per_slot = (2 * f if gated else f) + d  # expert hidden + the slot's input row
    return {
        "matmul": slots * per_slot + 2 * s.top_k * d + s.num_experts,  # + combine, router
        "elementwise": 2 * s.top_k * d + s.num_experts,  # weighted outputs, router probs
    }


def layer_bytes(m: ModelSpec, layer: int, seq_len: int, mesh: jax.sharding.Mesh, rules) -> dict:
    """Bytes per token of block ``layer``'s activations, by kind (see SAVED_BY_POLICY)."""
    dtype = get_dtype(m.dtype)
    a = np.dtype(dtype).itemsize
    tp = _ways("act_heads", mesh, rules)
    d, n, k, h = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
    ffn = _ffn_parts(m, layer, _ways("act_mlp", mesh, rules))
    # Fused (flash) attention, cuDNN's or splash, keeps a float32 log-sum-exp per query row;
    # XLA's the scores in the compute dtype and the softmax in float32.
    fused = m.attention_impl in ("cudnn", "splash")
    attention = n / tp * 4 if fused else n / tp * seq_len * (a + 4)
    return {
        "stream": 2 * d * a,
        "matmul": a * ((2 * n + 2 * k) * h / tp + d + ffn["matmul"]),
        "attention": attention,
        "elementwise": 2 * d * 4 + a * ((n + k) * h / tp + ffn["elementwise"]),
    }


def activation_bytes(spec: RunSpec, mesh: jax.sharding.Mesh, rules) -> float:
    """Estimated bytes per device of the activations of one (micro-)batch's backward pass."""
    m, t = spec.model, spec.data.seq_len
    rows = spec.data.batch_size / spec.train.grad_accum / _ways("batch", mesh, rules)
    tokens = rows * t
    saved = SAVED_BY_POLICY[m.remat]
    per_layer = [layer_bytes(m, i, t, mesh, rules) for i in range(m.n_layers)]
    kept = sum(sum(p[kind] for kind in saved) for p in per_layer)
    working = max(sum(p.values()) for p in per_layer)  # the layer being differentiated
    logits = LOGIT_COPIES * 4 * m.vocab_size / _ways("act_vocab", mesh, rules)
    return tokens * (kept + working + logits)


def estimate(spec: RunSpec, state, mesh: jax.sharding.Mesh, rules) -> dict[str, int]:
    """Estimated bytes per device of a train step: params, optimizer, gradients, activations.

    ``state`` is the run's ``(model, optimizer)`` state (arrays or ShapeDtypeStructs carrying
    their shardings).
    """
    params, opt = shard_bytes(state[0]), shard_bytes(state[1])
    out = {
        "params": params,
        "optimizer": opt,
        "gradients": params * (2 if spec.train.grad_accum > 1 else 1),
        "activations": int(activation_bytes(spec, mesh, rules)),
    }
    out["total"] = sum(out.values())
    return out


FIT_MARGIN = 1.5  # refuse only when the estimate exceeds the device by more than its error


def device_capacity() -> int | None:
    """Bytes one local device can hold: the accelerator's allocator limit, or on CPU the
    host's physical memory shared by its (simulated) devices; None if unknown."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if dev.platform == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
        return ram // jax.local_device_count()
    return None


def check_fits(est: dict[str, int], capacity: int | None = None) -> None:
    """Raise ConfigError, with the numbers, when the estimate ``est`` (``estimate``) exceeds
    a device's memory by more than ``FIT_MARGIN`` (the estimate is within about 0.7-1.4x of
    XLA's figure, so a closer call is left to XLA)."""
    from ffn_jax.spec import ConfigError

    capacity = device_capacity() if capacity is None else capacity
    if capacity is None or est["total"] <= FIT_MARGIN * capacity:
        return
    parts = ", ".join(f"{k} {_mib(v)}" for k, v in est.items() if k != "total")
    raise ConfigError(
        f"a training step needs about {_mib(est['total'])} per device ({parts}) but a device "
        f"holds {_mib(capacity)}; lower data.batch_size or data.seq_len, set model.remat=full "
        "or train.grad_accum, or shard more (mesh.shape)"
    )


def compiled_bytes(compiled) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled step per device (None if the backend has none).

    ``total`` = arguments + outputs - aliased (donated) + temporaries.
    """
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    out = {
        "arguments": int(stats.argument_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes),
        "aliased": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    return out


def _mib(x: float) -> str:
    return f"{x / 2**20:,.1f} MiB" if x < GIB else f"{x / GIB:,.2f} GiB"


def log_memory(est: dict[str, int], compiled):
    """Log the estimate ``est`` (``estimate``) next to the compiled step's memory; return
    both (bytes per device)."""
    xla = compiled_bytes(compiled)
    parts = ", ".join(f"{k} {_mib(v)}" for k, v in est.items() if k != "total")
    line = f"memory per device: estimate {_mib(est['total'])} ({parts})"
    if xla is not None:
        line += (
            f"; compiled {_mib(xla['total'])} (state in {_mib(xla['arguments'])}, "
            f"temp {_mib(xla['temp'])}), estimate/compiled {est['total'] / xla['total']:.2f}"
        )
    log.info(line)
    return est, xla
