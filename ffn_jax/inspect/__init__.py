"""Looking inside the FFN of a trained run: key-value memories and expert specialisation.

    python eval.py --workdir=runs/relu --inspect --layers=0,1 --neurons=8 --contexts=5
    python -m ffn_jax.inspect --workdir=runs/moe          # the same, without eval.py

**Key-value memories** (Geva et al. 2021). In a dense FFN ``y = h(x) W2``, hidden unit
(neuron) ``i`` has a key (column ``i`` of ``w1``, and of ``w3`` for gated variants) that
decides its activation ``h_i(x)`` (``FFN.hidden``: the gated product for gated variants), and
a value, row ``i`` of ``w2``, that it adds to the residual stream. For each chosen layer the
model runs over the first ``windows`` validation windows; the report keeps the ``neurons``
units with the highest activation anywhere, lists each one's ``contexts`` top-activating
positions (a few tokens either side, the trigger marked ``[[tok]]``), and the vocabulary
tokens its value promotes: the top entries of ``w2[i] @ E`` with ``E`` the output projection
``(d, v)`` (the embedding transposed when tied), padding ids excluded. As in Geva et al. the
final norm is *not* folded in: its scale is one per-dimension factor shared by all neurons,
and the norm's token-dependent rescaling cannot be folded at all.

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
    check_request,
    first_windows,
    parse_layers,
    promoted_tokens,
    scan_windows,
    top_neurons,
    trace,
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
    "first_windows",
    "inspect_run",
    "parse_layers",
    "promoted_tokens",
    "trace",
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
) -> Inspection:
    """Inspect the run in ``workdir`` and write its report there (see the module docstring).

    ``layers``: comma-separated indices (all when empty); ``width``: context tokens either
    side; ``experts``: None = the expert section for MoE runs, True = require it (ValueError
    on a dense run), False = skip it; ``batch``: windows per forward pass. Raises
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
    windows_wt = first_windows(r.prep.splits["validation"].tokens, r.spec.data.seq_len, windows)
    tok = r.prep.tokenizer
    with jax.set_mesh(r.rs.mesh):
        run = scan_windows(
            model, windows_wt, dense, routed, contexts=contexts, vocab=tok.vocab_size, batch=batch
        )
    occurrences = np.bincount(windows_wt.reshape(-1), minlength=tok.vocab_size)
    found = Inspection(
        step=r.step,
        tokens=windows_wt.size,
        neurons={
            i: top_neurons(
                model,
                i,
                run.top[i],
                windows_wt,
                neurons=neurons,
                width=width,
                vocab=tok.vocab_size,
                decode=tok.decode,
            )
            for i in dense
        },
        experts={i: ExpertTokens(i, c, occurrences, int(c.sum())) for i, c in run.counts.items()},
    )
    write_report(workdir, r.spec, found, chosen, tok.decode)
    return found
