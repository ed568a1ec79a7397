"""benchmarks/bench_torch.py: its PyTorch reference is ffn-jax's model (parameter count, and
the same loss from the same weights), and the benchmark runs (smoke shape) and prints
well-formed JSON lines. The torch tests skip where PyTorch is not installed (the ``bench``
extra)."""

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_torch.py")

_spec = importlib.util.spec_from_file_location("bench_torch", SCRIPT)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def resolve(shape="cpu", variant="gelu", arch="default", smoke=False, **model):
    from ffn_jax.spec import from_config

    config = bench.make_config(shape, variant, arch, smoke)
    config.model.update(model)
    return from_config(config, num_devices=1)


@pytest.fixture(scope="module")
def smoke_rows():
    """One smoke run for the module (the tests' time budget): ffn-jax alone, or ffn-jax and
    torch where torch is installed."""
    frameworks = "jax,torch" if HAVE_TORCH else "jax"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", f"--frameworks={frameworks}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_smoke_prints_ffn_jax_step_loop_and_summary_lines(smoke_rows):
    jax_rows = [r for r in smoke_rows if r.get("framework") == "ffn-jax"]
    assert not [r for r in smoke_rows if "error" in r]
    by_kind = {(r["measurement"], r.get("of")): r for r in jax_rows}
    assert set(by_kind) == {
        ("step", None),
        ("loop", None),
        ("summary", "step"),
        ("summary", "loop"),
    }
    step, loop = by_kind[("step", None)], by_kind[("loop", None)]
    for r in jax_rows:
        assert r["shape"] == "cpu-smoke" and r["variant"] == "swiglu" and r["arch"] == "default"
        assert r["tokens_per_s"] > 0 and r["batch"] == 4 and r["seq_len"] == 32
    assert step["step_s_min"] <= step["step_s"] <= step["step_s_max"]
    assert step["tokens_per_s"] == pytest.approx(4 * 32 / step["step_s"])
    assert step["steps_timed"] == 3 and step["params"] == loop["params"] > 0
    # train.py's loop: 8 steps logged every 2, the first window not counted.
    assert loop["windows"] == 3 and len(loop["tokens_per_s_windows"]) == 4
    assert loop["tokens_per_s"] == pytest.approx(np.median(loop["tokens_per_s_windows"][1:]))
    assert 0 <= loop["data_time_s"] < loop["step_time_s"]
    assert loop["command"].startswith("python train.py --config=configs/base.py:swiglu,size=small")
    assert "shakespeare-train" in loop["data"]


@pytest.mark.slow
def test_smoke_with_torch_prints_torch_lines_and_a_ratio(smoke_rows):
    pytest.importorskip("torch")
    torch_rows = [r for r in smoke_rows if r.get("framework") == "torch-eager"]
    assert {r["measurement"] for r in torch_rows} == {"step", "loop", "summary"}
    jax_step = next(r for r in smoke_rows if r.get("framework") == "ffn-jax")
    assert all(r["params"] == jax_step["params"] for r in torch_rows if "params" in r)
    (ratio,) = [r for r in smoke_rows if r["measurement"] == "ratio"]
    assert ratio["step_torch"] == ratio["loop_torch"] == "torch-eager"
    for kind in ("step", "loop"):
        tps = ratio[f"{kind}_tokens_per_s"]
        assert ratio[f"{kind}_ratio"] == pytest.approx(tps["ffn-jax"] / tps["torch-eager"])
        assert ratio[f"{kind}_ratio_best"] > 0


def test_missing_torch_is_one_line_naming_the_fix(tmp_path):
    """Without PyTorch the torch rows stop at once with the install command (a stub package
    that fails to import stands in for a missing torch)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--frameworks=jax,torch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == bench.TORCH_MISSING
    assert "pip install -e .[bench]" in bench.TORCH_MISSING


def test_train_py_flags_rebuild_the_benchmark_config():
    """The whole-loop run's ``--config.*`` flags on configs/base.py give the benchmark's config."""
    from configs import base

    config: Any = bench.loop_config(bench.make_config("cpu", "gelu", "nanogpt"), 100, 20)
    rebuilt: Any = base.get_config(bench.base_arg("cpu", "gelu"))
    for flag in bench.config_overrides(config, rebuilt):
        dotted, value = flag.removeprefix("--config.").split("=", 1)
        *parents, leaf = dotted.split(".")
        block: Any = rebuilt
        for p in parents:
            block = block[p]
        old = block[leaf]  # parsed as ml_collections parses a flag: by the field's type
        block[leaf] = (value == "True") if isinstance(old, bool) else type(old)(value)
    assert rebuilt.model.to_dict() == config.model.to_dict()
    assert rebuilt.data.to_dict() == config.data.to_dict()
    assert rebuilt.train.to_dict() == config.train.to_dict()
    assert "--config.train.final_eval=False" in bench.config_overrides(config, base.get_config())


@pytest.mark.parametrize(
    "variant, arch, model",
    [
        ("gelu", "default", {}),
        ("swiglu", "default", {}),
        ("gelu", "nanogpt", {}),  # LayerNorm, learned positions
        ("swiglu", "default", {"tie_embeddings": False, "n_kv_heads": 2}),
    ],
)
def test_reference_has_ffn_jax_parameter_count_at_the_cpu_shape(variant, arch, model):
    pytest.importorskip("torch")
    spec = resolve("cpu", variant, arch, **model)
    reference = bench.reference_arch(spec)
    torch_model = bench.build_torch_model(reference)  # raises on a mismatch
    n = sum(p.numel() for p in torch_model.parameters())
    assert n == reference["jax_params"] > 0
    assert spec.model.norm == ("layer" if arch == "nanogpt" else "rms")
    assert spec.model.positions == ("learned" if arch == "nanogpt" else "rope")


def test_reference_refuses_a_mismatched_parameter_count():
    pytest.importorskip("torch")
    reference = bench.reference_arch(resolve("cpu", "gelu"))
    with pytest.raises(ValueError, match="parameters"):
        bench.build_torch_model({**reference, "jax_params": reference["jax_params"] + 1})


def _copy_weights(jax_model, torch_model, spec):
    """ffn-jax's parameters into the reference's modules (kernels (in, out) -> weights
    (out, in); q/k/v and w1/w3 concatenated as the reference fuses them)."""
    import torch
    from flax import nnx

    p = nnx.to_pure_dict(nnx.state(jax_model, nnx.Param))
    m = spec.model
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
    blocks = p["layers"]["blocks"][0]
    with torch.no_grad():
        torch_model.embed.weight.copy_(t(p["embed"]))
        if m.positions == "learned":
            torch_model.pos.weight.copy_(t(p["pos_embed"]))
        if not m.tie_embeddings:
            torch_model.head.weight.copy_(t(p["unembed"]).T)
        torch_model.final_norm.weight.copy_(t(p["final_norm"]["scale"]))
        if m.norm == "layer":
            torch_model.final_norm.bias.copy_(t(p["final_norm"]["bias"]))
        for i, block in enumerate(torch_model.blocks):
            a, f = blocks["attn"], blocks["ffn"]
            qkv = [t(a[w][i]).reshape(m.d_model, -1) for w in ("wq", "wk", "wv")]
            block.qkv.weight.copy_(torch.cat(qkv, 1).T)
            block.wo.weight.copy_(t(a["wo"][i]).reshape(-1, m.d_model).T)
            w13 = [t(f["w1"][i])] + ([t(f["w3"][i])] if "w3" in f else [])
            block.w13.weight.copy_(torch.cat(w13, 1).T)
            block.w2.weight.copy_(t(f["w2"][i]).T)
            if m.ffn_bias:
                b13 = [t(f["b1"][i])] + ([t(f["b3"][i])] if "b3" in f else [])
                block.w13.bias.copy_(torch.cat(b13))
                block.w2.bias.copy_(t(f["b2"][i]))
            for name in ("norm1", "norm2"):
                getattr(block, name).weight.copy_(t(blocks[name]["scale"][i]))
                if m.norm == "layer":
                    getattr(block, name).bias.copy_(t(blocks[name]["bias"][i]))


@pytest.mark.parametrize(
    "variant, arch, model",
    [
        ("gelu", "default", {}),  # RMSNorm, rotary, tied embedding
        # LayerNorm, learned positions, untied, grouped-query heads, FFN biases
        ("swiglu", "nanogpt", {"tie_embeddings": False, "n_kv_heads": 2, "ffn_bias": True}),
    ],
)
def test_reference_computes_ffn_jax_loss_and_gradient_norm(variant, arch, model):
    """Given ffn-jax's weights, the reference's loss and gradient norm equal ffn-jax's: the
    same network, not only as many parameters."""
    torch = pytest.importorskip("torch")
    import jax
    import optax
    from flax import nnx

    from ffn_jax.model import LM, lm_loss

    spec = resolve("cpu", variant, arch, smoke=True, **model)
    jax_model = LM(spec.model, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 257, (4, spec.data.seq_len + 1))
    graphdef, params, rest = nnx.split(jax_model, nnx.Param, ...)
    jax_loss, grads = jax.jit(
        jax.value_and_grad(lambda p, tok: lm_loss(nnx.merge(graphdef, p, rest), tok)[0])
    )(params, jax.numpy.asarray(tokens))
    torch_model = bench.build_torch_model(bench.reference_arch(spec))
    _copy_weights(jax_model, torch_model, spec)
    loss = torch_model(torch.from_numpy(tokens))
    loss.backward()
    loss = loss.detach()
    grad_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in torch_model.parameters()])
    )
    assert float(loss) == pytest.approx(float(jax_loss), rel=1e-5)
    assert float(grad_norm) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)


def test_reference_schedule_is_ffn_jax_schedule():
    from ffn_jax.optim import relative_schedule

    for schedule in ("cosine", "linear", "constant"):
        spec = resolve("cpu", "gelu")
        train = spec.train.__class__(**{**spec.train.__dict__, "schedule": schedule})
        reference = {**bench.reference_arch(spec), "schedule": schedule}
        shape = relative_schedule(train)
        for step in (0, 1, 13, train.warmup_steps, train.warmup_steps + 7, train.steps, 10**6):
            assert bench.lr_factor(reference, step) == pytest.approx(
                np.asarray(shape(step)).item(), abs=1e-6
            )
