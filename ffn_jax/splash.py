"""Causal attention through JAX's Pallas splash-attention kernel (``model.attention="splash"``,
what ``"auto"`` picks on TPU).

The kernel is flash attention for TPU: it never materialises the ``(t, t)`` scores, and
its causal mask skips the blocks above the diagonal. It works on one example's
``(heads, t, head_dim)`` arrays, so it is vmapped over the batch; under a mesh it runs in a
``shard_map`` over the batch and head shards (the mesh axes of the logical ``"batch"`` and
``"act_heads"`` rules), each shard with a kernel for its local heads. Grouped-query heads
are the kernel's own (each key/value head serves ``n / k`` query heads).

The sequence length must be a multiple of 128 (the kernel's smallest block). Off TPU the
kernel runs in Pallas's interpreter: the same numbers, slowly (for tests, not training).
"""

from __future__ import annotations

import functools
from typing import cast

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from ffn_jax.sharding import logical_to_spec

BLOCKS = (512, 256, 128)  # kernel block sizes tried, largest first


def _block(t: int) -> int:
    """The kernel's block size for sequences of ``t`` (ValueError when none fits)."""
    block = next((b for b in BLOCKS if t % b == 0), None)
    if block is not None:
        return block
    raise ValueError(
        f"model.attention='splash' (auto's choice on TPU) needs data.seq_len a multiple of "
        f"128, got sequences of {t}; change data.seq_len or set model.attention='xla'"
    )


@functools.cache
def _kernel(n_heads: int, t: int, interpret: bool):
    """The causal splash kernel for ``n_heads`` query heads of length ``t``."""
    block = _block(t)
    sizes = kernels.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(n_heads)])
    return kernels.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _local(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array) -> jax.Array:
    """Splash attention on arrays that are all on this device."""
    _, t, n, h = q_btnh.shape
    kernel = _kernel(n, t, jax.default_backend() != "tpu")
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # (b, t, n, h) <-> (b, n, t, h)
    q = heads_first(q_btnh * jnp.asarray(h**-0.5, q_btnh.dtype))
    # Without save_residuals the kernel returns the output alone.
    out = cast(jax.Array, jax.vmap(kernel)(q, heads_first(k_btkh), heads_first(v_btkh)))
    return heads_first(out).astype(q_btnh.dtype)


def splash_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array) -> jax.Array:
    """Causal softmax attention ``(b, t, n, h), (b, t, k, h) x2 -> (b, t, n, h)``, scaled by
    ``1/sqrt(h)`` (as ``jax.nn.dot_product_attention``), by the splash kernel."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _local(q_btnh, k_btkh, v_btkh)
    batch, heads = logical_to_spec(("batch", "act_heads"))
    spec = P(batch, None, heads, None)
    # The Pallas call carries no varying-axes types, so shard_map cannot check them.
    sharded = jax.shard_map(_local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return sharded(q_btnh, k_btkh, v_btkh)
