"""Writing the inspection as ``inspect.md`` (markdown) and the expert-load heatmap PNG."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from etils import epath

from ffn_jax.files import PathLike, write_figure, write_text_atomic
from ffn_jax.inspect.collect import Context, Decode, ExpertTokens, Inspection, Neuron

if TYPE_CHECKING:
    from ffn_jax.spec import RunSpec

REPORT = "inspect.md"
HEATMAP = "inspect_expert_load.png"
MIN_OCCURRENCES = 5  # a token must occur this often to be ranked by share
TOP_TOKENS = 8  # tokens listed per expert


def escape(text: str, cell: bool = False) -> str:
    """Control characters as ``\\n``-style escapes (and ``|`` for a table cell)."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    text = text.replace("\t", "\\t")
    return text.replace("|", "\\|") if cell else text


def code(text: str, cell: bool = False) -> str:
    """``text`` escaped as an inline code span (spaces kept visible at the edges)."""
    return f"`` {escape(text, cell)} ``"


def context_line(c: Context) -> str:
    """One context: signed activation, place and the text with the trigger marked
    ``[[tok]]``."""
    return (
        f"- {c.activation:+.3f} (validation token {c.offset:,}: window {c.window}, "
        f"position {c.position}): {code(f'{c.left}[[{c.token}]]{c.right}')}"
    )


def token_list(tokens: list[tuple[int, float]], decode: Decode) -> str:
    """``tok +0.12, tok -0.03, ...`` for ``(token id, logit)`` pairs."""
    return ", ".join(f"{code(decode(np.array([i])))} {v:+.2f}" for i, v in tokens)


def neuron_section(n: Neuron, decode: Decode) -> list[str]:
    """Markdown lines for one neuron: its top contexts and promoted / suppressed tokens."""
    negative = sum(c.activation < 0 for c in n.contexts)
    return [
        f"#### Layer {n.layer}, neuron {n.index} (peak activation {n.peak:+.3f}; "
        f"{negative} of {len(n.contexts)} top contexts negative)",
        "",
        *map(context_line, n.contexts),
        "",
        f"Promotes: {token_list(n.promoted, decode)}",
        "",
        f"Suppresses: {token_list(n.suppressed, decode)}",
        "",
    ]


def expert_rows(e: ExpertTokens, decode: Decode) -> list[str]:
    """Table rows (one per expert): load, top tokens by count and by share."""
    load_e = e.counts.sum(1) / max(e.routed, 1)
    seen = e.occurrences >= MIN_OCCURRENCES
    share_ev = np.where(seen, e.counts / np.maximum(e.occurrences, 1), 0.0)
    rows = []
    for x, counts_v in enumerate(e.counts):
        by_count = [i for i in np.argsort(-counts_v, kind="stable")[:TOP_TOKENS] if counts_v[i]]
        by_share = [
            i for i in np.lexsort((-counts_v, -share_ev[x]))[:TOP_TOKENS] if share_ev[x, i] > 0
        ]  # ties in share: the more frequent token first
        count_cell = ", ".join(
            f"{code(decode(np.array([i])), True)} {counts_v[i]}" for i in by_count
        )
        share_cell = ", ".join(
            f"{code(decode(np.array([i])), True)} {share_ev[x, i]:.0%} of {e.occurrences[i]}"
            for i in by_share
        )
        rows.append(f"| {x} | {load_e[x]:.1%} | {count_cell} | {share_cell} |")
    return rows


def expert_section(e: ExpertTokens, decode: Decode) -> list[str]:
    """Markdown lines for one MoE layer's expert table."""
    return [
        f"### Layer {e.layer}",
        "",
        f"{e.routed:,} routed assignments.",
        "",
        "| expert | load | most received (count) | most specialised (share of the "
        f"token's occurrences, >= {MIN_OCCURRENCES}) |",
        "| --- | --- | --- | --- |",
        *expert_rows(e, decode),
        "",
    ]


def heatmap(path: PathLike, experts: dict[int, ExpertTokens]) -> None:
    """Expert load (share of each layer's assignments) per MoE layer, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(experts)
    load_le = np.stack([experts[i].counts.sum(1) / max(experts[i].routed, 1) for i in layers])
    n_layers, n_experts = load_le.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.6 * n_experts), 1.6 + 0.5 * n_layers))
    im = ax.imshow(load_le, cmap="viridis", aspect="auto", vmin=0)
    if n_experts <= 32:
        for (r, c), v in np.ndenumerate(load_le):
            ax.text(
                c,
                r,
                f"{v:.0%}",
                ha="center",
                va="center",
                fontsize=7,
                color="k" if v > 0.6 * load_le.max() else "w",
            )  # readable on viridis
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers), [f"layer {i}" for i in layers])
    ax.set_xlabel("expert")
    ax.set_title("Expert load (share of routed assignments)", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    write_figure(fig, path)
    plt.close(fig)


def header(spec: RunSpec, found: Inspection, layers: list[int]) -> list[str]:
    """Title, where the tokens come from, and the settings the numbers depend on."""
    m, w = spec.model, found.windows
    count, t = w.tokens_wt.shape
    starts = ", ".join(f"{s:,}" for s in w.starts_w[:3]) + (
        f", ..., {w.starts_w[-1]:,}" if count > 3 else ""
    )
    spacing = f", one every {int(np.diff(w.starts_w).mean()):,} tokens" if count > 1 else ""
    return [
        f"# Inside the FFN: {spec.name}, step {found.step}",
        "",
        f"{found.tokens:,} validation tokens scanned: {count} windows of {t} evenly spaced "
        f"over the whole {w.split_tokens:,}-token validation split (starting at tokens "
        f"{starts}{spacing}). Layers {', '.join(map(str, layers))}; FFN {m.ffn}, "
        f"d_ff {m.d_ff}, {m.norm_position}-norm. See `ffn_jax/inspect/__init__.py` for the "
        "definitions.",
        "",
    ]


def neurons_intro(spec: RunSpec, found: Inspection) -> list[str]:
    """What the key-value section ranks and lists, with the run's norm folding and the
    candidate tokens."""
    folded = (
        "the final norm's scale"
        if spec.model.norm_position == "pre"
        else "the scales of the post-norms after the FFN on the residual path"
    )
    if spec.model.norm == "layer":
        folded += " and LayerNorm's mean subtraction"
    centred = (
        "centred: the mean logit over those ids subtracted"
        if found.centred
        else "not centred (raw logits)"
    )
    return [
        "## Key-value memories",
        "",
        "Neurons ranked by their largest |activation| (gated units fire both ways: a "
        "negative activation writes `-w2[i]`); each with its top-|activation| contexts, "
        "signed (trigger token `[[marked]]`). Promotes / suppresses: the largest and "
        f"smallest direct logits of the neuron's `w2` row ({folded} folded in) through the "
        f"output embedding, among the {found.seen} of {found.vocab} token ids seen in the "
        f"training split, {centred}. A negative activation swaps the two lists.",
        "",
    ]


def write_report(
    workdir: PathLike, spec: RunSpec, found: Inspection, layers: list[int], decode: Decode
) -> str:
    """Write ``inspect.md`` (and the heatmap for MoE layers) into ``workdir``; returns its
    path."""
    lines = header(spec, found, layers)
    if found.neurons:
        lines += neurons_intro(spec, found)
        for i in layers:
            if spec.model.is_moe_layer(i):
                lines += [f"### Layer {i}: MoE (experts, below)", ""]
            elif i in found.neurons:
                lines += [f"### Layer {i}", ""]
                for n in found.neurons[i]:
                    lines += neuron_section(n, decode)
    if found.experts:
        heatmap(epath.Path(workdir) / HEATMAP, found.experts)
        lines += ["## Expert specialisation", "", f"![expert load per layer]({HEATMAP})", ""]
        for i in sorted(found.experts):
            lines += expert_section(found.experts[i], decode)
    path = epath.Path(workdir) / REPORT
    write_text_atomic(path, "\n".join(lines))
    return str(path)
