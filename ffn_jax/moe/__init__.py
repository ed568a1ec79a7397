"""Mixture-of-Experts FFN: routers, dispatch paths, expert parallelism, aux losses.

Modules: ``settings`` (config block, capacity, validation, cost), ``routing`` (router math,
aux losses, metrics), ``experts`` (stacked-expert FFN: einsum, ragged_dot, tiled loop),
``dispatch`` (per-shard capacity / dropless / expert-choice paths with ``all_to_all``) and
``layer`` (the ``MoEFFN`` module and its ``shard_map``).
"""

from ffn_jax.moe.layer import MoEFFN
from ffn_jax.moe.routing import moe_aux_loss
from ffn_jax.moe.settings import MoESettings, capacity, moe_cost, validate

__all__ = ["MoEFFN", "MoESettings", "capacity", "moe_aux_loss", "moe_cost", "validate"]
