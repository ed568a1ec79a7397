"""``MoEFFN``: the Mixture-of-Experts FFN module and its expert-parallel ``shard_map``.

Parameters (the dense FFN's names, ``ffn_jax/ffn.py``, with a leading expert axis):
``router`` ``(d_model, E)`` logical ``("embed", None)`` (optional ``router_bias`` ``(E,)``);
expert weights ``w1``/``w3`` ``(E, d_model, f)`` logical ``("expert", "embed", "mlp")`` and
``w2`` ``(E, f, d_model)`` ``("expert", "mlp", "embed")``, optional biases ``b1``/``b3``
``(E, f)`` and ``b2`` ``(E, d_model)``; ``shared``: a dense ``ffn_jax.ffn.FFN`` of width
``num_shared * f`` (the shared experts fused), always on.

Sharding: under an ambient mesh (``jax.set_mesh``) the routed part runs in one
``jax.shard_map`` over the whole mesh: tokens are split over the mesh axes of the logical
``"batch"`` rule, experts over the axis of the ``"expert"`` rule, and the experts' hidden
dimension over the axis of the ``"mlp"`` rule (tensor-parallel experts: each tensor shard
computes its slice of the hidden units for the same tokens and a ``psum`` adds the partial
outputs); FSDP-sharded weights are gathered on entry. The expert weights are cast to the
compute dtype before they enter, so the gathers and the gradients' reductions move
``model.dtype`` bytes. The router matmul, jitter and the shared expert run outside, under
GSPMD.
Without a mesh the same per-shard function runs directly, with no collectives. The loss-free
balance bias enters the shard_map replicated; the loads come out psum-ed (replicated), and
the bias update runs outside it, so every shard sees and computes the same bias.

Modes: ``deterministic=False`` (training, the default) uses ``capacity_factor`` and jitter;
``model.eval()`` sets ``deterministic=True`` (no jitter) and ``model.train()`` sets it back,
exactly like ``nnx.Dropout``; the loss-free balance bias is updated in training only.
Evaluation is dropless when ``eval_capacity_factor`` is 0 (the default) and the router has a
dropless path, so a token's score never depends on the other sequences of its batch;
otherwise it uses ``eval_capacity_factor`` (or, at 0, the training ``capacity_factor``:
expert choice picks tokens per batch, so it always depends on them).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ffn_jax.ffn import FFN, get_variant, hidden_activation, kernel_init
from ffn_jax.moe.dispatch import NO_MESH, ShardAxes
from ffn_jax.moe.experts import Weights
from ffn_jax.moe.routers import ROUTERS, moe_shard
from ffn_jax.moe.routing import forced_selection, loss_free_update
from ffn_jax.moe.settings import MoESettings, capacity
from ffn_jax.sharding import constrain, logical_to_spec, param

# Expert parameter -> (ndim, the axis of the hidden dimension or None)
_EXPERT_AXES = {
    "w1": (3, 2),
    "w3": (3, 2),
    "w2": (3, 1),
    "b1": (2, 1),
    "b3": (2, 1),
    "b2": (2, None),
}


class BalanceBias(nnx.Variable[jax.Array]):
    """The loss-free balancing bias ``(E,)`` float32 of one MoE layer (``(groups, E)`` when
    stacked over scanned layers).

    Model state but not a parameter: ``nnx.Optimizer(..., wrt=nnx.Param)`` never sees it
    (no gradient, no AdamW moments, no weight decay), ``count_params`` does not count it,
    and checkpoints save it with the rest of the model state. ``MoEFFN`` updates it in
    training (``ffn_jax.moe.routing.loss_free_update``); it is replicated on every device."""


def _expert_init(scale: float = 1.0):
    """Truncated normal, std ``scale / sqrt(fan_in)`` per expert (axis 0 is a batch axis)."""
    return nnx.initializers.variance_scaling(
        scale**2, "fan_in", "truncated_normal", batch_axis=(0,)
    )


def _as_tuple(target) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _tensor_axis(width: int, batch: tuple[str, ...], expert: tuple[str, ...]) -> str | None:
    """The mesh axis the experts' hidden dimension is sharded over: the ``"mlp"`` rule's
    one axis when it splits (size > 1) and shards neither tokens nor experts; else None."""
    mlp = _as_tuple(logical_to_spec(("mlp",))[0])
    size = jax.sharding.get_abstract_mesh().shape[mlp[0]] if len(mlp) == 1 else 1
    if size == 1 or mlp[0] in batch + expert:
        return None
    if width % size:
        raise ValueError(
            f"MoE expert width {width} is not divisible by the {size}-way tensor axis "
            f"{mlp[0]!r} (experts are tensor parallel); change model.d_ff / "
            "model.moe.granularity or mesh.shape"
        )
    return mlp[0]


def shard_axes(num_experts: int, width: int) -> ShardAxes:
    """The batch, expert and tensor mesh axes from the ambient mesh and logical rules
    (ValueError if the expert or tensor sharding cannot work); ``width`` is the experts'
    hidden width."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = _as_tuple(logical_to_spec(("batch",))[0])
    expert = _as_tuple(logical_to_spec(("expert",))[0])
    if len(expert) > 1:
        raise ValueError(f"mesh.rules: 'expert' maps to {expert}; map it to one mesh axis")
    tensor = _tensor_axis(width, batch, expert)
    n = mesh.shape[expert[0]] if expert else 1
    if not expert or (n == 1 and expert[0] not in batch):
        return ShardAxes(batch=batch, tensor=tensor)  # experts not split over a batch axis
    if num_experts % n:
        raise ValueError(
            f"model.moe.num_experts*granularity={num_experts} is not divisible by the expert "
            f"mesh axis {expert[0]!r} of size {n}; change num_experts or mesh.shape"
        )
    if n > 1 and expert[0] not in batch:
        raise ValueError(
            f"mesh.rules: 'batch' must include the expert mesh axis {expert[0]!r} (size {n}) "
            "so that tokens are split over expert shards"
        )
    return ShardAxes(batch=batch, expert=expert[0], n_expert=n, tensor=tensor)


def run_routed(
    x_bld: jax.Array,
    logits_ble: jax.Array,
    w: Weights,
    *,
    s: MoESettings,
    act,
    capacity_factor: float,
    dropout_key: jax.Array | None = None,
    bias_e: jax.Array | None = None,
    routing_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """``moe_shard`` under a ``jax.shard_map`` over the ambient mesh, or directly without a
    mesh or on a one-device mesh (where the backward of ``shard_map`` would only copy the
    replicated expert weights through a ``psum``). Returns ``(y, aux, load_e)``.
    ``dropout_key``: raw ``uint32`` key data of the experts' hidden dropout (None = none);
    ``bias_e (E,)``: the loss-free balance bias (None = none); ``routing_key``: raw key data
    of ``routing="random"``; all passed replicated into the shard_map. ``aux`` and
    ``load_e`` come out replicated (psum-ed inside)."""
    extras = {"dropout_key": dropout_key, "bias_e": bias_e, "routing_key": routing_key}
    extras = {name: value for name, value in extras.items() if value is not None}

    def fn(x, lg, w, extras: dict[str, jax.Array], axes: ShardAxes):
        return moe_shard(
            x,
            lg,
            w,
            s=s,
            act=act,
            capacity_factor=capacity_factor,
            axes=axes,
            dropout_key=extras.get("dropout_key"),
            bias_e=extras.get("bias_e"),
            routing_key=extras.get("routing_key"),
        )

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(x_bld, logits_ble, w, extras, NO_MESH)
    axes = shard_axes(s.num_experts, s.expert_width)
    shards = math.prod(mesh.shape[a] for a in axes.batch)
    if x_bld.shape[0] % shards:
        raise ValueError(
            f"MoE batch of {x_bld.shape[0]} sequences is not divisible by the {shards}-way "
            f"batch sharding over {axes.batch}; change data.batch_size or mesh.shape"
        )
    tokens = P(axes.batch or None, None, None)
    w_specs = {}
    for name in w:
        ndim, hidden = _EXPERT_AXES[name]
        w_specs[name] = P(
            axes.expert, *(axes.tensor if i == hidden else None for i in range(1, ndim))
        )
    sharded = jax.shard_map(
        functools.partial(fn, axes=axes),
        in_specs=(tokens, tokens, w_specs, P()),
        out_specs=(tokens, P(), P()),
        check_vma=True,
    )
    return sharded(x_bld, logits_ble, w, extras)


class MoEFFN(nnx.Module):
    """Mixture-of-Experts FFN: ``x (batch, length, d_model) -> (y same shape, aux)``.

    ``settings`` are the resolved MoE settings (``ModelSpec.moe``; expert width, E and k
    already include the granularity). ``aux`` (fixed keys, see ``ffn_jax.moe.routing``):
    ``lb_loss``, ``z_loss``, ``expert_fraction (E,)``, ``max_violation``, ``dropped_fraction``,
    ``router_entropy``, ``router_logit_rms``.
    With ``settings.balance == "loss_free"`` the layer holds ``balance_bias``, a
    :class:`BalanceBias` ``(E,)`` added to the scores for the top-k selection only; each
    training call (never evaluation) moves it by the rule of
    ``ffn_jax.moe.routing.loss_free_update`` from the call's global loads, after routing.
    ``router_bias`` None (the default) takes ``settings.router_bias``. In training the
    experts (and the shared expert) apply ``settings.dropout`` to their hidden activations,
    as the dense FFN does; evaluation is deterministic. ``settings.routing`` ``balanced`` /
    ``random`` force the selection (benchmarking, ``ffn_jax.moe.routing.forced_selection``);
    ``random`` draws per training call from the layer's ``dropout`` stream and uses a fixed
    key in evaluation.
    Init: router and ``w1``/``w3`` std ``1/sqrt(fan_in)``; ``w2`` (and the shared expert's)
    times ``out_scale``, as the dense FFN it replaces (``1/sqrt(2 n_layers)`` in the LM).
    ``ffn_init`` scales the experts' (and the shared expert's) hidden activations exactly as
    the dense FFN's (``ffn_jax.ffn.hidden_activation``).
    """

    def __init__(
        self,
        d_model: int,
        settings: MoESettings,
        *,
        variant: str,
        use_bias: bool = False,
        router_bias: bool | None = None,
        dtype: jnp.dtype = jnp.float32,
        out_scale: float = 1.0,
        ffn_init: str = "default",
        rngs: nnx.Rngs,
    ):
        s = self.settings = settings
        self.variant = get_variant(variant)
        self.activation = hidden_activation(variant, ffn_init)  # the experts' act, with gain
        self.dtype = dtype
        self.deterministic = False
        e, f = s.num_experts, s.expert_width
        self.router = nnx.Param(
            param(kernel_init(d_model), ("embed", None))(rngs.params(), (d_model, e))
        )
        zeros = nnx.initializers.zeros_init()
        router_bias = s.router_bias if router_bias is None else router_bias
        self.router_bias = (
            nnx.Param(param(zeros, (None,))(rngs.params(), (e,))) if router_bias else None
        )
        w_in = param(_expert_init(), ("expert", "embed", "mlp"))
        self.w1 = nnx.Param(w_in(rngs.params(), (e, d_model, f)))
        self.w3 = nnx.Param(w_in(rngs.params(), (e, d_model, f))) if self.variant.gated else None
        self.w2 = nnx.Param(
            param(_expert_init(out_scale), ("expert", "mlp", "embed"))(
                rngs.params(), (e, f, d_model)
            )
        )
        b_h, b_d = param(zeros, ("expert", "mlp")), param(zeros, ("expert", "embed"))
        self.b1 = nnx.Param(b_h(rngs.params(), (e, f))) if use_bias else None
        self.b3 = nnx.Param(b_h(rngs.params(), (e, f))) if use_bias and self.variant.gated else None
        self.b2 = nnx.Param(b_d(rngs.params(), (e, d_model))) if use_bias else None
        self.shared = (
            FFN(
                d_model,
                s.shared_width,
                variant,
                use_bias=use_bias,
                dropout=s.dropout,
                dtype=dtype,
                out_scale=out_scale,
                ffn_init=ffn_init,
                rngs=rngs,
            )
            if s.shared_width
            else None
        )
        random_routing = s.routing == "random"
        self.rngs = rngs["dropout"].fork() if s.jitter or s.dropout or random_routing else None
        self.balance_bias = (
            BalanceBias(jnp.zeros((e,), jnp.float32)) if s.balance == "loss_free" else None
        )
        # True: aux also holds the router's assignments (see ``LM.capture``).
        self.capture = False

    def set_view(self, deterministic: bool | None = None) -> None:
        """``nnx.view`` hook: ``deterministic=True`` is evaluation mode."""
        if deterministic is not None:
            self.deterministic = deterministic

    def expert_weights(self) -> Weights:
        """The present expert parameters as a dict of arrays (``w1, w3, w2, b1, b3, b2``)."""
        names = ("w1", "w3", "w2", "b1", "b3", "b2")
        return {n: getattr(self, n)[...] for n in names if getattr(self, n) is not None}

    def router_logits(self, x_btd: jax.Array) -> jax.Array:
        """Float32 router logits ``(b, t, E)``, with multiplicative jitter in training."""
        x = x_btd.astype(jnp.float32)
        if self.rngs is not None and self.settings.jitter > 0 and not self.deterministic:
            eps = self.settings.jitter
            x = x * jax.random.uniform(self.rngs(), x.shape, jnp.float32, 1 - eps, 1 + eps)
        # Replicated (it is small): an FSDP-sharded router meets batch-sharded tokens through
        # collective-permutes otherwise.
        logits = x @ constrain(self.router[...], (None, None)).astype(jnp.float32)
        if self.router_bias is not None:
            logits = logits + self.router_bias[...].astype(jnp.float32)
        return logits

    def __call__(self, x_btd: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        s, cf = self.settings, self.settings.capacity_factor
        if self.deterministic and s.eval_capacity_factor > 0:
            cf = s.eval_capacity_factor
        elif self.deterministic and "dropless" in ROUTERS[s.router].dispatches:
            s = dataclasses.replace(s, dispatch="dropless")
        logits = self.router_logits(x_btd)
        dropout_key = None
        if self.rngs is not None and s.dropout > 0 and not self.deterministic:
            dropout_key = jax.random.key_data(self.rngs())
        bias_e = None if self.balance_bias is None else self.balance_bias[...]
        routing_key = None
        if s.routing == "random":  # a fresh draw per training call; a fixed one in evaluation
            assert self.rngs is not None
            key = jax.random.key(0) if self.deterministic else self.rngs()
            routing_key = jax.random.key_data(key)
        weights = {name: a.astype(self.dtype) for name, a in self.expert_weights().items()}
        y, aux, load_e = run_routed(
            x_btd.astype(self.dtype),
            logits,
            weights,
            s=s,
            act=self.activation,
            capacity_factor=cf,
            dropout_key=dropout_key,
            bias_e=bias_e,
            routing_key=routing_key,
        )
        if self.balance_bias is not None and bias_e is not None and not self.deterministic:
            # After routing, from the global (psum-ed, replicated) loads: every shard agrees.
            self.balance_bias[...] = loss_free_update(bias_e, load_e, s.balance_rate)
        if self.shared is not None:
            shared = self.shared(x_btd)
            assert not isinstance(shared, tuple)  # capture is set on blocks' FFNs only
            y = y + shared
        if self.capture:  # the flat token -> expert assignments of these logits
            logits_te = logits.reshape(-1, s.num_experts)
            t = logits_te.shape[0]
            cap = capacity(cf, s.top_k, t, s.num_experts)
            if s.routing != "learned":  # over the whole batch: the shards' draw on one device
                key = None if routing_key is None else jax.random.wrap_key_data(routing_key)
                bias_e = forced_selection(s.routing, t, s.num_experts, s.top_k, key)
            expert_a, token_a = ROUTERS[s.router].assign(logits_te, s, cap, bias_e)
            aux = {**aux, "capture/expert": expert_a, "capture/token": token_a}
        return y, aux
