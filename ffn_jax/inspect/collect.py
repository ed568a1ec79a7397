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

PROMOTED_TOKENS = 8  # promoted (and suppressed) tokens listed per neuron
COUNT_CHUNK = 1 << 24  # training-split tokens counted per pass (bounded memory)

Decode = Callable[[np.ndarray], str]


@dataclasses.dataclass(frozen=True)
class Context:
    """One activating position: window, position in it, ``offset`` (the trigger's token index
    in the split), the signed activation and the decoded text pieces."""

    window: int
    position: int
    offset: int
    activation: float
    left: str
    token: str
    right: str

    @property
    def sign(self) -> str:
        """``"+"`` or ``"-"``: the activation's sign (gated units fire both ways)."""
        return "-" if self.activation < 0 else "+"


@dataclasses.dataclass(frozen=True)
class Neuron:
    """A hidden unit of one layer: ``peak`` (its activation of largest magnitude, signed), its
    top contexts by ``|activation|``, and the ``(token id, logit)`` its value promotes and
    suppresses (see ``value_logits`` and ``value_tokens``)."""

    layer: int
    index: int
    peak: float
    contexts: list[Context]
    promoted: list[tuple[int, float]]
    suppressed: list[tuple[int, float]]


@dataclasses.dataclass(frozen=True)
class ExpertTokens:
    """Router assignments of one MoE layer: ``counts (E, v)`` per expert and token id, token
    ``occurrences (v,)`` among the inspected tokens, and ``routed`` assignments in all."""

    layer: int
    counts: np.ndarray
    occurrences: np.ndarray
    routed: int


@dataclasses.dataclass(frozen=True)
class Windows:
    """Windows sampled from a split: ``tokens_wt`` int32 ``(W, T)``, their first tokens'
    indices in the split ``starts_w (W,)``, and ``split_tokens``, the split's length."""

    tokens_wt: np.ndarray
    starts_w: np.ndarray
    split_tokens: int

    @property
    def size(self) -> int:
        """Tokens scanned: ``W * T``."""
        return self.tokens_wt.size


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What ``inspect_run`` found: the scanned validation ``windows``, neurons per dense layer,
    expert tokens per MoE layer, ``seen`` (token ids occurring in the training split, the
    candidates for promoted tokens) and whether the value logits are ``centred``."""

    step: int
    windows: Windows
    neurons: dict[int, list[Neuron]]
    experts: dict[int, ExpertTokens]
    seen: int
    vocab: int
    centred: bool

    @property
    def tokens(self) -> int:
        """Validation tokens scanned."""
        return self.windows.size


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


# ---- choosing the tokens ------------------------------------------------------------


def spread_windows(tokens: np.ndarray, seq_len: int, windows: int) -> Windows:
    """``windows`` windows of ``seq_len`` tokens evenly spaced over the whole split, the first
    at its start and the last at its end (fewer when the split holds fewer complete windows;
    they never overlap). ValueError when the split is shorter than one window."""
    n = len(tokens)
    count = min(windows, n // seq_len)
    if count < 1:
        raise ValueError(
            f"the validation split has {n} tokens, fewer than one window of "
            f"data.seq_len={seq_len}; inspect a run whose data has a longer validation split"
        )
    # Integer spacing >= seq_len whenever count <= n // seq_len: the windows are disjoint.
    starts_w = np.arange(count, dtype=np.int64) * (n - seq_len) // max(count - 1, 1)
    tokens_wt = np.stack([np.asarray(tokens[s : s + seq_len], np.int32) for s in starts_w])
    return Windows(tokens_wt, starts_w, n)


def seen_tokens(tokens: np.ndarray, vocab: int) -> np.ndarray:
    """Which of the ``vocab`` token ids occur in ``tokens`` (a split): bool ``(vocab,)``,
    counted ``COUNT_CHUNK`` tokens at a time so a memmapped split is never copied whole."""
    counts_v = np.zeros(vocab, np.int64)
    for s in range(0, len(tokens), COUNT_CHUNK):
        counts_v += np.bincount(np.asarray(tokens[s : s + COUNT_CHUNK]), minlength=vocab)[:vocab]
    return counts_v > 0


# ---- running the model ---------------------------------------------------------------


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
    """Per row, the ``k`` largest in magnitude of two ``(f, c)`` sets of signed activations
    (ties: earlier first)."""
    vals = np.concatenate([vals_fc, new_vals], axis=1)
    idx = np.concatenate([idx_fc, new_idx], axis=1)
    order = np.argsort(-np.abs(vals), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1)


@dataclasses.dataclass
class Scanned:
    """What ``scan_windows`` collects: per hidden layer the signed activations ``(f, c)`` of
    largest magnitude of every neuron and their flat token indices into the windows; per
    routed layer the counts ``(E, vocab)``."""

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
    """Stream the windows through ``trace``, ``batch`` at a time: per hidden layer the
    ``contexts`` activations of largest ``|a|`` of every neuron, signed, ``(f, c)`` with flat
    token indices (gated units are sign-symmetric: a large negative activation writes
    ``-w2[i]`` just as strongly), per routed layer the assignment counts ``(E, vocab)``."""
    graphdef, state = nnx.split(model)
    hl, rl = frozenset(hidden_layers), frozenset(route_layers)

    @jax.jit
    def step(state, tokens_bt):
        _, hidden, routes = trace(nnx.merge(graphdef, state), tokens_bt, hl, rl)
        k = min(contexts, tokens_bt.size)
        top = {}
        for i, h in hidden.items():
            a_fn = h.reshape(-1, h.shape[-1]).astype(jnp.float32).T
            _, idx_fk = jax.lax.top_k(jnp.abs(a_fn), k)
            top[i] = (jnp.take_along_axis(a_fn, idx_fk, 1), idx_fk)
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


def block_param(model: LM, layer: int, module: str, name: str) -> np.ndarray:
    """Parameter ``name`` of sub-module ``module`` (``"ffn"``, ``"norm1"``, ...) of block
    ``layer``, unstacked from its group."""
    n = len(model.layers.blocks)  # blocks per stacked group
    stacked = getattr(getattr(model.layers.blocks[layer % n], module), name)[...]
    return np.asarray(stacked[layer // n])


def residual_norms(model: LM, layer: int) -> list[tuple[np.ndarray, bool]]:
    """The norms that the FFN output of ``layer`` passes through on its direct path to the
    logits, in order, each as ``(scale (d,), centres)`` (``centres``: a LayerNorm, which
    subtracts the mean over ``d``). Pre-norm: the final norm. Post-norm (no final norm): the
    block's own ``norm2`` and ``norm1``, ``norm2`` of every later block, the last of them
    the model's effective final norm."""
    if model.final_norm is not None:
        return [(np.asarray(model.final_norm.scale[...]), model.final_norm.kind == "layer")]
    n = len(model.layers.blocks)
    later = range(layer + 1, n * model.n_groups)
    path = [(layer, "norm2")] + [(i, f"norm{j}") for i in later for j in (1, 2)]
    return [
        (
            block_param(model, i, name, "scale"),
            getattr(model.layers.blocks[i % n], name).kind == "layer",
        )
        for i, name in path
    ]


def value_logits(model: LM, layer: int, neurons: np.ndarray) -> np.ndarray:
    """The direct logit contribution of each neuron's value per unit of activation:
    ``fold(w2[i]) @ E``, ``(len(neurons), v)`` over the padded vocabulary. ``fold`` applies
    the learned per-dimension part of the norms between the FFN and the logits
    (``residual_norms``: the scale, and a LayerNorm's mean subtraction, both linear); the
    norm's division by the token's RMS and its bias depend on the token or not on the neuron
    and are left out. ``E (d, v)`` is the model's output projection (``LM.output_embedding``:
    the embedding transposed when tied)."""
    v_nd = block_param(model, layer, "ffn", "w2")[np.asarray(neurons)].astype(np.float32)
    for scale_d, centres in residual_norms(model, layer):
        if centres:
            v_nd = v_nd - v_nd.mean(-1, keepdims=True)
        v_nd = v_nd * scale_d
    return v_nd @ np.asarray(model.output_embedding(), np.float32)


def value_tokens(
    logits_v: np.ndarray, seen_v: np.ndarray, top: int, centre: bool = True
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(promoted, suppressed)``: the ``top`` token ids with the largest and with the
    smallest logit in ``logits_v`` among the ids with ``seen_v`` (bool over the tokenizer's
    ids; padding ids and ids never seen in training are never listed) and their logits,
    minus the mean logit over the seen ids when ``centre``."""
    ids = np.flatnonzero(seen_v[: len(logits_v)])
    scores = logits_v[ids].astype(np.float64)
    if centre and len(ids):
        scores = scores - scores.mean()
    up = np.argsort(-scores, kind="stable")[:top]
    down = np.argsort(scores, kind="stable")[:top]
    return (
        [(int(ids[j]), float(scores[j])) for j in up],
        [(int(ids[j]), float(scores[j])) for j in down],
    )


def context(windows: Windows, flat: int, activation: float, width: int, decode: Decode) -> Context:
    """The window text around flat token index ``flat``, ``width`` tokens either side."""
    w, p = divmod(int(flat), windows.tokens_wt.shape[1])
    row = windows.tokens_wt[w]
    return Context(
        w,
        p,
        int(windows.starts_w[w]) + p,
        float(activation),
        decode(row[max(0, p - width) : p]),
        decode(row[p : p + 1]),
        decode(row[p + 1 : p + 1 + width]),
    )


def top_neurons(
    model: LM,
    layer: int,
    top: tuple[np.ndarray, np.ndarray],
    windows: Windows,
    *,
    neurons: int,
    width: int,
    seen: np.ndarray,
    decode: Decode,
    centre: bool = True,
) -> list[Neuron]:
    """The ``neurons`` units of ``layer`` with the largest ``|activation|``, best first, each
    with its contexts and value tokens (``value_tokens`` over the ``seen`` ids)."""
    vals_fc, idx_fc = top
    order = np.argsort(-np.abs(vals_fc[:, 0]), kind="stable")[:neurons]
    if not len(order):
        return []
    logits_nv = value_logits(model, layer, order)
    found = []
    for i, logits_v in zip(order, logits_nv, strict=True):
        promoted, suppressed = value_tokens(logits_v, seen, PROMOTED_TOKENS, centre)
        contexts = [
            context(windows, j, v, width, decode)
            for v, j in zip(vals_fc[i], idx_fc[i], strict=True)
        ]
        found.append(Neuron(layer, int(i), float(vals_fc[i, 0]), contexts, promoted, suppressed))
    return found
