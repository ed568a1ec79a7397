"""MoE settings (resolved from the ``model.moe`` config block by ``ffn_jax.spec``), capacity
and cost.

Conventions (also stated in ``configs/base.py``):

* **Fine-grained experts.** ``granularity = g`` splits every expert into ``g`` narrower
  ones: ``E = num_experts * g`` experts of width ``d_ff // g``, and ``k = top_k * g`` of them
  per token, so active parameters and FLOPs stay those of ``top_k`` full-width experts.
* **Shared experts** (DeepSeekMoE) are one always-on dense FFN of width
  ``num_shared * expert_width`` (``num_shared`` experts fused into one matrix).
* **Capacity** is per *group*, a group being the tokens local to one data shard (one device's
  slice of the batch; the whole batch without a mesh)::

      capacity = min(tokens_per_group, ceil(capacity_factor * k * tokens_per_group / E))

  With ``k`` in the formula a factor of 1.0 has exactly enough slots at perfect balance; the
  clamp to ``tokens_per_group`` is free (no expert can receive a token twice), so a large
  factor means "no drops". Expert choice uses the same formula for its per-expert picks.
* **Balancing** (``balance``, see ``ffn_jax.moe.routing``): ``aux`` (the Switch loss,
  weighted by ``lb_loss_coef``), ``loss_free`` (a per-expert selection bias moved by
  ``balance_rate`` after every training forward pass; no load-balance loss) or ``none``.
  ``aux_scope`` says over what the load-balance loss's ``f_i`` and ``P_i`` are taken: the
  whole batch (Switch) or each sequence (DeepSeek-V3's sequence-wise loss), averaged.
* **Routing** (``routing``): ``learned`` (the router's scores pick the experts) or, for
  benchmarking, a forced selection that ignores them: ``balanced`` (token ``i`` of a group
  takes experts ``i*k .. i*k+k-1`` mod ``E``: every expert gets exactly ``k*T/E`` tokens
  when that divides) or ``random`` (``k`` distinct experts uniformly at random, a fresh
  draw every training step). The combine weights stay the router's scores of the forced
  choices, so the router still trains; see ``ffn_jax.moe.routing.forced_selection``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from ffn_jax.ffn import ffn_cost

DROPLESS_IMPLS = ("ragged", "loop")
BALANCES = ("aux", "loss_free", "none")  # model.moe.balance
AUX_SCOPES = ("batch", "sequence")  # model.moe.aux_scope
ROUTING_MODES = ("learned", "balanced", "random")  # model.moe.routing


@dataclasses.dataclass(frozen=True)
class MoESettings:
    """Static MoE hyper-parameters after applying granularity (hashable; safe as jit static).

    Built once by ``ffn_jax.spec`` from ``config.model.moe``; the auxiliary-loss weights
    live here too, so the loss is weighted where the MoE settings are.
    """

    num_experts: int  # E = num_experts * granularity
    top_k: int  # k = top_k * granularity
    expert_width: int  # d_ff // granularity
    shared_width: int  # num_shared * expert_width (0 = no shared expert)
    router: str  # a key of ffn_jax.moe.routers.ROUTERS
    renormalize: bool
    dispatch: str
    dropless_impl: str
    capacity_factor: float
    eval_capacity_factor: float
    jitter: float
    every: int = 1  # MoE in every N-th layer (the last of each group of N)
    lb_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    router_bias: bool = False  # a learned (E,) bias added to the router logits
    dropout: float = 0.0  # hidden dropout inside the experts (``model.dropout``), training only
    balance: str = "aux"  # one of BALANCES
    balance_rate: float = 1e-3  # loss_free: the bias step per training forward pass
    aux_scope: str = "batch"  # one of AUX_SCOPES: f_i, P_i of lb_loss per batch or sequence
    routing: str = "learned"  # one of ROUTING_MODES: "balanced"/"random" force the selection
    exchange: str = "auto"  # dropless token exchange: one of ffn_jax.moe.exchange.EXCHANGES

    @classmethod
    def from_block(cls, moe: Mapping[str, Any], d_ff: int, dropout: float = 0.0) -> MoESettings:
        """Settings of a ``config.model.moe`` block (a mapping) for the dense
        parameter-matched width ``d_ff``; ``dropout`` is ``model.dropout`` (expert hidden
        dropout, as the dense FFN's)."""
        g = int(moe["granularity"])
        width = d_ff // g
        return cls(
            num_experts=int(moe["num_experts"]) * g,
            top_k=int(moe["top_k"]) * g,
            expert_width=width,
            shared_width=int(moe["num_shared"]) * width,
            router=str(moe["router"]),
            renormalize=bool(moe["renormalize"]),
            dispatch=str(moe["dispatch"]),
            dropless_impl=str(moe["dropless_impl"]),
            capacity_factor=float(moe["capacity_factor"]),
            eval_capacity_factor=float(moe["eval_capacity_factor"]),
            jitter=float(moe["jitter"]),
            every=int(moe["every"]),
            lb_loss_coef=float(moe["lb_loss_coef"]),
            z_loss_coef=float(moe["z_loss_coef"]),
            router_bias=bool(moe.get("router_bias", False)),
            dropout=float(dropout),
            balance=str(moe.get("balance", "aux")),
            balance_rate=float(moe.get("balance_rate", 1e-3)),
            aux_scope=str(moe.get("aux_scope", "batch")),
            routing=str(moe.get("routing", "learned")),
            exchange=str(moe.get("exchange", "padded")),
        )

    @property
    def slots_per_token(self) -> float:
        """Expert applications computed per token: ``capacity_factor * k`` where the router
        fills fixed-capacity slots (empty ones included), else ``k``."""
        from ffn_jax.moe.routers import ROUTERS

        if ROUTERS[self.router].uses_capacity(self.dispatch):
            return self.capacity_factor * self.top_k
        return float(self.top_k)


def capacity(capacity_factor: float, k: int, tokens: int, num_experts: int) -> int:
    """Slots per expert in a group of ``tokens`` tokens (see the module docstring).

    Exact: the factor is taken as the decimal it prints as (``Fraction(str(1.1)) = 11/10``),
    so ``capacity(1.1, 1, 110, 11) == 11`` with no float rounding up to 12.
    """
    slots = Fraction(str(capacity_factor)) * k * tokens / num_experts
    return max(1, min(tokens, math.ceil(slots)))


def moe_cost(s: MoESettings, variant: str, d_model: int, use_bias: bool = False) -> dict:
    """Parameters and forward FLOPs per token of one MoE FFN (for the comparison tables).

    ``total_params``: routed experts + router (with its bias under ``router_bias``) + shared
    expert. ``active_params``: the ``k`` experts a token uses + router + shared (expert
    choice: ``k`` on average).
    ``flops_per_token``: the same active count in FLOPs (router matmul included), i.e. what a
    dense FFN must spend to be "matched in active FLOPs". ``compute_flops_per_token`` adds
    the empty capacity slots the capacity path computes anyway (``capacity_factor * k``
    expert applications per token instead of ``k``).
    """
    expert = ffn_cost(variant, d_model, s.expert_width, use_bias)
    shared = (
        ffn_cost(variant, d_model, s.shared_width, use_bias)
        if s.shared_width
        else {"params": 0, "flops_per_token": 0}
    )
    router = d_model * s.num_experts
    bias = s.num_experts if s.router_bias else 0
    fixed_params = router + bias + shared["params"]
    fixed_flops = 2 * router + bias + shared["flops_per_token"]
    slots = s.slots_per_token
    return {
        "total_params": s.num_experts * expert["params"] + fixed_params,
        "active_params": s.top_k * expert["params"] + fixed_params,
        "flops_per_token": s.top_k * expert["flops_per_token"] + fixed_flops,
        "compute_flops_per_token": int(slots * expert["flops_per_token"] + fixed_flops),
    }
