"""Causal attention written out in einsums, with a hand-written backward
(``model.attention="einsum"``, what ``"auto"`` picks wherever no fused kernel applies:
on CPU, and on GPUs where cuDNN's does not).

It materialises the ``(t, t)`` scores as XLA's ``jax.nn.dot_product_attention`` does, but
arranges the work for XLA:CPU at small shapes, where the attention's layout copies and
elementwise passes over the scores, not its matmuls, take most of its time:

* query heads are folded into the rows of their key/value head's score matrix, so one
  batched matmul per product serves grouped-query heads, in ``(b, k, g*t, h)`` layout;
* the backward is the closed form (``dS = P * (dP - rowsum(dO * O))``), which needs no
  reduction over the scores and no select for the mask (masked probabilities are zero),
  instead of the autodiff of softmax and the mask.

Scores, softmax and their gradients are float32 whatever the inputs' dtype. The numbers
equal XLA's attention to float32 rounding (``tests/test_model.py``). Its speed and memory
against XLA's, on CPU and on a GPU, are in docs/perf.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _probs(q: jax.Array, k: jax.Array) -> jax.Array:
    """Causal softmax probabilities ``(b, k, g*t, s)`` (float32) of ``q`` ``(b, k, g*t, h)``
    (already scaled) against ``k`` ``(b, k, s, h)``; row ``r`` is query position ``r % t``."""
    rows, t = q.shape[2], k.shape[2]
    s = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=F32)
    causal = (jnp.arange(rows) % t)[:, None] >= jnp.arange(t)[None, :]
    s = jnp.where(causal, s, -jnp.inf)  # the diagonal is never masked: each row has a max
    p = jnp.exp(s - jnp.max(s, -1, keepdims=True))
    return p * (1.0 / jnp.sum(p, -1, keepdims=True))


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(causal(q k^T)) v``: ``(b, k, g*t, h)`` from ``q`` ``(b, k, g*t, h)`` and
    ``k``, ``v`` ``(b, k, t, h)``."""
    return _attend_fwd(q, k, v)[0]


def _attend_fwd(q, k, v):
    p = _probs(q, k)
    o = jnp.einsum("bkqs,bksh->bkqh", p.astype(v.dtype), v)
    return o, (q, k, v, p, o)


def _attend_bwd(res, do):
    q, k, v, p, o = res
    dp = jnp.einsum("bkqh,bksh->bkqs", do, v, preferred_element_type=F32)
    row = jnp.sum(do.astype(F32) * o.astype(F32), -1, keepdims=True)  # = rowsum(P * dP)
    ds = p * (dp - row)
    dq = jnp.einsum("bkqs,bksh->bkqh", ds.astype(k.dtype), k)
    # dV = P^T dO and dK = dS^T Q, computed transposed: XLA:CPU's matmul then transposes
    # the small (q, h) operand instead of the (q, s) scores.
    dv = jnp.einsum("bkqh,bkqs->bkhs", do, p.astype(do.dtype)).swapaxes(-1, -2)
    dk = jnp.einsum("bkqh,bkqs->bkhs", q, ds.astype(q.dtype)).swapaxes(-1, -2)
    return dq, dk, dv


_attend.defvjp(_attend_fwd, _attend_bwd)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal scaled dot-product attention: ``q`` ``(b, t, n, h)``, ``k``/``v``
    ``(b, t, kv, h)`` with ``n`` a multiple of ``kv`` (query head ``i`` reads key/value head
    ``i // (n / kv)``, as ``jax.nn.dot_product_attention``) -> ``(b, t, n, h)``."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    q = (q * (1.0 / math.sqrt(h))).astype(q.dtype)
    q = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
    o = _attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return o.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
