"""Optimiser and learning-rate schedule from ``config.train`` (optax).

AdamW with decoupled weight decay applied to matrices (and, by config, to norms, biases
and the embedding), global-norm clipping, and a warmup + cosine / linear / constant
schedule.
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")
NORM_PARAMS = ("scale",)  # RMSNorm / LayerNorm gains
BIAS_PARAMS = ("b1", "b2", "b3", "bias", "router_bias")
EMBED_PARAMS = ("embed", "unembed", "pos_embed")


def make_schedule(t) -> optax.Schedule:
    """Linear warmup from 0 to ``t.lr`` over ``t.warmup_steps``, then the chosen decay to
    ``t.min_lr_ratio * t.lr`` at ``t.steps`` (or constant)."""
    warmup = optax.linear_schedule(0.0, t.lr, max(1, t.warmup_steps))
    decay_steps = max(1, t.steps - t.warmup_steps)
    end = t.lr * t.min_lr_ratio
    if t.schedule == "cosine":
        after = optax.cosine_decay_schedule(t.lr, decay_steps, alpha=t.min_lr_ratio)
    elif t.schedule == "linear":
        after = optax.linear_schedule(t.lr, end, decay_steps)
    elif t.schedule == "constant":
        after = optax.constant_schedule(t.lr)
    else:
        raise ValueError(f"train.schedule={t.schedule!r} is unknown; use one of {SCHEDULES}")
    return optax.join_schedules([warmup, after], [t.warmup_steps])


def _param_name(path) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [str(n) for n in names if n is not None and str(n) != "value"]
    return names[-1] if names else ""


def decay_mask(t, params):
    """Boolean tree: True where weight decay applies."""

    def rule(path, _):
        name = _param_name(path)
        if name in NORM_PARAMS:
            return bool(t.decay_norms)
        if name in BIAS_PARAMS:
            return bool(t.decay_biases)
        if name in EMBED_PARAMS:
            return bool(t.decay_embeddings)
        return True

    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(t) -> optax.GradientTransformation:
    """Clip (if ``t.grad_clip > 0``) then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(
        make_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
        mask=lambda params: decay_mask(t, params),
    )
    if t.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
    return adamw
