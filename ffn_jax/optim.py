"""Optimiser and learning-rate schedule from the train spec (optax).

AdamW with decoupled weight decay applied to matrices (and, by config, to norms, biases
and the embedding), global-norm clipping, and a warmup + cosine / linear / constant
schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import optax

if TYPE_CHECKING:
    from ffn_jax.spec import TrainSpec

NORM_PARAMS = ("scale",)  # RMSNorm / LayerNorm gains
BIAS_PARAMS = ("b1", "b2", "b3", "bias", "router_bias")
EMBED_PARAMS = ("embed", "unembed", "pos_embed")


def _cosine(t: TrainSpec, steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(t.lr, steps, alpha=t.min_lr_ratio)


def _linear(t: TrainSpec, steps: int) -> optax.Schedule:
    return optax.linear_schedule(t.lr, t.lr * t.min_lr_ratio, steps)


def _constant(t: TrainSpec, steps: int) -> optax.Schedule:
    del steps
    return optax.constant_schedule(t.lr)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One learning-rate schedule after the warmup: ``build(train_spec, decay_steps)`` and
    the ``train.*`` fields it reads besides ``lr`` (so a reader knows what matters)."""

    name: str
    build: Callable[[TrainSpec, int], optax.Schedule]
    fields: tuple[str, ...]
    description: str


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("cosine", _cosine, ("min_lr_ratio",), "cosine decay to min_lr_ratio * lr"),
        Schedule("linear", _linear, ("min_lr_ratio",), "linear decay to min_lr_ratio * lr"),
        Schedule("constant", _constant, (), "lr after the warmup"),
    )
}


def make_schedule(t: TrainSpec) -> optax.Schedule:
    """Linear warmup from 0 to ``t.lr`` over ``t.warmup_steps``, then the schedule
    ``t.schedule`` of ``SCHEDULES`` over the remaining steps."""
    warmup = optax.linear_schedule(0.0, t.lr, max(1, t.warmup_steps))
    after = SCHEDULES[t.schedule].build(t, max(1, t.steps - t.warmup_steps))
    return optax.join_schedules([warmup, after], [t.warmup_steps])


def _param_name(path) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [str(n) for n in names if n is not None and str(n) != "value"]
    return names[-1] if names else ""


def decay_mask(t: TrainSpec, params):
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


def make_optimizer(t: TrainSpec) -> optax.GradientTransformation:
    """Clip (if ``t.grad_clip > 0``) then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(
        make_schedule(t),
        b1=t.b1,
        b2=t.b2,
        eps=t.eps,
        weight_decay=t.weight_decay,
        mask=lambda params: decay_mask(t, params),
    )
    if t.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
    return adamw
