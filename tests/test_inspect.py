"""Looking inside the FFN (ffn_jax.inspect): every listed number against brute force on a
small split, the report files, and one clear line for each bad request. Each of the report's
definitions has a test that fails if it regresses: windows spread over the whole validation
split, neurons ranked by |activation| with signed contexts, value logits through the norm
scales and the real output projection, listed only among ids seen in training."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import get_config
from ffn_jax.inspect import (
    HEATMAP,
    REPORT,
    inspect_run,
    scan_windows,
    seen_tokens,
    spread_windows,
    top_neurons,
    trace,
    value_logits,
    value_tokens,
)
from ffn_jax.inspect.report import context_line, escape
from ffn_jax.model import LM
from ffn_jax.run import restore
from ffn_jax.sharding import single_device_mesh
from tests.helpers import moe_settings, tiny_model, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOWS = 6  # validation windows inspected: 6 x 64 = 384 tokens
FIRST_TOKENS = 8192  # what the inspection once scanned: the title and cast of one play


def _train(workdir, arg, **overrides):
    c = get_config(arg)
    c.train.steps, c.train.warmup_steps, c.train.final_eval = 20, 4, False
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = c[node]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    train(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """The 2017 block (post-norm, learned positions, ReLU), briefly trained. Dropout is off:
    the inspection is deterministic either way and does not need it."""
    return _train(
        str(tmp_path_factory.mktemp("original")), "original,size=tiny", **{"model.dropout": 0.0}
    )


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """Layer 1 of 2 is an MoE layer: 4 SwiGLU experts, top-2 (layer 0 stays dense)."""
    return _train(
        str(tmp_path_factory.mktemp("moe")),
        "swiglu,size=tiny",
        **{"model.moe.num_experts": 4, "model.moe.every": 2, "model.moe.top_k": 2},
    )


@pytest.fixture(scope="module")
def dense_found(dense_run):
    # batch=4 windows per pass: the running top-k is merged over two uneven batches.
    return inspect_run(dense_run, neurons=4, contexts=3, windows=WINDOWS, width=3, batch=4)


def _restored(workdir):
    """(spec, tokenizer, model in eval mode, the inspected windows)."""
    r = restore(workdir, None, single_device_mesh())
    model, _ = nnx.merge(r.rs.graphdef, r.state)
    model.eval()
    windows = spread_windows(r.prep.splits["validation"].tokens, r.spec.data.seq_len, WINDOWS)
    return r.spec, r.prep.tokenizer, model, windows.tokens_wt


def _full_trace(model, windows, hidden=(), routed=()):
    """Every window in one pass: the brute-force reference of the streamed scan."""
    return jax.device_get(trace(model, jnp.asarray(windows), frozenset(hidden), frozenset(routed)))


@pytest.mark.parametrize("run", ["dense_run", "moe_run"])
def test_capture_is_the_model_forward_pass(run, request):
    """The trace is the model's own forward pass: the same logits, and layer 0's captured
    hidden activations equal its FFN applied by hand to its input (a plain reference)."""
    _, _, model, windows = _restored(request.getfixturevalue(run))
    toks = jnp.asarray(windows[:2])
    logits, hidden, _ = trace(model, toks, frozenset({0}), frozenset())
    np.testing.assert_array_equal(logits, model(toks)[0])  # capture off again afterwards
    assert model(toks)[1].keys() == {k for k in model(toks)[1] if "capture" not in k}
    x, positions = model.embed_tokens(toks)
    graphdef, state = nnx.split(model.layers)
    group = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    block = group.blocks[0]
    want = block.ffn.hidden(block.ffn_input(block.attend(x, positions)))
    np.testing.assert_allclose(hidden[0], want, rtol=1e-5, atol=1e-5)


def test_top_contexts_are_the_brute_force_argmax(dense_run, dense_found):
    _, tok, model, windows = _restored(dense_run)
    _, hidden, _ = _full_trace(model, windows, hidden=(0, 1))
    assert sorted(dense_found.neurons) == [0, 1] and dense_found.tokens == windows.size
    starts_w = dense_found.windows.starts_w
    for layer, neurons in dense_found.neurons.items():
        h_nf = hidden[layer].reshape(-1, hidden[layer].shape[-1])
        expected_neurons = np.argsort(-np.abs(h_nf).max(0), kind="stable")[:4]
        assert [n.index for n in neurons] == list(expected_neurons)
        for n in neurons:
            top = np.argsort(-np.abs(h_nf[:, n.index]), kind="stable")[:3]
            assert [(c.window, c.position) for c in n.contexts] == [divmod(int(i), 64) for i in top]
            np.testing.assert_allclose(
                [c.activation for c in n.contexts], h_nf[top, n.index], rtol=1e-5
            )
            assert n.peak == n.contexts[0].activation
            for c in n.contexts:
                assert c.offset == starts_w[c.window] + c.position
                assert c.token == tok.decode(windows[c.window, c.position : c.position + 1])
                assert c.left == tok.decode(windows[c.window, max(0, c.position - 3) : c.position])


def _norm_path(blocks, layer, v_fd, n_layers):
    """By hand: a post-norm LayerNorm value on its way to the logits, through its block's
    norm2, then norm1 and norm2 of every later block (mean removed, then scaled)."""
    path = [(layer, "norm2")] + [
        (i, n) for i in range(layer + 1, n_layers) for n in ("norm1", "norm2")
    ]
    for i, name in path:
        v_fd = (v_fd - v_fd.mean(-1, keepdims=True)) * np.asarray(blocks[name]["scale"][i])
    return v_fd


def test_value_tokens_are_the_matrix_product_through_the_norms(dense_run, dense_found):
    """The 2017 block (post-norm LayerNorm, tied embeddings): each listed logit is the value
    ``w2[i]`` through the norms after it and ``embed.T``, centred over the ids seen in the
    training split, and only those ids are listed."""
    r = restore(dense_run, None, single_device_mesh())
    model, _ = nnx.merge(r.rs.graphdef, r.state)
    vocab = r.prep.tokenizer.vocab_size
    seen_v = np.bincount(np.asarray(r.prep.splits["train"].tokens), minlength=vocab) > 0
    assert dense_found.seen == seen_v.sum() < vocab and dense_found.centred  # the default
    ids = np.flatnonzero(seen_v)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    embed_vd = np.asarray(params["embed"])  # tied: the output projection is embed.T
    blocks = params["layers"]["blocks"][0]  # one block per group: the leading axis is the layer
    for layer, neurons in dense_found.neurons.items():
        raw_fd = np.asarray(blocks["ffn"]["w2"][layer])
        scores_fv = _norm_path(blocks, layer, raw_fd, 2) @ embed_vd.T
        assert not np.allclose(scores_fv, raw_fd @ embed_vd.T, rtol=1e-3)  # the norms matter
        for n in neurons:
            centred = scores_fv[n.index, ids] - scores_fv[n.index, ids].mean()
            up = np.argsort(-centred, kind="stable")[:8]
            down = np.argsort(centred, kind="stable")[:8]
            assert [i for i, _ in n.promoted] == list(ids[up])
            assert [i for i, _ in n.suppressed] == list(ids[down])
            np.testing.assert_allclose([v for _, v in n.promoted], centred[up], rtol=1e-4)
            np.testing.assert_allclose([v for _, v in n.suppressed], centred[down], rtol=1e-4)
            assert all(seen_v[i] for i, _ in n.promoted + n.suppressed)


@pytest.mark.parametrize("tie", [True, False])
def test_value_logits_fold_the_final_norm_scale(tie):
    """Pre-norm: (w2[i] * final_norm.scale) @ the output projection the model uses."""
    model = LM(tiny_model(tie_embeddings=tie), rngs=nnx.Rngs(0))
    assert model.final_norm is not None
    scale_d = 0.5 + jax.random.uniform(jax.random.key(1), (64,))  # far from the ones at init
    model.final_norm.scale[...] = scale_d
    neurons = np.array([3, 0, 7])
    w2_fd = np.asarray(model.layers.blocks[0].ffn.w2[...][1])  # layer 1 of the stack
    if tie:  # the model's output projection is the embedding transposed
        assert model.unembed is None
        out_dv = np.asarray(model.embed[...]).T
    else:
        assert model.unembed is not None
        out_dv = np.asarray(model.unembed[...])
    want_nv = (w2_fd[neurons] * np.asarray(scale_d)) @ out_dv
    got_nv = value_logits(model, 1, neurons)
    np.testing.assert_allclose(got_nv, want_nv, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got_nv, w2_fd[neurons] @ out_dv, rtol=1e-2)


def test_never_seen_ids_are_never_listed(monkeypatch):
    """Ids absent from the training split have untrained embeddings: even when one of them
    has the largest (another the smallest) logit it is not listed; values are centred over
    the seen ids by default, raw on request."""
    from ffn_jax.inspect import collect

    monkeypatch.setattr(collect, "COUNT_CHUNK", 5)  # counted over several chunks
    train_split = np.tile(np.arange(5, 30), 3)
    seen_v = seen_tokens(train_split, 97)
    np.testing.assert_array_equal(np.flatnonzero(seen_v), np.arange(5, 30))
    model = LM(tiny_model(), rngs=nnx.Rngs(0))
    value_d = model.layers.blocks[0].ffn.w2[...][0, 0]  # neuron 0 of layer 0 (scale: ones)
    model.embed[...] = model.embed[...].at[40].set(100 * value_d).at[41].set(-100 * value_d)
    logits_v = value_logits(model, 0, np.array([0]))[0]
    assert logits_v.argmax() == 40 and logits_v.argmin() == 41  # they would lead the lists
    promoted, suppressed = value_tokens(logits_v, seen_v, 8)
    listed = [i for i, _ in promoted + suppressed]
    assert len(promoted) == len(suppressed) == 8 and set(listed) <= set(range(5, 30))
    mean = logits_v[5:30].mean()
    np.testing.assert_allclose(
        [v for _, v in promoted], logits_v[[i for i, _ in promoted]] - mean, rtol=1e-5
    )
    assert [v for _, v in promoted] == sorted((v for _, v in promoted), reverse=True)
    raw, _ = value_tokens(logits_v, seen_v, 8, centre=False)
    assert [i for i, _ in raw] == [i for i, _ in promoted]
    np.testing.assert_allclose([v for _, v in raw], logits_v[[i for i, _ in raw]], rtol=1e-6)


def test_a_negative_neuron_ranks_first_by_magnitude_with_its_sign():
    """A bilinear unit with ``w1 = -50 w3`` has ``h = -50 (x w3)^2``: never positive, the
    largest |activation| of the layer. It ranks first, every context signed ``-``; every
    listed neuron's contexts are the brute-force top-|a| positions (streamed in two batches,
    merged by |a|)."""
    model = LM(tiny_model(ffn="bilinear"), rngs=nnx.Rngs(0))
    ffn, j = model.layers.blocks[0].ffn, 5
    assert ffn.w3 is not None
    ffn.w1[...] = ffn.w1[...].at[0, :, j].set(-50 * ffn.w3[...][0, :, j])  # layer 0
    windows = spread_windows(np.random.default_rng(0).integers(0, 97, 4000), 16, 4)
    run = scan_windows(model, windows.tokens_wt, [0], [], contexts=3, vocab=97, batch=2)
    neurons = top_neurons(
        model,
        0,
        run.top[0],
        windows,
        neurons=4,
        width=2,
        seen=np.ones(97, bool),
        decode=lambda ids: " ".join(map(str, ids)),
    )
    first = neurons[0]
    assert first.index == j and first.peak < 0
    assert all(c.sign == "-" and c.activation < 0 for c in first.contexts)
    assert context_line(first.contexts[0]).startswith(f"- -{abs(first.peak):.3f} ")
    _, hidden, _ = _full_trace(model, windows.tokens_wt, hidden=(0,))
    h_nf = hidden[0].reshape(-1, hidden[0].shape[-1])
    assert h_nf.max() > 0  # bilinear units fire both ways
    assert [n.index for n in neurons] == list(np.argsort(-np.abs(h_nf).max(0), kind="stable")[:4])
    for n in neurons:
        top = np.argsort(-np.abs(h_nf[:, n.index]), kind="stable")[:3]
        assert [(c.window, c.position) for c in n.contexts] == [divmod(int(i), 16) for i in top]
        np.testing.assert_allclose(
            [c.activation for c in n.contexts], h_nf[top, n.index], rtol=1e-5
        )


def test_windows_span_the_whole_split():
    split = np.arange(100_000) % 251
    w = spread_windows(split, 64, 6)
    assert w.tokens_wt.shape == (6, 64) and w.size == 384 and w.split_tokens == 100_000
    assert w.starts_w[0] == 0 and w.starts_w[-1] == 100_000 - 64 > FIRST_TOKENS
    for row, start in zip(w.tokens_wt, w.starts_w, strict=True):
        np.testing.assert_array_equal(row, split[start : start + 64])
    for n in (64, 65, 127, 128, 300, 1000, 4097):  # fewer windows than asked: all, disjoint
        for count in (1, 2, 3, 7, 64):
            starts = spread_windows(split[:n], 64, count).starts_w
            assert len(starts) == min(count, n // 64) and starts[-1] + 64 <= n
            assert np.all(np.diff(starts) >= 64)
    with pytest.raises(
        ValueError, match=r"has 10 tokens, fewer than one window of data.seq_len=64"
    ):
        spread_windows(split[:10], 64, 3)


def test_report_marks_triggers_and_escapes_newlines(dense_run, dense_found):
    with open(os.path.join(dense_run, REPORT)) as f:
        text = f.read()
    assert text.startswith("# Inside the FFN: original-relu-tiny, step 20")
    w = dense_found.windows
    assert w.starts_w[-1] + 64 == w.split_tokens > FIRST_TOKENS  # the whole split, to its end
    assert (
        f"{w.size:,} validation tokens scanned: {WINDOWS} windows of 64 evenly spaced over the "
        f"whole {w.split_tokens:,}-token validation split (starting at tokens 0, "
        f"{w.starts_w[1]:,}, {w.starts_w[2]:,}, ..., {w.starts_w[-1]:,}" in text
    )
    assert "by their largest |activation|" in text
    assert f"among the {dense_found.seen} of 257 token ids seen in the training split" in text
    assert "centred: the mean logit over those ids subtracted" in text
    first = dense_found.neurons[0][0]
    assert f"#### Layer 0, neuron {first.index} (peak activation {first.peak:+.3f}" in text
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    contexts = [c for v in dense_found.neurons.values() for n in v for c in n.contexts]
    assert len(lines) == len(contexts) == 2 * 4 * 3
    for line, c in zip(lines, contexts, strict=True):
        assert line.startswith(f"- {c.sign}{abs(c.activation):.3f} (validation token {c.offset:,}:")
        assert line.endswith(f"`` {escape(f'{c.left}[[{c.token}]]{c.right}')} ``")
    assert any("\n" in c.left + c.right for c in contexts)  # Shakespeare has newlines...
    assert "\\n" in text  # ...written escaped, one context per line
    assert text.count("\nPromotes: ") == text.count("\nSuppresses: ") == 2 * 4
    assert "Expert specialisation" not in text and not os.path.exists(
        os.path.join(dense_run, HEATMAP)
    )


def test_expert_counts_sum_to_the_routed_tokens(moe_run):
    found = inspect_run(moe_run, neurons=2, contexts=2, windows=WINDOWS, batch=4)
    _, _, model, windows = _restored(moe_run)
    assert sorted(found.neurons) == [0] and sorted(found.experts) == [1]
    e = found.experts[1]
    k = 2
    assert e.counts.shape == (4, 257)  # 4 experts x the byte tokenizer's ids (no padding)
    assert e.counts.sum() == e.routed == windows.size * k
    # Every occurrence of a token goes to k distinct experts.
    np.testing.assert_array_equal(
        e.counts.sum(0), k * np.bincount(windows.reshape(-1), minlength=257)
    )
    _, _, routes = _full_trace(model, windows, routed=(1,))
    expert_a, token_a = routes[1]
    brute = np.zeros((4, 257), np.int64)
    np.add.at(brute, (expert_a, windows.reshape(-1)[token_a]), 1)
    np.testing.assert_array_equal(e.counts, brute)
    with open(os.path.join(moe_run, REPORT)) as f:
        text = f.read()
    assert f"![expert load per layer]({HEATMAP})" in text and "### Layer 1: MoE" in text
    assert os.path.getsize(os.path.join(moe_run, HEATMAP)) > 1000


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(layers="0,5"),
            ValueError,
            r"--layers='0,5': layer 5 is out of range; the run has model.n_layers=2, so use "
            r"indices 0..1",
        ),
        (dict(layers="first"), ValueError, r"--layers='first' is not a comma-separated list"),
        (
            dict(neurons=300),
            ValueError,
            r"--neurons=300 must be in \[0, d_ff=256\] .*; use at most --neurons=256",
        ),
        (
            dict(experts=True),
            ValueError,
            r"--experts: this run is dense \(model.moe.num_experts=0\); .* drop --experts",
        ),
    ],
)
def test_bad_requests_fail_with_one_line(dense_run, kwargs, error, message):
    with pytest.raises(error, match=message) as e:
        inspect_run(dense_run, **kwargs)
    assert "\n" not in str(e.value)


def test_run_without_checkpoints_fails(dense_run, tmp_path):
    with open(os.path.join(dense_run, "config.json")) as f:
        config = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(FileNotFoundError, match=r"has no checkpoints; train it first"):
        inspect_run(str(tmp_path))


def _eval_cli(*flags):
    return subprocess.run(
        [sys.executable, "eval.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_eval_py_inspect(dense_run):
    r = _eval_cli(
        f"--workdir={dense_run}",
        "--inspect",
        "--layers=1",
        "--neurons=2",
        "--contexts=2",
        "--windows=2",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(REPORT)
    with open(os.path.join(dense_run, REPORT)) as f:
        assert len(re.findall(r"^#### Layer 1, neuron \d+", f.read(), re.M)) == 2
    bad = _eval_cli(f"--workdir={dense_run}", "--inspect", "--layers=2")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --layers='2': layer 2 is out")


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_captured_route_assignments(router):
    from ffn_jax.moe import MoEFFN

    moe_cfg = get_config("swiglu,size=tiny").model.moe
    moe_cfg.num_experts, moe_cfg.router, moe_cfg.eval_capacity_factor = 4, router, 0.5
    ffn = MoEFFN(16, moe_settings(moe_cfg, 32), variant="swiglu", rngs=nnx.Rngs(0))
    ffn.eval()
    ffn.capture = True
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    _, aux = ffn(x)
    expert_a, token_a = np.asarray(aux["capture/expert"]), np.asarray(aux["capture/token"])
    probs_te = np.asarray(jax.nn.softmax(ffn.router_logits(x).reshape(16, 4), -1))
    if router == "topk":  # every token to its 2 most probable experts
        np.testing.assert_array_equal(np.bincount(token_a, minlength=16), 2)
        best = np.argsort(-probs_te, axis=1)[:, :2]
        for t in range(16):
            assert set(expert_a[token_a == t]) == set(best[t])
    else:  # every expert takes its capacity (0.5 * 2 * 16 / 4 = 4) most probable tokens
        for e in range(4):
            assert set(token_a[expert_a == e]) == set(np.argsort(-probs_te[:, e])[:4])
