"""Optimiser and learning-rate schedule from the train spec (optax).

AdamW with decoupled weight decay applied to matrices (and, by config, to norms, biases
and the embedding), global-norm clipping, and a warmup + cosine / linear / constant
schedule.

The peak learning rate is a *traced* hyperparameter (``optax.inject_hyperparams``): it lives
in the optimiser state (``opt_state.hyperparams["learning_rate"]``) and multiplies a schedule
of peak 1, so runs that differ only in ``train.lr`` (an LR sweep) share one compiled step.
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
    return optax.cosine_decay_schedule(1.0, steps, alpha=t.min_lr_ratio)


def _linear(t: TrainSpec, steps: int) -> optax.Schedule:
    return optax.linear_schedule(1.0, t.min_lr_ratio, steps)


def _constant(t: TrainSpec, steps: int) -> optax.Schedule:
    del t, steps
    return optax.constant_schedule(1.0)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One learning-rate schedule after the warmup, *relative to the peak* (it starts at 1):
    ``build(train_spec, decay_steps)`` and the ``train.*`` fields it reads (so a reader knows
    what matters)."""

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


def relative_schedule(t: TrainSpec) -> optax.Schedule:
    """The schedule's shape, peak 1: linear warmup from 0 over ``t.warmup_steps``, then
    ``t.schedule`` of ``SCHEDULES`` over the remaining steps (independent of ``t.lr``)."""
    warmup = optax.linear_schedule(0.0, 1.0, max(1, t.warmup_steps))
    after = SCHEDULES[t.schedule].build(t, max(1, t.steps - t.warmup_steps))
    return optax.join_schedules([warmup, after], [t.warmup_steps])


def make_schedule(t: TrainSpec) -> optax.Schedule:
    """The learning rate at each step: ``t.lr`` times ``relative_schedule(t)``."""
    shape = relative_schedule(t)
    return lambda count: t.lr * shape(count)


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
    """Clip (if ``t.grad_clip > 0``) then AdamW with the schedule and the decay mask; the
    peak learning rate ``t.lr`` is injected into the state (see the module docstring)."""
    shape = relative_schedule(t)

    def build(learning_rate) -> optax.GradientTransformation:
        adamw = optax.adamw(
            lambda count: learning_rate * shape(count),
            b1=t.b1,
            b2=t.b2,
            eps=t.eps,
            weight_decay=t.weight_decay,
            mask=lambda params: decay_mask(t, params),
        )
        if t.grad_clip > 0:
            return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
        return adamw

    return optax.inject_hyperparams(build)(learning_rate=t.lr)
