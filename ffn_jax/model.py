"""The decoder-only transformer LM with a pluggable FFN slot.

Shapes use einsum letters: b batch, t length, d d_model, n query heads, k key/value
heads, h head dim, v vocab, f FFN hidden. Parameters are float32; compute runs in
``model.dtype``; logits are float32.

Layers are grouped: a group is ``moe.every`` blocks whose last block holds the MoE FFN
(``every=1`` and no MoE: a group is one dense block). Groups are created stacked with
``nnx.vmap`` (leading ``layers`` axis) and applied with ``nnx.scan`` (or a python loop over
the same stacked parameters when ``scan_layers=False``), optionally rematerialised.

Two block formulations (``model.norm_position``): ``"pre"`` (the default, modern)
``x + f(norm(x))`` with a final norm before the output projection, and ``"post"`` (the 2017
Transformer / BERT) ``norm(x + f(x))`` with no final norm (the last block already ends in
one). Positions (``model.positions``): rotary (``"rope"``, default) or a learned absolute
``pos_embed`` table ``(max_seq_len, d_model)`` added to the token embedding (``"learned"``;
rotary is then off).
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
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("rope", "learned")
# Fields added after runs were already written: a config.json without them means these.
LEGACY_DEFAULTS = {"norm_position": "pre", "positions": "rope", "max_seq_len": 0}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
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


def attention_impl(name: str, dtype, head_dim: int) -> str:
    """The ``jax.nn.dot_product_attention`` implementation that ``model.attention=name`` runs.

    ``"auto"`` picks cuDNN's fused (flash) attention where it applies: an NVIDIA GPU, a
    bfloat16/float16 compute dtype and a head dim that is a multiple of 8 and at most 128;
    otherwise XLA's, which materialises the ``(b, n, t, t)`` scores. (JAX's own
    ``implementation=None`` always means XLA.) ``"xla"``/``"cudnn"`` force one; cuDNN raises
    at trace time where it does not apply.
    """
    if name != "auto":
        return name
    device = jax.devices()[0]
    fused = (
        device.platform == "gpu" and device.device_kind.startswith("NVIDIA")
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0 and head_dim <= 128
    )
    return "cudnn" if fused else "xla"


def option(cfg, field: str):
    """``cfg.<field>`` for a field of ``LEGACY_DEFAULTS`` (its default if the config
    predates it)."""
    return cfg.get(field, LEGACY_DEFAULTS[field])


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
    """Causal multi-head attention with grouped-query heads, rotary embeddings unless
    ``model.positions="learned"``."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        d, n, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        h = d // n
        self.n_heads, self.n_kv_heads, self.head_dim = n, k, h
        self.dtype, self.rope_theta = dtype, cfg.rope_theta
        self.use_rotary = option(cfg, "positions") == "rope"
        self.impl = attention_impl(cfg.attention, dtype, h)
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
        if self.use_rotary:
            q = rotary(q, positions_bt, self.rope_theta)
            k = rotary(k, positions_bt, self.rope_theta)
        names = ("batch", "length", "act_heads", None)
        q, k = constrain(q, names), constrain(k, names)
        v = constrain(v, names)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl)
        return jnp.einsum("btnh,nhd->btd", o, self.wo[...].astype(self.dtype))


class Block(nnx.Module):
    """Residual block. Pre-norm: ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``;
    post-norm: ``norm1(x + attn(x))`` then ``norm2(x + ffn(x))``. Dropout on each branch."""

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
                use_bias=cfg.ffn_bias, dtype=dtype, out_scale=out_scale, rngs=rngs,
            )
        else:
            self.ffn = ffn_lib.build_ffn(
                cfg.ffn, cfg.d_model, d_ff=dense_d_ff(cfg), use_bias=cfg.ffn_bias,
                dropout=cfg.dropout, dtype=dtype, out_scale=out_scale, rngs=rngs,
            )
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None
        self.post_norm = option(cfg, "norm_position") == "post"

    def _residual(self, norm: Norm, x: jax.Array, y: jax.Array) -> jax.Array:
        """``x + drop(y)``, normalised by ``norm`` in post-norm."""
        if self.drop is not None:
            y = self.drop(y)
        x = x + y.astype(x.dtype)
        if self.post_norm:
            x = norm(x)
        return constrain(x, ("batch", "length", "act_embed"))

    def attend(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """The attention sub-layer with its residual: ``(b, t, d) -> (b, t, d)``."""
        h = x_btd if self.post_norm else self.norm1(x_btd)
        return self._residual(self.norm1, x_btd, self.attn(h, positions_bt))

    def ffn_input(self, x_btd: jax.Array) -> jax.Array:
        """What the FFN sees given the attention sub-layer's output ``(b, t, d)``."""
        return x_btd if self.post_norm else self.norm2(x_btd)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, dict]:
        x = self.attend(x_btd, positions_bt)
        out = self.ffn(self.ffn_input(x))
        y, aux = out if isinstance(out, tuple) else (out, {})
        return self._residual(self.norm2, x, y), aux


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
    Post-norm models have no ``final_norm``; learned positions add ``pos_embed``.
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
        self.final_norm = None if option(cfg, "norm_position") == "post" else Norm(d, cfg.norm)
        # Learned positions start at the RMS of the 2017 sinusoid table (1/sqrt(2)), beside
        # token embeddings of RMS 1 after the sqrt(d) scale.
        pos_init = param(nnx.initializers.normal(1.0 / math.sqrt(2)), (None, "embed"))
        self.pos_embed = (
            nnx.Param(pos_init(rngs.params(), (cfg.max_seq_len, d)))
            if option(cfg, "positions") == "learned" else None
        )
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

    def embed_tokens(self, tokens_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The residual stream's input ``(b, t, d)`` and the positions ``(b, t)``."""
        b, t = tokens_bt.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = jnp.take(self.embed[...], tokens_bt, axis=0) * math.sqrt(self.d_model)
        if self.pos_embed is not None:
            if t > self.pos_embed.shape[0]:
                raise ValueError(f"sequence of {t} tokens is longer than model.max_seq_len="
                                 f"{self.pos_embed.shape[0]} (learned positions); raise "
                                 "model.max_seq_len or shorten data.seq_len")
            x = x + self.pos_embed[:t]
        return constrain(x.astype(self.dtype), ("batch", "length", "act_embed")), positions

    def output_embedding(self) -> jax.Array:
        """The output projection ``(d, v)``: the embedding transposed when tied."""
        return self.embed[...].T if self.unembed is None else self.unembed[...]

    def head(self, x_btd: jax.Array) -> jax.Array:
        """Final norm (pre-norm only) and output projection: float32 logits ``(b, t, v)``."""
        if self.final_norm is not None:
            x_btd = self.final_norm(x_btd)
        logits = ffn_lib.token_matmul(x_btd, self.output_embedding().astype(self.dtype),
                                      preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, tokens_bt: jax.Array) -> tuple[jax.Array, dict]:
        x, positions = self.embed_tokens(tokens_bt)
        x, aux = self._apply_layers(x, positions)
        return self.head(x), aux


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
    if option(cfg, "norm_position") not in NORM_POSITIONS:
        p.append(f"model.norm_position={cfg.norm_position!r} is not supported; use one of "
                 f"{list(NORM_POSITIONS)}")
    positions = option(cfg, "positions")
    if positions not in POSITIONS:
        p.append(f"model.positions={positions!r} is not supported; use one of {list(POSITIONS)}")
    if positions == "learned" and option(cfg, "max_seq_len") <= 0:
        p.append(f"model.max_seq_len={option(cfg, 'max_seq_len')} must be positive with "
                 "learned positions; set it to at least data.seq_len")
    if cfg.remat not in REMAT_POLICIES:
        p.append(f"model.remat={cfg.remat!r} is not supported; use one of {list(REMAT_POLICIES)}")
    if cfg.attention not in ATTENTION_IMPLS:
        p.append(f"model.attention={cfg.attention!r} is not supported; use one of "
                 f"{list(ATTENTION_IMPLS)}")
    elif cfg.attention == "cudnn" and cfg.dtype in DTYPES and cfg.n_heads > 0:
        h = cfg.d_model // cfg.n_heads
        if attention_impl("auto", DTYPES[cfg.dtype], h) != "cudnn":
            p.append(f"model.attention='cudnn' needs an NVIDIA GPU, model.dtype=bfloat16 and a "
                     f"head dim that is a multiple of 8 up to 128 (here "
                     f"{jax.devices()[0].device_kind}, {cfg.dtype}, {h}); use 'auto'")
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
    elif positions == "rope" and cfg.n_heads > 0 and (cfg.d_model // cfg.n_heads) % 2:
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
