"""Router health of the MoE layers: per log row, from the log window's expert loads, and per
run, from the rows of ``metrics.jsonl``.

Letters: ``l`` MoE layers (the order of every ``moe/*`` list), ``e`` experts of a layer.

Per log row (a list over MoE layers in ``metrics.jsonl``; TensorBoard gets one scalar per
layer, ``moe/<name>/layer_<i>``), from the window mean of ``moe/expert_fraction`` ``(l, e)``
(each step's fraction of its ``T * k`` assignments per expert, before capacity drops):

* ``moe/dead_experts``: experts that got no assignment in any step of the log window (a
  fraction is never negative, so its window mean is 0 exactly then);
* ``moe/load_p10``, ``moe/load_p50``, ``moe/load_p90``: percentiles over the layer's experts
  (numpy's linear interpolation) of the relative load ``fraction * E``: 1 for every expert
  at perfect balance, 0 for a dead one;
* ``moe/top_token_share``: ``max_e fraction * k``, the share of the layer's tokens routed to
  its most loaded expert (``k`` = ``model.moe.top_k`` after granularity; a token picks an
  expert at most once, so it is at most 1; ``k / E`` at perfect balance; expert choice is
  balanced by construction);
* ``moe/collapse``: 1.0 while the layer's collapse alarm is on, else 0.0 (absent when
  ``train.collapse_windows = 0``). The alarm turns on when ``top_token_share`` has been above
  ``COLLAPSE_SHARE`` (0.5) for ``train.collapse_windows`` log windows in a row, logging one
  warning for the layer, and off when the share drops back. The counts of windows in a row
  are carried in the checkpoint meta, so a resumed run logs what an uninterrupted one does.

Per run (the report's router-health section and ``runs.csv``, ``summarise_run``): MaxVio
(``moe/max_violation``, Wang et al. 2024) at the end of training (the last log row: mean over
layers, the worst layer, and per layer) and averaged over every training log row, dead
experts at the end summed over layers, whether any layer's collapse alarm was ever on, and
the router logit RMS at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

COLLAPSE_SHARE = 0.5  # a layer whose top expert takes more of its tokens than this is collapsing
PERCENTILES = (10, 50, 90)  # of the relative load: moe/load_p10, load_p50, load_p90


def _top(fraction_le: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the most loaded expert ``(l,)`` int and its share of the tokens ``(l,)``."""
    expert_l = np.argmax(fraction_le, axis=-1)
    return expert_l, np.max(fraction_le, axis=-1) * top_k


def window_health(fraction_le: Sequence | np.ndarray, top_k: int) -> dict[str, list[float]]:
    """``moe/dead_experts``, ``moe/load_p10/p50/p90`` and ``moe/top_token_share``, each a
    list over layers, from the window mean of ``moe/expert_fraction`` ``(l, e)`` and the
    experts per token ``top_k``."""
    frac_le = np.asarray(fraction_le, dtype=np.float64)
    load_le = frac_le * frac_le.shape[-1]
    out = {"moe/dead_experts": np.sum(frac_le == 0.0, axis=-1).astype(np.float64)}
    for q, p_l in zip(PERCENTILES, np.percentile(load_le, PERCENTILES, axis=-1), strict=True):
        out[f"moe/load_p{q}"] = p_l
    out["moe/top_token_share"] = _top(frac_le, top_k)[1]
    return {k: [float(x) for x in v] for k, v in out.items()}


@dataclasses.dataclass
class CollapseAlarm:
    """The collapse alarm of every MoE layer (see the module docstring).

    ``windows``: log windows in a row above ``COLLAPSE_SHARE`` that turn a layer's alarm on
    (``train.collapse_windows``; 0 = off). ``runs``: per layer, the windows in a row so far
    (empty before the first window); the state to carry in the checkpoint meta.
    """

    windows: int
    runs: list[int] = dataclasses.field(default_factory=list)

    def update(self, fraction_le: Sequence | np.ndarray, top_k: int, step: int) -> list[float]:
        """Count the log window ending at ``step`` (window mean of ``moe/expert_fraction``
        ``(l, e)``); returns ``moe/collapse`` ``(l,)`` and logs one warning for each layer
        whose alarm turns on in this window."""
        expert_l, share_l = _top(np.asarray(fraction_le, dtype=np.float64), top_k)
        runs = self.runs or [0] * len(share_l)
        self.runs = [n + 1 if s > COLLAPSE_SHARE else 0 for n, s in zip(runs, share_l, strict=True)]
        if self.windows < 1:  # off
            return [0.0] * len(self.runs)
        for layer, n in enumerate(self.runs):
            if n == self.windows:
                log.warning(
                    "router collapse in MoE layer %d at step %d: expert %d took %.0f%% of the "
                    "layer's tokens for %d log windows in a row; balance the router with "
                    "model.moe.balance=aux (or a larger model.moe.lb_loss_coef) or "
                    "model.moe.balance=loss_free",
                    layer,
                    step,
                    expert_l[layer],
                    100 * share_l[layer],
                    n,
                )
        return [float(n >= self.windows) for n in self.runs]


def health_row(
    fraction_le: Sequence | np.ndarray, top_k: int, alarm: CollapseAlarm, step: int
) -> dict[str, list[float]]:
    """The router-health metrics of the log row at ``step`` (``window_health`` and, unless
    the alarm is off, ``moe/collapse``), updating ``alarm``."""
    out = window_health(fraction_le, top_k)
    if alarm.windows > 0:
        out["moe/collapse"] = alarm.update(fraction_le, top_k, step)
    return out


def _last(rows: list[dict], key: str) -> np.ndarray | None:
    """``key`` of the last row that has it, as an array over layers (None: no row has it)."""
    have = [r[key] for r in rows if key in r]
    return np.asarray(have[-1], dtype=np.float64) if have else None


def summarise_run(rows: list[dict]) -> dict[str, Any]:
    """A run's router health from its ``metrics.jsonl`` rows (every value None where the
    run did not log the metric: dense runs, runs older than it): ``max_violation_final``
    (mean over layers), ``max_violation_final_worst``, ``max_violation_layers_final`` (a list
    over layers), ``max_violation_train_mean`` (the mean over layers averaged over every log
    row), ``dead_experts_final`` (summed over layers), ``collapse_alarm`` (1.0 if any layer's
    alarm was ever on, else 0.0) and ``router_logit_rms_final`` (mean over layers)."""
    vio = _last(rows, "moe/max_violation")
    dead = _last(rows, "moe/dead_experts")
    rms = _last(rows, "moe/router_logit_rms")
    over_training = [np.mean(r["moe/max_violation"]) for r in rows if "moe/max_violation" in r]
    collapse = [np.max(r["moe/collapse"]) for r in rows if "moe/collapse" in r]
    return {
        "max_violation_final": None if vio is None else float(np.mean(vio)),
        "max_violation_final_worst": None if vio is None else float(np.max(vio)),
        "max_violation_layers_final": None if vio is None else vio.tolist(),
        "max_violation_train_mean": float(np.mean(over_training)) if over_training else None,
        "dead_experts_final": None if dead is None else float(np.sum(dead)),
        "collapse_alarm": float(max(collapse) >= 1.0) if collapse else None,
        "router_logit_rms_final": None if rms is None else float(np.mean(rms)),
    }
