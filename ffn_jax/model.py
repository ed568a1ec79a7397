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
from typing import TYPE_CHECKING, Literal, cast

import jax
import jax.numpy as jnp
from flax import nnx

from ffn_jax import ffn as ffn_lib
from ffn_jax.einsum_attention import einsum_attention
from ffn_jax.sharding import constrain, param
from ffn_jax.splash import splash_attention

if TYPE_CHECKING:
    from ffn_jax.spec import ModelSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("rms", "layer")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("rope", "learned")
ATTENTION_IMPLS = ("auto", "xla", "einsum", "cudnn", "splash")
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

    ``"auto"`` picks a fused (flash) kernel where one applies: on TPU, the Pallas splash
    kernel (``ffn_jax.splash``); on an NVIDIA GPU, cuDNN's, given a bfloat16/float16 compute
    dtype and a head dim that is a multiple of 8 and at most 128. Otherwise the scores
    ``(b, n, t, t)`` are materialised, by ``ffn_jax.einsum_attention`` (einsums and a
    hand-written backward), which was faster than XLA's ``jax.nn.dot_product_attention``
    on CPU and, where cuDNN's is not used, on an H200 (docs/perf.md). (JAX's own
    ``implementation=None`` always means XLA.) ``"xla"``/``"einsum"``/``"cudnn"``/``"splash"``
    force one; cuDNN raises at trace time where it does not apply, and splash runs
    interpreted (slowly) off TPU.
    """
    if name != "auto":
        return name
    device = jax.devices()[0]
    if device.platform == "tpu":
        return "splash"
    fused = (
        device.platform == "gpu"
        and device.device_kind.startswith("NVIDIA")
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
    )
    return "cudnn" if fused else "einsum"


class Norm(nnx.Module):
    """RMSNorm (``kind="rms"``) or LayerNorm (``"layer"``) over the last axis, in float32."""

    def __init__(self, dim: int, kind: str = "rms", eps: float = 1e-6):
        if kind not in NORMS:
            raise ValueError(f"model.norm={kind!r} is not supported; use one of {NORMS}")
        self.kind, self.eps = kind, eps
        key = jax.random.key(0)  # unused by constant initialisers
        self.scale = nnx.Param(param(nnx.initializers.ones_init(), ("embed",))(key, (dim,)))
        self.bias = (
            nnx.Param(param(nnx.initializers.zeros_init(), ("embed",))(key, (dim,)))
            if kind == "layer"
            else None
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

    def __init__(self, spec: ModelSpec, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = n, k, h
        self.dtype, self.rope_theta = dtype, spec.rope_theta
        self.use_rotary = spec.positions == "rope"
        self.impl = spec.attention_impl
        init = ffn_lib.kernel_init(d)
        self.wq = nnx.Param(param(init, ("embed", "heads", "kv"))(rngs.params(), (d, n, h)))
        self.wk = nnx.Param(param(init, ("embed", "kv_heads", "kv"))(rngs.params(), (d, k, h)))
        self.wv = nnx.Param(param(init, ("embed", "kv_heads", "kv"))(rngs.params(), (d, k, h)))
        out_init = ffn_lib.kernel_init(d, 1.0 / math.sqrt(2 * spec.n_layers))
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
        if self.impl == "splash":
            o = splash_attention(q, k, v)
        elif self.impl == "einsum":
            o = einsum_attention(q, k, v)
        else:
            impl = cast(Literal["xla", "cudnn"], self.impl)
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        return jnp.einsum("btnh,nhd->btd", o, self.wo[...].astype(self.dtype))


class Block(nnx.Module):
    """Residual block. Pre-norm: ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``;
    post-norm: ``norm1(x + attn(x))`` then ``norm2(x + ffn(x))``. Dropout on each branch."""

    def __init__(self, spec: ModelSpec, *, moe: bool, rngs: nnx.Rngs):
        dtype = get_dtype(spec.dtype)
        self.norm1 = Norm(spec.d_model, spec.norm)
        self.attn = Attention(spec, dtype=dtype, rngs=rngs)
        self.norm2 = Norm(spec.d_model, spec.norm)
        out_scale = 1.0 / math.sqrt(2 * spec.n_layers)
        if moe:
            from ffn_jax.moe import MoEFFN

            assert spec.moe is not None
            self.ffn = MoEFFN(
                spec.d_model,
                spec.moe,
                variant=spec.ffn,
                use_bias=spec.ffn_bias,
                dtype=dtype,
                out_scale=out_scale,
                ffn_init=spec.ffn_init,
                rngs=rngs,
            )
        else:
            self.ffn = ffn_lib.FFN(
                spec.d_model,
                spec.d_ff,
                spec.ffn,
                use_bias=spec.ffn_bias,
                dropout=spec.dropout,
                dtype=dtype,
                out_scale=out_scale,
                ffn_init=spec.ffn_init,
                rngs=rngs,
            )
        self.drop = nnx.Dropout(spec.dropout, rngs=rngs) if spec.dropout > 0 else None
        self.post_norm = spec.norm_position == "post"

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

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.blocks = nnx.List(
            [Block(spec, moe=spec.is_moe_layer(i), rngs=rngs) for i in range(spec.group_size)]
        )

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, dict]:
        aux: dict = {}
        for j, block in enumerate(self.blocks):
            x_btd, a = block(x_btd, positions_bt)
            # Captured values are per block: "capture/<block in group>/<name>".
            aux.update({(k.replace("capture/", f"capture/{j}/", 1)): v for k, v in a.items()})
        return x_btd, aux


class LM(nnx.Module):
    """Decoder-only LM. ``tokens (b, t) int -> (logits (b, t, v) float32, aux)``.

    ``aux`` holds the MoE layers' per-layer metrics stacked over groups (empty if dense).
    Post-norm models have no ``final_norm``; learned positions add ``pos_embed``.
    """

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.d_model = spec.d_model
        self.dtype = get_dtype(spec.dtype)
        self.n_groups = spec.n_layers // spec.group_size
        d, v = spec.d_model, spec.vocab_size
        emb_init = nnx.initializers.normal(1.0 / math.sqrt(d))
        self.embed = nnx.Param(param(emb_init, ("vocab", "embed"))(rngs.params(), (v, d)))
        self.unembed = (
            None
            if spec.tie_embeddings
            else nnx.Param(param(ffn_lib.kernel_init(d), ("embed", "vocab"))(rngs.params(), (d, v)))
        )

        @nnx.split_rngs(splits=self.n_groups)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_groups(rngs: nnx.Rngs) -> LayerGroup:
            return LayerGroup(spec, rngs=rngs)

        self.layers = make_groups(rngs)
        self.final_norm = None if spec.norm_position == "post" else Norm(d, spec.norm)
        # Learned positions start at the RMS of the 2017 sinusoid table (1/sqrt(2)), beside
        # token embeddings of RMS 1 after the sqrt(d) scale.
        pos_init = param(nnx.initializers.normal(1.0 / math.sqrt(2)), (None, "embed"))
        self.pos_embed = (
            nnx.Param(pos_init(rngs.params(), (spec.max_seq_len, d)))
            if spec.positions == "learned"
            else None
        )
        self.remat_policy = spec.remat
        self.scan_layers = spec.scan_layers
        self.moe = spec.moe  # static: weights the MoE auxiliary losses in ``lm_loss``

    def _apply_layers(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict]:
        def body(group: LayerGroup, x):
            return group(x, positions)

        if self.remat_policy != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        if self.scan_layers:
            scan = nnx.scan(
                body,
                in_axes=(0, nnx.Carry),
                out_axes=(nnx.Carry, 0),
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
        # The lookup runs on a replicated table: gathering from a table sharded over
        # vocab/embed with batch-sharded ids makes XLA replicate and re-partition the result
        # (an "involuntary full rematerialization") and permute the table; the all-gather
        # of the table is what FSDP does for every weight anyway.
        table = constrain(self.embed[...], (None, None))
        x = jnp.take(table, tokens_bt, axis=0) * math.sqrt(self.d_model)
        if self.pos_embed is not None:
            if t > self.pos_embed.shape[0]:
                raise ValueError(
                    f"sequence of {t} tokens is longer than model.max_seq_len="
                    f"{self.pos_embed.shape[0]} (learned positions); raise "
                    "model.max_seq_len or shorten data.seq_len"
                )
            x = x + self.pos_embed[:t]
        return constrain(x.astype(self.dtype), ("batch", "length", "act_embed")), positions

    def output_embedding(self) -> jax.Array:
        """The output projection ``(d, v)``: the embedding transposed when tied."""
        return self.embed[...].T if self.unembed is None else self.unembed[...]

    def head(self, x_btd: jax.Array) -> jax.Array:
        """Final norm (pre-norm only) and output projection: float32 logits ``(b, t, v)``."""
        if self.final_norm is not None:
            x_btd = self.final_norm(x_btd)
        logits = ffn_lib.token_matmul(
            x_btd, self.output_embedding().astype(self.dtype), preferred_element_type=jnp.float32
        )
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, tokens_bt: jax.Array) -> tuple[jax.Array, dict]:
        x, positions = self.embed_tokens(tokens_bt)
        x, aux = self._apply_layers(x, positions)
        return self.head(x), aux

    def capture(self, on: bool = True) -> None:
        """Make every FFN also return what it computes inside, through ``aux``, stacked over
        layer groups like the MoE metrics: ``aux["capture/<j>/hidden"] (groups, b, t, f)``,
        the hidden activations of block ``j`` of each group (dense FFNs), and
        ``aux["capture/<j>/expert"]``, ``["capture/<j>/token"]`` (groups, assignments), the
        router's flat token -> expert assignments (MoE FFNs). Layer ``g * group_size + j``.
        Used by ``ffn_jax.inspect``; off (the default) it changes nothing."""
        for _, module in self.iter_modules():
            if isinstance(module, Block):
                module.ffn.capture = on


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood ``(b, t)`` of ``targets`` and the log-partition
    ``logsumexp(logits) (b, t)``; the one NLL of training and evaluation."""
    logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    nll_bt = logz_bt - jnp.take_along_axis(logits_btv, targets_bt[..., None], -1)[..., 0]
    return nll_bt, logz_bt


def lm_loss(
    model: LM, tokens_bt: jax.Array, logits_z_loss: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss on ``tokens (b, t+1)``: mean next-token NLL, plus
    ``logits_z_loss * mean(logz^2)`` when positive, plus the MoE auxiliary losses weighted by
    the model's MoE settings. Returns ``(loss, metrics)``; MoE metrics are per layer."""
    logits, aux = model(tokens_bt[:, :-1])
    nll_bt, logz_bt = token_nll(logits, tokens_bt[:, 1:])
    nll = jnp.mean(nll_bt)
    loss, metrics = nll, {"nll": nll}
    if logits_z_loss > 0:
        z = jnp.mean(jnp.square(logz_bt))
        loss = loss + logits_z_loss * z
        metrics["logits_z_loss"] = z
    if aux:
        from ffn_jax.moe import moe_aux_loss

        assert model.moe is not None
        moe_loss = moe_aux_loss(aux, model.moe)
        loss = loss + moe_loss
        metrics["moe_aux_loss"] = moe_loss
        metrics.update({f"moe/{k}": v for k, v in aux.items()})  # per layer (stacked)
    return loss, metrics


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
