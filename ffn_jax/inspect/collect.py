"""Collecting what the report shows: FFN hidden activations streamed into per-neuron top
contexts, promoted tokens of the neurons' values, and router assignments per expert and
token id (see ``ffn_jax.inspect`` for the definitions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ffn_jax.model import LM
from ffn_jax.moe import MoEFFN

if TYPE_CHECKING:
    from ffn_jax.spec import ModelSpec

PROMOTED_TOKENS = 8  # promoted tokens listed per neuron

Decode = Callable[[np.ndarray], str]


@dataclasses.dataclass(frozen=True)
class Context:
    """One activating position: window, position in it, activation, decoded text pieces."""

    window: int
    position: int
    activation: float
    left: str
    token: str
    right: str


@dataclasses.dataclass(frozen=True)
class Neuron:
    """A hidden unit of one layer: its top contexts and promoted ``(token id, logit)``."""

    layer: int
    index: int
    max_activation: float
    contexts: list[Context]
    promoted: list[tuple[int, float]]


@dataclasses.dataclass(frozen=True)
class ExpertTokens:
    """Router assignments of one MoE layer: ``counts (E, v)`` per expert and token id, token
    ``occurrences (v,)`` among the inspected tokens, and ``routed`` assignments in all."""

    layer: int
    counts: np.ndarray
    occurrences: np.ndarray
    routed: int


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What ``inspect_run`` found: neurons per dense layer and expert tokens per MoE layer."""

    step: int
    tokens: int
    neurons: dict[int, list[Neuron]]
    experts: dict[int, ExpertTokens]


# ---- checking the request ------------------------------------------------------------


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``"0,2"`` -> ``[0, 2]``; ``""`` -> every layer. ValueError naming ``--layers``."""
    if not text.strip():
        return list(range(n_layers))
    try:
        layers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(
            f"--layers={text!r} is not a comma-separated list of layer indices; e.g. --layers=0,1"
        ) from None
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(
            f"--layers={text!r}: layer {bad[0]} is out of range; the run has "
            f"model.n_layers={n_layers}, so use indices 0..{n_layers - 1}"
        )
    return sorted(set(layers))


def check_request(
    m: ModelSpec, layers: list[int], neurons: int, contexts: int, windows: int, experts: bool | None
) -> None:
    """ValueError (one line: flag, value, fix) for a request the run cannot answer."""
    d_ff = m.d_ff
    if not 0 <= neurons <= d_ff:
        raise ValueError(
            f"--neurons={neurons} must be in [0, d_ff={d_ff}] (the FFN width of "
            f"this run); use at most --neurons={d_ff}"
        )
    if contexts < 1:
        raise ValueError(f"--contexts={contexts} must be >= 1")
    if windows < 1:
        raise ValueError(f"--windows={windows} must be >= 1")
    if experts and m.moe is None:
        raise ValueError(
            "--experts: this run is dense (model.moe.num_experts=0); expert "
            "specialisation needs an MoE run, so drop --experts"
        )
    if experts and m.moe is not None and not any(m.is_moe_layer(i) for i in layers):
        raise ValueError(
            f"--experts: none of --layers={layers} is an MoE layer (every "
            f"model.moe.every={m.moe.every}-th); choose one of them"
        )


# ---- running the model ---------------------------------------------------------------


def first_windows(tokens: np.ndarray, seq_len: int, windows: int) -> np.ndarray:
    """The first ``windows`` complete, non-overlapping windows of a split: int32 ``(W, T)``
    (fewer if the split is shorter)."""
    n = min(windows, len(tokens) // seq_len)
    return np.asarray(tokens[: n * seq_len], np.int32).reshape(n, seq_len)


def trace(
    model: LM, tokens_bt: jax.Array, hidden_layers: frozenset[int], route_layers: frozenset[int]
) -> tuple[jax.Array, dict, dict]:
    """The model's own forward pass with its FFNs captured (``LM.capture``): returns
    ``(logits (b, t, v), hidden, routes)``, ``hidden[layer]`` the FFN hidden activations
    ``(b, t, f)`` of each of ``hidden_layers`` and ``routes[layer]`` the router's flat
    ``(expert_a, token_a)`` int32 assignments (tokens indexed over ``b * t``) of each of
    ``route_layers``."""
    n = len(model.layers.blocks)  # blocks per stacked group
    model.capture(True)
    try:
        logits, aux = model(tokens_bt)
    finally:
        model.capture(False)
    hidden = {i: aux[f"capture/{i % n}/hidden"][i // n] for i in hidden_layers}
    routes = {
        i: (aux[f"capture/{i % n}/expert"][i // n], aux[f"capture/{i % n}/token"][i // n])
        for i in route_layers
    }
    return logits, hidden, routes


def merge_top(
    vals_fc: np.ndarray, idx_fc: np.ndarray, new_vals: np.ndarray, new_idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` largest of two ``(f, c)`` candidate sets (ties: earlier first)."""
    vals = np.concatenate([vals_fc, new_vals], axis=1)
    idx = np.concatenate([idx_fc, new_idx], axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1)


@dataclasses.dataclass
class Scanned:
    """What ``scan_windows`` collects: per hidden layer the top activations ``(f, c)`` of every
    neuron and their flat token indices; per routed layer the counts ``(E, vocab)``."""

    top: dict[int, tuple[np.ndarray, np.ndarray]]
    counts: dict[int, np.ndarray]


def scan_windows(
    model: LM,
    windows_wt: np.ndarray,
    hidden_layers: list[int],
    route_layers: list[int],
    *,
    contexts: int,
    vocab: int,
    batch: int = 8,
) -> Scanned:
    """Stream the windows through ``trace``, ``batch`` at a time: per hidden layer the top
    ``contexts`` activations of every neuron ``(f, c)`` with flat token indices, per routed
    layer the assignment counts ``(E, vocab)``."""
    graphdef, state = nnx.split(model)
    hl, rl = frozenset(hidden_layers), frozenset(route_layers)

    @jax.jit
    def step(state, tokens_bt):
        _, hidden, routes = trace(nnx.merge(graphdef, state), tokens_bt, hl, rl)
        k = min(contexts, tokens_bt.size)
        top = {
            i: jax.lax.top_k(h.reshape(-1, h.shape[-1]).astype(jnp.float32).T, k)
            for i, h in hidden.items()
        }
        return top, routes

    run = Scanned(top={}, counts={})
    last = model.layers.blocks[-1].ffn
    num_e = last.settings.num_experts if route_layers and isinstance(last, MoEFFN) else 0
    for start in range(0, len(windows_wt), batch):
        chunk = windows_wt[start : start + batch]
        top, routes = jax.device_get(step(state, jnp.asarray(chunk)))
        offset = start * windows_wt.shape[1]
        for i, (vals, idx) in top.items():
            idx = idx.astype(np.int64) + offset
            run.top[i] = (
                merge_top(*run.top[i], vals, idx, contexts) if i in run.top else (vals, idx)
            )
        flat = chunk.reshape(-1)
        for i, (expert_a, token_a) in routes.items():
            counts = run.counts.setdefault(i, np.zeros((num_e, vocab), np.int64))
            np.add.at(counts, (expert_a, flat[token_a]), 1)
    return run


# ---- from activations to neurons -----------------------------------------------------


def block_param(model: LM, layer: int, name: str) -> np.ndarray:
    """FFN parameter ``name`` of block ``layer`` (unstacked from its group)."""
    n = len(model.layers.blocks)  # blocks per stacked group
    stacked = getattr(model.layers.blocks[layer % n].ffn, name)[...]
    return np.asarray(stacked[layer // n])


def promoted_tokens(
    model: LM, layer: int, neuron: int, top: int, vocab: int
) -> list[tuple[int, float]]:
    """The ``top`` token ids (< ``vocab``: padding ids excluded) with the largest
    ``w2[neuron] @ E`` and their values (see the module docstring)."""
    w2_d = block_param(model, layer, "w2")[neuron]
    scores_v = (w2_d @ np.asarray(model.output_embedding()))[:vocab]
    ids = np.argsort(-scores_v, kind="stable")[:top]
    return [(int(i), float(scores_v[i])) for i in ids]


def context(
    windows_wt: np.ndarray, flat: int, activation: float, width: int, decode: Decode
) -> Context:
    """The window text around flat token index ``flat``, ``width`` tokens either side."""
    w, p = divmod(int(flat), windows_wt.shape[1])
    row = windows_wt[w]
    return Context(
        w,
        p,
        float(activation),
        decode(row[max(0, p - width) : p]),
        decode(row[p : p + 1]),
        decode(row[p + 1 : p + 1 + width]),
    )


def top_neurons(
    model: LM,
    layer: int,
    top: tuple[np.ndarray, np.ndarray],
    windows_wt: np.ndarray,
    *,
    neurons: int,
    width: int,
    vocab: int,
    decode: Decode,
) -> list[Neuron]:
    """The ``neurons`` units of ``layer`` with the highest maximum activation, best first."""
    vals_fc, idx_fc = top
    order = np.argsort(-vals_fc[:, 0], kind="stable")[:neurons]
    return [
        Neuron(
            layer,
            int(i),
            float(vals_fc[i, 0]),
            [
                context(windows_wt, j, v, width, decode)
                for v, j in zip(vals_fc[i], idx_fc[i], strict=True)
            ],
            promoted_tokens(model, layer, int(i), PROMOTED_TOKENS, vocab),
        )
        for i in order
    ]
