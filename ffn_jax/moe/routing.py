"""Router math (float32), the auxiliary losses and the MoE metrics.

Letters: ``t`` tokens of one group, ``e`` experts, ``k`` choices per token, ``c`` capacity.

Aux conventions (every value is *raw*: unweighted, per layer):

* ``lb_loss`` (Switch): ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of the ``T * k``
  routed assignments (before capacity drops) that chose expert ``i`` and ``P_i`` the mean router
  probability of expert ``i``. It is **1.0 at perfect balance** for any ``k`` (``E`` at total
  collapse onto one expert).
* ``z_loss`` (ST-MoE): mean over tokens of ``logsumexp(logits)^2``.
* ``expert_fraction`` ``(E,)``: the ``f_i`` above (sums to 1).
* ``dropped_fraction``: token choice: dropped assignments / all assignments (0 on the dropless
  path); expert choice: tokens picked by no expert / all tokens.
* ``router_entropy``: mean over tokens of ``-sum_i p_i log p_i`` (``log E`` = uniform).

Every statistic is a global mean over all tokens of the batch: the per-shard sums are
``psum``-ed over the batch mesh axes before the ratios are taken, so the sharded values equal
the unsharded ones exactly. ``moe_aux_loss`` averages the per-layer values over layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from ffn_jax.moe.settings import MoESettings


def top_k_route(
    probs_te: jax.Array, k: int, renormalize: bool, logits_te: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Token choice: ``(expert_tk int32, weight_tk float32)`` of shape ``(t, k)``, best first.

    The experts are selected on ``logits_te (t, E)`` when given (softmax keeps their order
    and they do not underflow, so probabilities that round to the same float32 value, 0
    included, cannot pick the wrong experts), else on ``probs_te (t, E)``. The weight is the
    chosen experts' pre-selection router probability, so with ``k = 1`` (Switch) the router
    still gets a gradient from the task loss; for ``k >= 2`` ``renormalize`` rescales the
    selected weights to sum to 1.
    """
    _, expert_tk = jax.lax.top_k(probs_te if logits_te is None else logits_te, k)
    weight_tk = jnp.take_along_axis(probs_te, expert_tk, axis=-1)
    if renormalize and k > 1:
        weight_tk = weight_tk / jnp.sum(weight_tk, axis=-1, keepdims=True)
    return expert_tk.astype(jnp.int32), weight_tk


def expert_choice_route(
    probs_te: jax.Array, capacity: int, logits_te: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Expert choice: every expert takes its ``capacity`` highest-probability tokens.

    Returns ``(token_ec int32, weight_ec float32)`` of shape ``(E, capacity)``. With
    ``logits_te (t, E)`` the tokens are selected on ``log_softmax(logits)`` (the order of the
    probabilities over tokens, without float32 underflow); the weights are the probabilities.
    Non-causal in a decoder: whether a token is picked depends on the other tokens of the
    group, later ones included.
    """
    select_te = probs_te if logits_te is None else jax.nn.log_softmax(logits_te, axis=-1)
    _, token_ec = jax.lax.top_k(select_te.T, capacity)
    weight_ec = jnp.take_along_axis(probs_te.T, token_ec, axis=-1)
    return token_ec.astype(jnp.int32), weight_ec


def router_sums(
    logits_te: jax.Array,
    probs_te: jax.Array,
    count_e: jax.Array,
    dropped: jax.Array,
    dropped_of: int,
) -> dict[str, jax.Array]:
    """Per-group sums behind the aux values (to be ``psum``-ed over the batch axes).

    ``count_e``: assignments per expert before drops; ``dropped`` out of ``dropped_of``.
    """
    lse_t = jax.nn.logsumexp(logits_te, axis=-1)
    entropy_t = -jnp.sum(probs_te * jnp.log(jnp.maximum(probs_te, 1e-30)), axis=-1)
    f32 = jnp.float32
    return {
        "tokens": jnp.asarray(probs_te.shape[0], f32),
        "count_e": count_e.astype(f32),
        "prob_e": jnp.sum(probs_te, axis=0),
        "z": jnp.sum(jnp.square(lse_t)),
        "entropy": jnp.sum(entropy_t),
        "dropped": dropped.astype(f32),
        "dropped_of": jnp.asarray(dropped_of, f32),
    }


def aux_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The aux dict (see the module docstring) from global ``router_sums``."""
    fraction_e = sums["count_e"] / jnp.sum(sums["count_e"])
    mean_prob_e = sums["prob_e"] / sums["tokens"]
    return {
        "lb_loss": fraction_e.shape[0] * jnp.sum(fraction_e * mean_prob_e),
        "z_loss": sums["z"] / sums["tokens"],
        "expert_fraction": fraction_e,
        "dropped_fraction": sums["dropped"] / sums["dropped_of"],
        "router_entropy": sums["entropy"] / sums["tokens"],
    }


def moe_aux_loss(aux: Mapping[str, jax.Array], s: MoESettings) -> jax.Array:
    """The auxiliary training loss of the MoE layers, to add to the task loss.

    ``lb_loss_coef * mean_layers(lb_loss) + z_loss_coef * mean_layers(z_loss)`` where ``aux``
    holds the per-layer raw values, stacked over layers (shape ``(L,)``) or of one layer
    (scalars). Averaging over layers keeps the coefficient's meaning independent of depth; the
    load-balance term is ``lb_loss_coef`` at perfect balance.
    """
    lb = s.lb_loss_coef * jnp.mean(aux["lb_loss"])
    return lb + s.z_loss_coef * jnp.mean(aux["z_loss"])
