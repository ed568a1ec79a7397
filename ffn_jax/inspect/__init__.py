"""Looking inside the FFN of a trained run: key-value memories and expert specialisation.

    python eval.py --workdir=runs/relu --inspect --layers=0,1 --neurons=8 --contexts=5
    python -m ffn_jax.inspect --workdir=runs/moe          # the same, without eval.py

**Key-value memories** (Geva et al. 2021). In a dense FFN ``y = h(x) W2``, hidden unit
(neuron) ``i`` has a key (column ``i`` of ``w1``, and of ``w3`` for gated variants) that
decides its activation ``h_i(x)`` (``FFN.hidden``: the gated product for gated variants), and
a value, row ``i`` of ``w2``, that it adds to the residual stream scaled by ``h_i(x)``.

*Where it looks.* The model runs (its own forward pass, ``LM.capture``) over ``windows``
validation windows of ``data.seq_len`` tokens evenly spaced over the whole validation split,
the first at its start and the last at its end (``spread_windows``); the report says how
many tokens were scanned, out of how many, and where the windows start.

*Which neurons.* Gated activations (GLU family, bilinear) are sign-symmetric: a large
negative ``h_i`` writes ``-w2[i]`` as strongly as a large positive one writes ``w2[i]``. So
each neuron's top ``contexts`` positions are those of largest ``|h_i|``, listed with their
signed activation (a few tokens either side, the trigger marked ``[[tok]]``), and the report
keeps the ``neurons`` units with the largest ``|h_i|`` anywhere.

*What its value does.* The direct logit contribution per unit of activation is
``fold(w2[i]) @ E``: ``E (d, v)`` is the output projection the model uses (the embedding
transposed when tied) and ``fold`` applies the learned per-dimension part of the norms
between the FFN and the logits (``residual_norms``): the final norm's ``scale`` (pre-norm),
or, post-norm, the scales of the block's own ``norm2`` and of every later norm on the
residual path, with a LayerNorm's mean subtraction (linear too). The norm's division by the
token's RMS cannot be folded (it depends on the token; it rescales every neuron alike) and
its bias does not depend on the neuron. The tokens it promotes and suppresses are the top
and bottom of these logits among the token ids that occur in the training split (an id the
model never saw as a target only has its initial, untrained embedding), by default centred:
the mean logit over those ids subtracted, so ``+0.3`` reads "0.3 above an average token".
A negative activation swaps the two lists.

**Expert specialisation** (MoE runs). For each MoE layer: the router's assignments on the
same tokens (token choice: the ``top_k`` experts of every token, before capacity drops;
expert choice: each expert's picks within one inspection batch), counted per expert and
token id; per expert the tokens it receives most by count and by share of that token's
occurrences (tokens seen at least ``MIN_OCCURRENCES`` times; with ``top_k = k`` a token's
shares over experts sum to ``k``); and a heatmap of expert load per layer. MoE layers have
no dense neurons and are left out of the key-value section.

``inspect_run`` writes ``inspect.md`` (and ``inspect_expert_load.png`` for MoE runs) into the
run's workdir and returns what it found (``Inspection``).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from ffn_jax.inspect.collect import (
    Context,
    ExpertTokens,
    Inspection,
    Neuron,
    Windows,
    check_request,
    parse_layers,
    residual_norms,
    scan_windows,
    seen_tokens,
    spread_windows,
    top_neurons,
    trace,
    value_logits,
    value_tokens,
)
from ffn_jax.inspect.report import HEATMAP, MIN_OCCURRENCES, REPORT, write_report

__all__ = [
    "HEATMAP",
    "MIN_OCCURRENCES",
    "REPORT",
    "Context",
    "ExpertTokens",
    "Inspection",
    "Neuron",
    "Windows",
    "inspect_run",
    "parse_layers",
    "residual_norms",
    "scan_windows",
    "seen_tokens",
    "spread_windows",
    "top_neurons",
    "trace",
    "value_logits",
    "value_tokens",
]


def inspect_run(
    workdir: str,
    *,
    layers: str = "",
    neurons: int = 8,
    contexts: int = 5,
    windows: int = 64,
    width: int = 8,
    experts: bool | None = None,
    step: int | None = None,
    batch: int = 8,
    centre: bool = True,
) -> Inspection:
    """Inspect the run in ``workdir`` and write its report there (see the module docstring).

    ``layers``: comma-separated indices (all when empty); ``width``: context tokens either
    side; ``experts``: None = the expert section for MoE runs, True = require it (ValueError
    on a dense run), False = skip it; ``batch``: windows per forward pass; ``centre``: list
    value logits minus their mean over the seen token ids (False: raw logits). Raises
    FileNotFoundError for a workdir without a run or checkpoints, ValueError for a request
    the run cannot answer.
    """
    from ffn_jax.run import load_spec, restore
    from ffn_jax.sharding import single_device_mesh

    mesh = single_device_mesh()
    m = load_spec(workdir, dict(mesh.shape)).model
    chosen = parse_layers(layers, m.n_layers)
    check_request(m, chosen, neurons, contexts, windows, experts)
    r = restore(workdir, step, mesh)
    model, _ = nnx.merge(r.rs.graphdef, r.state)
    model.eval()
    routed = [i for i in chosen if m.is_moe_layer(i)] if experts is not False else []
    dense = [i for i in chosen if not m.is_moe_layer(i)] if neurons else []
    tok = r.prep.tokenizer
    spread = spread_windows(r.prep.splits["validation"].tokens, r.spec.data.seq_len, windows)
    # Counting the training split is only needed for the neurons' value tokens.
    seen_v = (
        seen_tokens(r.prep.splits["train"].tokens, tok.vocab_size)
        if dense
        else np.zeros(tok.vocab_size, bool)
    )
    with jax.set_mesh(r.rs.mesh):
        run = scan_windows(
            model,
            spread.tokens_wt,
            dense,
            routed,
            contexts=contexts,
            vocab=tok.vocab_size,
            batch=batch,
        )
    occurrences = np.bincount(spread.tokens_wt.reshape(-1), minlength=tok.vocab_size)
    found = Inspection(
        step=r.step,
        windows=spread,
        neurons={
            i: top_neurons(
                model,
                i,
                run.top[i],
                spread,
                neurons=neurons,
                width=width,
                seen=seen_v,
                decode=tok.decode,
                centre=centre,
            )
            for i in dense
        },
        experts={i: ExpertTokens(i, c, occurrences, int(c.sum())) for i, c in run.counts.items()},
        seen=int(seen_v.sum()),
        vocab=tok.vocab_size,
        centred=centre,
    )
    write_report(workdir, r.spec, found, chosen, tok.decode)
    return found
