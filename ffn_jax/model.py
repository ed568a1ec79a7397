"""The decoder-only transformer LM with a pluggable FFN slot.

Shapes use einsum letters: b batch, t length, d d_model, n query heads, k key/value
heads, h head dim, v vocab, f FFN hidden. Parameters are float32; compute runs in
``model.dtype``; logits are float32.

Layers are grouped: a group is ``moe.every`` blocks whose last block holds the MoE FFN
(``every=1`` and no MoE: a group is one dense block). Groups are created stacked with
``nnx.vmap`` (leading ``layers`` axis) and applied with ``nnx.scan`` (or a python loop over
the same stacked parameters when ``scan_layers=False``), optionally rematerialised.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ffn_jax import ffn as ffn_lib
from ffn_jax.sharding import constrain, param

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("rms", "layer")
ATTENTION_IMPLS = {"xla": "xla", "cudnn": "cudnn", "auto": None}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def get_dtype(name: str) -> jnp.dtype:
    """Compute dtype from its config name; ValueError listing the valid ones."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not supported; use one of {list(DTYPES)}")
    return DTYPES[name]


def is_moe_layer(layer: int, cfg) -> bool:
    """Whether block ``layer`` (0-based) holds the MoE FFN: the last block of each group."""
    return cfg.moe.num_experts > 0 and (layer + 1) % cfg.moe.every == 0


def group_size(cfg) -> int:
    """Blocks per scanned group."""
    return cfg.moe.every if cfg.moe.num_experts > 0 else 1


def dense_d_ff(cfg) -> int:
    """The FFN hidden width: ``model.d_ff`` or the parameter-matched rule."""
    if cfg.d_ff:
        return cfg.d_ff
    return ffn_lib.matched_d_ff(cfg.ffn, cfg.d_model, cfg.ffn_multiplier, cfg.ffn_multiple_of)


class Norm(nnx.Module):
    """RMSNorm (``kind="rms"``) or LayerNorm (``"layer"``) over the last axis, in float32."""

    def __init__(self, dim: int, kind: str = "rms", eps: float = 1e-6):
        if kind not in NORMS:
            raise ValueError(f"model.norm={kind!r} is not supported; use one of {NORMS}")
        self.kind, self.eps = kind, eps
        self.scale = nnx.Param(param(nnx.initializers.ones_init(), ("embed",))(None, (dim,)))
        self.bias = (
            nnx.Param(param(nnx.initializers.zeros_init(), ("embed",))(None, (dim,)))
            if kind == "layer" else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layer":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps)
        x = x * self.scale[...]
        if self.bias is not None:
            x = x + self.bias[...]
        return x.astype(dtype)


def rotary(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (half-split convention) applied to ``(b, t, n, h)``."""
    h = x_btnh.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)
    angle_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


class Attention(nnx.Module):
    """Causal multi-head attention with rotary embeddings and grouped-query heads."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        d, n, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        h = d // n
        self.n_heads, self.n_kv_heads, self.head_dim = n, k, h
        self.dtype, self.rope_theta = dtype, cfg.rope_theta
        self.impl = ATTENTION_IMPLS[cfg.attention]
        init = ffn_lib.kernel_init(d)
        self.wq = nnx.Param(param(init, ("embed", "heads", "kv"))(rngs.params(), (d, n, h)))
        self.wk = nnx.Param(param(init, ("embed", "kv_heads", "kv"))(rngs.params(), (d, k, h)))
        self.wv = nnx.Param(param(init, ("embed", "kv_heads", "kv"))(rngs.params(), (d, k, h)))
        out_init = ffn_lib.kernel_init(d, 1.0 / math.sqrt(2 * cfg.n_layers))
        self.wo = nnx.Param(param(out_init, ("heads", "kv", "embed"))(rngs.params(), (n, h, d)))

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        x = x_btd.astype(self.dtype)
        q = jnp.einsum("btd,dnh->btnh", x, self.wq[...].astype(self.dtype))
        k = jnp.einsum("btd,dkh->btkh", x, self.wk[...].astype(self.dtype))
        v = jnp.einsum("btd,dkh->btkh", x, self.wv[...].astype(self.dtype))
        names = ("batch", "length", "act_heads", None)
        q = constrain(rotary(q, positions_bt, self.rope_theta), names)
        k = constrain(rotary(k, positions_bt, self.rope_theta), names)
        v = constrain(v, names)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl)
        return jnp.einsum("btnh,nhd->btd", o, self.wo[...].astype(self.dtype))


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(self, cfg, *, moe: bool, rngs: nnx.Rngs):
        dtype = get_dtype(cfg.dtype)
        self.norm1 = Norm(cfg.d_model, cfg.norm)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.norm2 = Norm(cfg.d_model, cfg.norm)
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
        if moe:
            from ffn_jax.moe import MoEFFN

            self.ffn = MoEFFN(
                cfg.d_model, cfg.moe, variant=cfg.ffn, d_ff=dense_d_ff(cfg),
                use_bias=cfg.ffn_bias, dtype=dtype, rngs=rngs,
            )
        else:
            self.ffn = ffn_lib.build_ffn(
                cfg.ffn, cfg.d_model, d_ff=dense_d_ff(cfg), use_bias=cfg.ffn_bias,
                dropout=cfg.dropout, dtype=dtype, out_scale=out_scale, rngs=rngs,
            )
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None

    def _residual(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if self.drop is not None:
            y = self.drop(y)
        return constrain(x + y.astype(x.dtype), ("batch", "length", "act_embed"))

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, dict]:
        x = self._residual(x_btd, self.attn(self.norm1(x_btd), positions_bt))
        out = self.ffn(self.norm2(x))
        y, aux = out if isinstance(out, tuple) else (out, {})
        return self._residual(x, y), aux


class LayerGroup(nnx.Module):
    """``group_size`` consecutive blocks; the last holds the MoE FFN in MoE models."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        n = group_size(cfg)
        self.blocks = nnx.List(
            [Block(cfg, moe=is_moe_layer(i, cfg), rngs=rngs) for i in range(n)]
        )

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, dict]:
        aux: dict = {}
        for block in self.blocks:
            x_btd, a = block(x_btd, positions_bt)
            aux.update(a)
        return x_btd, aux


class LM(nnx.Module):
    """Decoder-only LM. ``tokens (b, t) int -> (logits (b, t, v) float32, aux)``.

    ``aux`` holds the MoE layers' per-layer metrics stacked over groups (empty if dense).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        validate_model(cfg)
        self.d_model = cfg.d_model
        self.dtype = get_dtype(cfg.dtype)
        self.n_groups = cfg.n_layers // group_size(cfg)
        d, v = cfg.d_model, cfg.vocab_size
        emb_init = nnx.initializers.normal(1.0 / math.sqrt(d))
        self.embed = nnx.Param(param(emb_init, ("vocab", "embed"))(rngs.params(), (v, d)))
        self.unembed = (
            None if cfg.tie_embeddings
            else nnx.Param(param(ffn_lib.kernel_init(d), ("embed", "vocab"))(rngs.params(), (d, v)))
        )

        @nnx.split_rngs(splits=self.n_groups)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_groups(rngs: nnx.Rngs) -> LayerGroup:
            return LayerGroup(cfg, rngs=rngs)

        self.layers = make_groups(rngs)
        self.final_norm = Norm(d, cfg.norm)
        self.remat_policy = cfg.remat
        self.scan_layers = cfg.scan_layers

    def _apply_layers(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict]:
        def body(group: LayerGroup, x):
            return group(x, positions)

        if self.remat_policy != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        if self.scan_layers:
            scan = nnx.scan(
                body, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            return scan(self.layers, x)
        # The same stacked parameters, one group at a time (reference for the scan).
        graphdef, state = nnx.split(self.layers)
        auxes, states = [], []
        for i in range(self.n_groups):
            group = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            x, aux = body(group, x)
            auxes.append(aux)
            states.append(nnx.state(group))
        nnx.update(self.layers, jax.tree.map(lambda *a: jnp.stack(a), *states))
        return x, jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes[0] else {}

    def __call__(self, tokens_bt: jax.Array) -> tuple[jax.Array, dict]:
        b, t = tokens_bt.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        emb_vd = self.embed[...]
        x = jnp.take(emb_vd, tokens_bt, axis=0) * math.sqrt(self.d_model)
        x = constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))
        x, aux = self._apply_layers(x, positions)
        x = self.final_norm(x)
        w_dv = emb_vd.T if self.unembed is None else self.unembed[...]
        logits = jnp.einsum(
            "btd,dv->btv", x, w_dv.astype(self.dtype), preferred_element_type=jnp.float32
        )
        return constrain(logits, ("batch", "length", "act_vocab")), aux


def validate_model(cfg) -> None:
    """Raise ValueError on the first impossible model setting (one line, field and fix)."""
    problems = model_problems(cfg)
    if problems:
        raise ValueError(problems[0])


def model_problems(cfg, mesh_shape: dict | None = None) -> list[str]:
    """Every problem of ``config.model`` as one line each (field, value, fix); MoE checks
    against the expert axis of ``mesh_shape`` when given."""
    p: list[str] = []
    if cfg.ffn not in ffn_lib.VARIANTS:
        p.append(f"model.ffn={cfg.ffn!r} is unknown; valid variants: {', '.join(ffn_lib.VARIANTS)}")
    if cfg.dtype not in DTYPES:
        p.append(f"model.dtype={cfg.dtype!r} is not supported; use one of {list(DTYPES)}")
    if cfg.norm not in NORMS:
        p.append(f"model.norm={cfg.norm!r} is not supported; use one of {list(NORMS)}")
    if cfg.remat not in REMAT_POLICIES:
        p.append(f"model.remat={cfg.remat!r} is not supported; use one of {list(REMAT_POLICIES)}")
    if cfg.attention not in ATTENTION_IMPLS:
        p.append(f"model.attention={cfg.attention!r} is not supported; use one of "
                 f"{list(ATTENTION_IMPLS)}")
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_multiple_of"):
        if cfg[field] <= 0:
            p.append(f"model.{field}={cfg[field]} must be positive")
    if cfg.vocab_size is not None and cfg.vocab_size <= 0:
        p.append(f"model.vocab_size={cfg.vocab_size} must be positive")
    if cfg.d_ff is not None and cfg.d_ff <= 0:
        p.append(f"model.d_ff={cfg.d_ff} must be positive (or None for the matched width)")
    if cfg.n_heads > 0 and cfg.d_model % cfg.n_heads:
        p.append(f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}; "
                 "pick a head count that divides it")
    elif cfg.n_heads > 0 and (cfg.d_model // cfg.n_heads) % 2:
        p.append(f"model.d_model/n_heads={cfg.d_model // cfg.n_heads} must be even for rotary "
                 "embeddings; change model.n_heads")
    if cfg.n_kv_heads > 0 and cfg.n_heads % cfg.n_kv_heads:
        p.append(f"model.n_heads={cfg.n_heads} is not divisible by model.n_kv_heads="
                 f"{cfg.n_kv_heads}; use a divisor for grouped-query attention")
    if not 0.0 <= cfg.dropout < 1.0:
        p.append(f"model.dropout={cfg.dropout} must be in [0, 1)")
    moe = cfg.moe
    if moe.num_experts < 0:
        p.append(f"model.moe.num_experts={moe.num_experts} must be >= 0 (0 = dense)")
    if moe.num_experts > 0:
        if moe.every < 1 or cfg.n_layers % moe.every:
            p.append(f"model.moe.every={moe.every} must divide model.n_layers={cfg.n_layers}")
        from ffn_jax import moe as moe_lib

        p.extend(moe_lib.validate(moe, cfg.d_model, cfg.n_layers, mesh_shape))
    return p


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
