"""The ``model.moe`` config block: derived settings, validation, capacity and cost.

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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from ffn_jax.ffn import ffn_cost

ROUTERS = ("topk", "expert_choice")
DISPATCHES = ("capacity", "dropless")
DROPLESS_IMPLS = ("ragged", "loop")


@dataclasses.dataclass(frozen=True)
class MoESettings:
    """Static MoE hyper-parameters after applying granularity (hashable; safe as jit static)."""

    num_experts: int  # E = num_experts * granularity
    top_k: int  # k = top_k * granularity
    expert_width: int  # d_ff // granularity
    shared_width: int  # num_shared * expert_width (0 = no shared expert)
    router: str
    renormalize: bool
    dispatch: str
    dropless_impl: str
    capacity_factor: float
    eval_capacity_factor: float
    jitter: float

    @classmethod
    def from_config(cls, moe_cfg, d_ff: int) -> MoESettings:
        """Settings of ``config.model.moe`` for a dense parameter-matched width ``d_ff``."""
        g = int(moe_cfg.granularity)
        width = d_ff // g
        return cls(
            num_experts=int(moe_cfg.num_experts) * g,
            top_k=int(moe_cfg.top_k) * g,
            expert_width=width,
            shared_width=int(moe_cfg.num_shared) * width,
            router=str(moe_cfg.router),
            renormalize=bool(moe_cfg.renormalize),
            dispatch=str(moe_cfg.dispatch),
            dropless_impl=str(moe_cfg.dropless_impl),
            capacity_factor=float(moe_cfg.capacity_factor),
            eval_capacity_factor=float(moe_cfg.eval_capacity_factor),
            jitter=float(moe_cfg.jitter),
        )


def capacity(capacity_factor: float, k: int, tokens: int, num_experts: int) -> int:
    """Slots per expert in a group of ``tokens`` tokens (see the module docstring)."""
    return max(1, min(tokens, math.ceil(capacity_factor * k * tokens / num_experts)))


def _choice(moe_cfg, field: str, options: tuple[str, ...]) -> list[str]:
    value = moe_cfg[field]
    if value in options:
        return []
    return [f"model.moe.{field}={value!r} is not supported; use one of {list(options)}"]


def validate(
    moe_cfg,
    d_model: int,
    n_layers: int | None,
    mesh_shape: Mapping[str, int] | None,
    d_ff: int | None = None,
) -> list[str]:
    """Problems with ``config.model.moe`` (empty list = fine), one actionable line each.

    ``n_layers`` (None = unknown) checks that ``every`` leaves at least one MoE layer;
    ``mesh_shape`` (``config.mesh.shape``; None = no mesh) checks the expert-axis split;
    ``d_ff`` (default ``4 * d_model``) checks the fine-grained expert width.
    """
    e = int(moe_cfg.num_experts)
    if e < 0:
        return [f"model.moe.num_experts={e} must be >= 0 (0 = dense FFN)"]
    if e == 0:
        return []
    problems = _choice(moe_cfg, "router", ROUTERS) + _choice(moe_cfg, "dispatch", DISPATCHES)
    problems += _choice(moe_cfg, "dropless_impl", DROPLESS_IMPLS)
    g = int(moe_cfg.granularity)
    if g < 1:
        return problems + [f"model.moe.granularity={g} must be >= 1"]
    if not 1 <= moe_cfg.top_k <= e:
        problems.append(
            f"model.moe.top_k={moe_cfg.top_k} must be in [1, num_experts={e}]; lower top_k "
            "or add experts"
        )
    if moe_cfg.router == "expert_choice" and moe_cfg.dispatch == "dropless":
        problems.append(
            "model.moe.dispatch='dropless' does not apply to router='expert_choice' (every "
            "expert takes exactly its capacity); set model.moe.dispatch='capacity'"
        )
    if moe_cfg.dispatch == "capacity" or moe_cfg.router == "expert_choice":
        for field in ("capacity_factor", "eval_capacity_factor"):
            if not moe_cfg[field] > 0:
                problems.append(
                    f"model.moe.{field}={moe_cfg[field]} must be > 0 on the capacity path; "
                    "use e.g. 1.25 (train) / 2.0 (eval), or dispatch='dropless'"
                )
    for field, low in (("num_shared", 0), ("jitter", 0), ("lb_loss_coef", 0), ("z_loss_coef", 0)):
        if moe_cfg[field] < low:
            problems.append(f"model.moe.{field}={moe_cfg[field]} must be >= {low}")
    if not moe_cfg.jitter < 1:
        problems.append(f"model.moe.jitter={moe_cfg.jitter} must be < 1 (e.g. 0.01)")
    every = int(moe_cfg.every)
    if every < 1 or (n_layers is not None and every > n_layers):
        problems.append(
            f"model.moe.every={every} must be in [1, n_layers={n_layers}] so that at least "
            "one layer is MoE"
        )
    width = (4 * d_model if d_ff is None else d_ff) // g
    if width < 1:
        problems.append(f"model.moe.granularity={g} leaves expert width 0; lower granularity")
    n_ep = int((mesh_shape or {}).get("expert", 1))
    if n_ep > 1 and (e * g) % n_ep:
        problems.append(
            f"model.moe.num_experts*granularity={e * g} is not divisible by mesh.shape.expert="
            f"{n_ep}; change num_experts or the expert axis size"
        )
    return problems


def moe_cost(moe_cfg, variant: str, d_model: int, d_ff: int, use_bias: bool = False) -> dict:
    """Parameters and forward FLOPs per token of one MoE FFN (for the comparison tables).

    ``total_params``: routed experts + router + shared expert. ``active_params``: the ``k``
    experts a token uses + router + shared (expert choice: ``k`` on average).
    ``flops_per_token``: the same active count in FLOPs (router matmul included), i.e. what a
    dense FFN must spend to be "matched in active FLOPs". ``compute_flops_per_token`` adds
    the empty capacity slots the capacity path computes anyway (``capacity_factor * k``
    expert applications per token instead of ``k``).
    """
    s = MoESettings.from_config(moe_cfg, d_ff)
    expert = ffn_cost(variant, d_model, s.expert_width, use_bias)
    shared = (
        ffn_cost(variant, d_model, s.shared_width, use_bias)
        if s.shared_width
        else {"params": 0, "flops_per_token": 0}
    )
    router = d_model * s.num_experts
    fixed_params = router + shared["params"]
    fixed_flops = 2 * router + shared["flops_per_token"]
    slots = s.top_k
    if s.dispatch == "capacity" or s.router == "expert_choice":
        slots = s.capacity_factor * s.top_k
    return {
        "total_params": s.num_experts * expert["params"] + fixed_params,
        "active_params": s.top_k * expert["params"] + fixed_params,
        "flops_per_token": s.top_k * expert["flops_per_token"] + fixed_flops,
        "compute_flops_per_token": int(slots * expert["flops_per_token"] + fixed_flops),
    }
