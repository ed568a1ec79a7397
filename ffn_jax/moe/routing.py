"""Router math (float32), the auxiliary losses, loss-free balancing and the MoE metrics.

Letters: ``t`` tokens of one group, ``e`` experts, ``k`` choices per token, ``c`` capacity,
``b`` sequences of one group.

Scores. ``topk`` scores tokens with ``softmax(logits)``; ``sigmoid_topk`` (DeepSeek-V3) with
``sigmoid(logits)``, each expert's affinity independent of the others. Both select their
``k`` experts on the logits (the same order as the scores, without float32 ties from
underflow or saturation), or, with loss-free balancing, on ``scores + bias``; the combine
weights are always the chosen experts' *scores*, without the bias.

Balancing (``model.moe.balance``):

* ``aux``: the Switch load-balance loss below, weighted by ``lb_loss_coef`` (the default);
* ``loss_free`` (DeepSeek-V3 auxiliary-loss-free balancing): a per-expert bias ``(E,)``,
  state outside the optimiser, is added to the scores for the top-k *selection* only; after
  each training forward pass it moves by ``rate * sign(mean_load - load_e)`` (``load``: this
  step's global assignments per expert, before capacity drops) and is re-centred to mean
  zero (``loss_free_update``). No load-balance loss is added;
* ``none``: no balancing (no load-balance loss, whatever ``lb_loss_coef`` says).

Aux conventions (every value is *raw*: unweighted, per layer):

* ``lb_loss`` (Switch): ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of the ``T * k``
  routed assignments (before capacity drops) that chose expert ``i`` and ``P_i`` the mean over
  tokens of the router's distribution ``p`` (``topk``: the softmax; ``sigmoid_topk``: the
  sigmoid scores normalised to sum 1 over all experts, as DeepSeek-V3's ``s'``). It is
  **1.0 at perfect balance** for any ``k`` (``E`` at total collapse onto one expert). With
  ``aux_scope="sequence"`` (DeepSeek-V3's complementary sequence-wise loss) ``f_i`` and
  ``P_i`` are taken within each sequence and the per-sequence losses are averaged.
* ``z_loss`` (ST-MoE): mean over tokens of ``logsumexp(logits)^2`` (every router).
* ``expert_fraction`` ``(E,)``: the ``f_i`` above over the whole batch (sums to 1).
* ``max_violation`` (MaxVio, Wang et al. 2024): ``max_i load_i / mean_i load_i - 1`` over
  the batch's assignments before drops: 0 at perfect balance, ``E - 1`` at total collapse.
* ``dropped_fraction``: token choice: dropped assignments / all assignments (0 on the dropless
  path); expert choice: tokens picked by no expert / all tokens.
* ``router_entropy``: mean over tokens of ``-sum_i p_i log p_i`` (``log E`` = uniform).
* ``router_logit_rms``: ``sqrt(mean over tokens and experts of logits^2)`` (router health:
  growing logits saturate the scores).

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


def _chosen(
    scores_te: jax.Array, select_te: jax.Array, k: int, renormalize: bool
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` best experts of each token on ``select_te (t, E)`` and their weights: the
    ``scores_te`` of the chosen, rescaled to sum 1 when ``renormalize`` and ``k >= 2``."""
    _, expert_tk = jax.lax.top_k(select_te, k)
    weight_tk = jnp.take_along_axis(scores_te, expert_tk, axis=-1)
    if renormalize and k > 1:
        weight_tk = weight_tk / jnp.sum(weight_tk, axis=-1, keepdims=True)
    return expert_tk.astype(jnp.int32), weight_tk


def top_k_route(
    probs_te: jax.Array,
    k: int,
    renormalize: bool,
    logits_te: jax.Array | None = None,
    bias_e: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax token choice: ``(expert_tk int32, weight_tk float32)`` of shape ``(t, k)``,
    best first.

    The experts are selected on ``probs_te + bias_e`` when the loss-free balance bias
    ``bias_e (E,)`` (or a forced selection's ``(t, E)`` offset) is given, else on
    ``logits_te (t, E)`` when given (softmax keeps their order and they do not underflow,
    so probabilities that round to the same float32 value, 0 included, cannot pick the
    wrong experts), else on ``probs_te (t, E)``. The weight is
    the chosen experts' pre-selection router probability (never the bias), so with ``k = 1``
    (Switch) the router still gets a gradient from the task loss; for ``k >= 2``
    ``renormalize`` rescales the selected weights to sum to 1.
    """
    if bias_e is not None:
        select_te = probs_te + bias_e
    else:
        select_te = probs_te if logits_te is None else logits_te
    return _chosen(probs_te, select_te, k, renormalize)


def sigmoid_scores(logits_te: jax.Array) -> jax.Array:
    """DeepSeek-V3 affinities ``sigmoid(logits) (t, E)``, float32."""
    return jax.nn.sigmoid(logits_te.astype(jnp.float32))


def sigmoid_probs(logits_te: jax.Array) -> jax.Array:
    """The sigmoid router's distribution for the aux statistics: ``sigmoid(logits)``
    normalised to sum 1 over all experts ``(t, E)`` (DeepSeek-V3's ``s'``)."""
    s_te = sigmoid_scores(logits_te)
    return s_te / jnp.sum(s_te, axis=-1, keepdims=True)


def sigmoid_top_k_route(
    logits_te: jax.Array, k: int, renormalize: bool, bias_e: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Sigmoid token choice (DeepSeek-V3): ``(expert_tk int32, weight_tk float32) (t, k)``.

    Scores ``s = sigmoid(logits_te (t, E))``; the experts are selected on ``s + bias_e``
    with the loss-free bias ``(E,)`` (or a forced selection's ``(t, E)`` offset), else on
    the logits (the order of ``s``, without ties where ``s`` saturates to 1.0); the weights
    are the chosen ``s`` (never the bias), normalised to sum 1 over the chosen experts when
    ``renormalize`` and ``k >= 2``. (At ``k = 1`` normalising would make every weight 1 and
    leave the router no task gradient, so the raw score is kept, as ``top_k_route`` does.)
    """
    s_te = sigmoid_scores(logits_te)
    select_te = logits_te if bias_e is None else s_te + bias_e
    return _chosen(s_te, select_te, k, renormalize)


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


def forced_selection(
    mode: str, tokens: int, num_experts: int, k: int, key: jax.Array | None = None
) -> jax.Array:
    """A selection offset ``(tokens, E)`` float32 that forces the top-k choice of the
    debugging routing ``mode`` (``model.moe.routing``), used like the loss-free bias: the
    experts are picked on ``scores + offset``, the weights stay the scores.

    Rows of the offset are ``2 * rank`` with integer ranks: gaps of 2 exceed the scores'
    range (softmax and sigmoid scores lie in [0, 1]), so the ranks alone decide.

    * ``balanced``: token ``i`` ranks expert ``(i*k + j) mod E`` highest for ``j = 0..k-1``,
      so over ``tokens`` tokens every expert gets ``k * tokens / E`` when that divides.
    * ``random``: a uniformly random ranking of the experts per token, drawn from ``key``
      (a typed PRNG key): ``k`` distinct experts uniformly at random.
    """
    if mode == "balanced":
        token_t1 = jnp.arange(tokens, dtype=jnp.int32)[:, None]
        expert_1e = jnp.arange(num_experts, dtype=jnp.int32)[None, :]
        distance_te = (expert_1e - token_t1 * k) % num_experts  # 0 for the first choice
        return -2.0 * distance_te.astype(jnp.float32)
    if mode == "random":
        assert key is not None, "random routing needs a key"
        rank_te = jnp.argsort(jax.random.uniform(key, (tokens, num_experts)), axis=-1)
        return 2.0 * rank_te.astype(jnp.float32)
    raise ValueError(f"model.moe.routing={mode!r} has no forced selection")


def loss_free_update(bias_e: jax.Array, load_e: jax.Array, rate: float) -> jax.Array:
    """One loss-free balancing step (DeepSeek-V3): ``bias_e (E,)`` moved by
    ``rate * sign(mean(load) - load_e)`` (overloaded experts down, underloaded up, balanced
    ones unchanged) and re-centred to mean zero, so the bias never drifts as a whole.

    ``load_e (E,)``: this step's global assignments per expert (counts; any positive scale
    gives the same signs). No gradient flows through it."""
    load_e = jax.lax.stop_gradient(load_e.astype(jnp.float32))
    moved_e = bias_e + rate * jnp.sign(jnp.mean(load_e) - load_e)
    return moved_e - jnp.mean(moved_e)


def sequence_counts(
    expert_a: jax.Array, token_a: jax.Array, sequences: int, length: int, num_experts: int
) -> jax.Array:
    """Assignments per sequence and expert ``(b, E)`` float32 from flat ``(expert, token)``
    assignments (token ids batch-major over ``sequences * length`` tokens)."""
    count_be = jnp.zeros((sequences, num_experts), jnp.float32)
    return count_be.at[token_a // length, expert_a].add(1.0)


def router_sums(
    logits_te: jax.Array,
    probs_te: jax.Array,
    count_e: jax.Array,
    dropped: jax.Array,
    dropped_of: int,
    count_be: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-group sums behind the aux values (to be ``psum``-ed over the batch axes).

    ``probs_te``: the router's distribution (softmax, or normalised sigmoid scores);
    ``count_e``: assignments per expert before drops; ``dropped`` out of ``dropped_of``.
    ``count_be (b, E)`` (sequence scope): the assignments of each of the group's ``b``
    sequences (rows of ``probs_te`` batch-major), adding the per-sequence loss sum.
    """
    lse_t = jax.nn.logsumexp(logits_te, axis=-1)
    entropy_t = -jnp.sum(probs_te * jnp.log(jnp.maximum(probs_te, 1e-30)), axis=-1)
    f32 = jnp.float32
    sums = {
        "tokens": jnp.asarray(probs_te.shape[0], f32),
        "count_e": count_e.astype(f32),
        "prob_e": jnp.sum(probs_te, axis=0),
        "z": jnp.sum(jnp.square(lse_t)),
        "entropy": jnp.sum(entropy_t),
        "logit_sq": jnp.sum(jnp.square(logits_te)),
        "dropped": dropped.astype(f32),
        "dropped_of": jnp.asarray(dropped_of, f32),
    }
    if count_be is not None:
        b, e = count_be.shape
        frac_be = count_be / jnp.maximum(jnp.sum(count_be, axis=-1, keepdims=True), 1.0)
        mean_prob_be = jnp.mean(probs_te.reshape(b, -1, e), axis=1)
        sums["seq_lb"] = e * jnp.sum(frac_be * mean_prob_be)  # summed over sequences
        sums["sequences"] = jnp.asarray(b, f32)
    return sums


def aux_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The aux dict (see the module docstring) from global ``router_sums``."""
    count_e = sums["count_e"]
    fraction_e = count_e / jnp.sum(count_e)
    mean_prob_e = sums["prob_e"] / sums["tokens"]
    num_e = fraction_e.shape[0]
    if "seq_lb" in sums:
        lb = sums["seq_lb"] / sums["sequences"]
    else:
        lb = num_e * jnp.sum(fraction_e * mean_prob_e)
    return {
        "lb_loss": lb,
        "z_loss": sums["z"] / sums["tokens"],
        "expert_fraction": fraction_e,
        "max_violation": jnp.max(count_e) / jnp.mean(count_e) - 1.0,
        "dropped_fraction": sums["dropped"] / sums["dropped_of"],
        "router_entropy": sums["entropy"] / sums["tokens"],
        "router_logit_rms": jnp.sqrt(sums["logit_sq"] / (sums["tokens"] * num_e)),
    }


def moe_aux_loss(aux: Mapping[str, jax.Array], s: MoESettings) -> jax.Array:
    """The auxiliary training loss of the MoE layers, to add to the task loss.

    ``lb_loss_coef * mean_layers(lb_loss) + z_loss_coef * mean_layers(z_loss)`` where ``aux``
    holds the per-layer raw values, stacked over layers (shape ``(L,)``) or of one layer
    (scalars). Averaging over layers keeps the coefficient's meaning independent of depth; the
    load-balance term is ``lb_loss_coef`` at perfect balance. The load-balance term is added
    only under ``balance="aux"`` (``loss_free`` balances with its bias, ``none`` not at all);
    ``lb_loss`` is still reported in every mode.
    """
    z = s.z_loss_coef * jnp.mean(aux["z_loss"])
    if s.balance != "aux":
        return z
    return s.lb_loss_coef * jnp.mean(aux["lb_loss"]) + z
