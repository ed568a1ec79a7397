"""Looking inside the FFN (ffn_jax.inspect): every listed number against brute force on a
small split, the report files, and one clear line for each bad request."""

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
from ffn_jax.inspect import HEATMAP, REPORT, first_windows, inspect_run, trace
from ffn_jax.inspect.report import escape
from ffn_jax.run import restore
from ffn_jax.sharding import single_device_mesh
from tests.helpers import moe_settings, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOWS = 6  # validation windows inspected: 6 x 64 = 384 tokens


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
    windows = first_windows(r.prep.splits["validation"].tokens, r.spec.data.seq_len, WINDOWS)
    return r.spec, r.prep.tokenizer, model, windows


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
    for layer, neurons in dense_found.neurons.items():
        h_nf = hidden[layer].reshape(-1, hidden[layer].shape[-1])
        expected_neurons = np.argsort(-h_nf.max(0), kind="stable")[:4]
        assert [n.index for n in neurons] == list(expected_neurons)
        for n in neurons:
            top = np.argsort(-h_nf[:, n.index], kind="stable")[:3]
            assert [(c.window, c.position) for c in n.contexts] == [divmod(int(i), 64) for i in top]
            np.testing.assert_allclose(
                [c.activation for c in n.contexts], h_nf[top, n.index], rtol=1e-5
            )
            for c in n.contexts:
                assert c.token == tok.decode(windows[c.window, c.position : c.position + 1])
                assert c.left == tok.decode(windows[c.window, max(0, c.position - 3) : c.position])


def test_promoted_tokens_are_the_matrix_product(dense_run, dense_found):
    config, tok, model, _ = _restored(dense_run)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    embed_vd = np.asarray(params["embed"])  # tied: the output projection is embed.T
    for layer, neurons in dense_found.neurons.items():
        w2_fd = np.asarray(params["layers"]["blocks"][0]["ffn"]["w2"][layer])
        scores_fv = (w2_fd @ embed_vd.T)[:, : tok.vocab_size]  # padding ids excluded
        for n in neurons:
            ids = [i for i, _ in n.promoted]
            assert ids == list(np.argsort(-scores_fv[n.index], kind="stable")[:8])
            np.testing.assert_allclose(
                [v for _, v in n.promoted], scores_fv[n.index, ids], rtol=1e-5
            )


def test_report_marks_triggers_and_escapes_newlines(dense_run, dense_found):
    with open(os.path.join(dense_run, REPORT)) as f:
        text = f.read()
    assert text.startswith("# Inside the FFN: original-relu-tiny, step 20")
    first = dense_found.neurons[0][0]
    assert f"#### Layer 0, neuron {first.index}" in text
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    contexts = [c for v in dense_found.neurons.values() for n in v for c in n.contexts]
    assert len(lines) == len(contexts) == 2 * 4 * 3
    for line, c in zip(lines, contexts, strict=True):
        assert line.endswith(f"`` {escape(f'{c.left}[[{c.token}]]{c.right}')} ``")
    assert any("\n" in c.left + c.right for c in contexts)  # Shakespeare has newlines...
    assert "\\n" in text  # ...written escaped, one context per line
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
