"""Mixture-of-Experts FFN: routers, dispatch paths, expert parallelism, aux losses.

Modules: ``settings`` (resolved settings, capacity, cost), ``routing`` (router math, aux
losses, loss-free balancing, metrics), ``routers`` (the router registry and the per-shard
function), ``experts`` (stacked-expert FFN: einsum, ragged_dot, tiled loop), ``dispatch``
(per-shard capacity / dropless / expert-choice paths with ``all_to_all``) and ``layer`` (the
``MoEFFN`` module, its ``BalanceBias`` state and its ``shard_map``).
"""

from ffn_jax.moe.layer import BalanceBias, MoEFFN
from ffn_jax.moe.routers import ROUTERS, Router
from ffn_jax.moe.routing import loss_free_update, moe_aux_loss
from ffn_jax.moe.settings import AUX_SCOPES, BALANCES, MoESettings, capacity, moe_cost

__all__ = [
    "AUX_SCOPES",
    "BALANCES",
    "ROUTERS",
    "BalanceBias",
    "MoEFFN",
    "MoESettings",
    "Router",
    "capacity",
    "loss_free_update",
    "moe_aux_loss",
    "moe_cost",
]
