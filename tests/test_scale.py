"""Scale-out: the train step on every mesh equals one device, shardings follow the rules,
the memory estimate tracks XLA's, multi-process training, and bad mesh / cluster input."""

import functools
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from configs.base import get_config
from ffn_jax import distributed, memory, sharding, trainer
from ffn_jax.checkpoint import Checkpointer
from ffn_jax.configuration import ConfigError, validate_config
from ffn_jax.metrics import read_metrics
from ffn_jax.run import build_run_state, load_spec
from tests.helpers import model_spec, run_spec, set_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

MESHES = {
    "data8": (dict(data=8), False),
    "fsdp8": (dict(fsdp=8), False),
    "data2-fsdp2-tensor2": (dict(data=2, fsdp=2, tensor=2), False),
    "data2-expert4-moe": (dict(data=2, expert=4), True),
    "fsdp2-expert2-tensor2-moe": (dict(fsdp=2, expert=2, tensor=2), True),
}

# Parameter path -> partition spec under the default rules; layers are stacked (leading
# "layers" axis, unsharded) because they are scanned.
DENSE_SPECS = {
    ("embed",): P("tensor", "fsdp"),
    ("final_norm", "scale"): P("fsdp"),
    ("layers", "blocks", 0, "attn", "wq"): P(None, "fsdp", "tensor", None),
    ("layers", "blocks", 0, "attn", "wk"): P(None, "fsdp", "tensor", None),
    ("layers", "blocks", 0, "attn", "wo"): P(None, "tensor", None, "fsdp"),
    ("layers", "blocks", 0, "norm1", "scale"): P(None, "fsdp"),
}
FFN_SPECS = {
    False: {
        ("layers", "blocks", 0, "ffn", "w1"): P(None, "fsdp", "tensor"),
        ("layers", "blocks", 0, "ffn", "w3"): P(None, "fsdp", "tensor"),
        ("layers", "blocks", 0, "ffn", "w2"): P(None, "tensor", "fsdp"),
    },
    True: {
        ("layers", "blocks", 0, "ffn", "router"): P(None, "fsdp", None),
        ("layers", "blocks", 0, "ffn", "w1"): P(None, "expert", "fsdp", "tensor"),
        ("layers", "blocks", 0, "ffn", "w3"): P(None, "expert", "fsdp", "tensor"),
        ("layers", "blocks", 0, "ffn", "w2"): P(None, "expert", "tensor", "fsdp"),
    },
}


def tiny(moe: bool = False, **shape) -> ConfigDict:
    c = get_config("swiglu,size=tiny")
    c.model.vocab_size = 256
    if moe:  # capacity for every token: the sharded dispatch drops nothing
        set_fields(
            c, {"model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.capacity_factor": 8.0}
        )
    c.mesh.shape = ConfigDict({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **shape})
    return c


@functools.cache
def run_steps(mesh_name: str | None, moe: bool):
    """Train ``STEPS`` steps on fixed random batches on a named mesh (None = one device).

    Returns ``(run state, compiled step, losses, final state on host)``.
    """
    shape = MESHES[mesh_name][0] if mesh_name else {}
    config = tiny(moe, **shape)
    spec = run_spec(config, num_devices=math.prod(shape.values()) if shape else 1)
    mesh = sharding.make_mesh(spec.mesh.shape) if mesh_name else sharding.single_device_mesh()
    rs = build_run_state(spec, mesh)
    b, t = config.data.batch_size, config.data.seq_len + 1
    batches = jax.random.randint(jax.random.key(1), (STEPS, b, t), 0, config.model.vocab_size)
    with jax.set_mesh(rs.mesh), sharding.axis_rules(rs.rules):
        jitted = jax.jit(
            trainer.make_train_step(rs.graphdef, spec.train),
            in_shardings=(rs.state_shardings, rs.batch_sharding),
            out_shardings=(rs.state_shardings, None),
        )
        abstract = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rs.batch_sharding)
        step = jitted.lower(rs.state, abstract).compile()
        state, losses = rs.state, []
        for batch in np.asarray(batches):
            state, metrics = step(state, jax.device_put(batch, rs.batch_sharding))
            losses.append(float(metrics["loss"]))
    return rs, step, losses, jax.device_get(jax.tree.leaves(state))


def path_of(keys) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in keys)


@pytest.mark.parametrize("mesh_name", MESHES)
def test_train_steps_equal_single_device(mesh_name):
    moe = MESHES[mesh_name][1]
    _, _, ref_losses, ref_state = run_steps(None, moe)
    _, _, losses, state = run_steps(mesh_name, moe)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(state, ref_state, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("mesh_name", MESHES)
def test_param_and_optimizer_shardings_follow_rules(mesh_name):
    moe = MESHES[mesh_name][1]
    rs = run_steps(mesh_name, moe)[0]
    expected = {**DENSE_SPECS, **FFN_SPECS[moe]}
    params = {path_of(p)[:-1]: x for p, x in jax.tree_util.tree_flatten_with_path(rs.state[0])[0]}
    opt = jax.tree_util.tree_flatten_with_path(rs.state[1])[0]
    for path, spec in expected.items():
        assert params[path].sharding.spec == spec, path
        assert len(params[path].sharding.device_set) == 8
        moments = [x for p, x in opt if path_of(p)[-len(path) - 1 : -1] == path]
        assert len(moments) == 2, path  # AdamW mu and nu
        assert all(m.sharding.spec == spec for m in moments), path
    assert params[("layers", "blocks", 0, "attn", "wq")].shape[0] == 2  # stacked layers
    assert rs.batch_sharding.spec == P(("data", "fsdp", "expert"), None)


@pytest.mark.parametrize("mesh_name", ["fsdp8", "data2-expert4-moe"])
def test_memory_estimate_tracks_compiled(mesh_name):
    rs, step = run_steps(mesh_name, MESHES[mesh_name][1])[:2]
    config = tiny(MESHES[mesh_name][1], **MESHES[mesh_name][0])
    est = memory.estimate(run_spec(config), rs.state, rs.mesh, rs.rules)
    xla = memory.compiled_bytes(step)
    # Parameters and optimiser state are exact: the step's arguments are them plus the batch.
    batch = config.data.batch_size // 8 * (config.data.seq_len + 1) * 4
    assert (
        abs(est["params"] + est["optimizer"] + batch - xla["arguments"]) < 0.01 * xla["arguments"]
    )
    assert 0.7 < est["total"] / xla["total"] < 1.4, (est, xla)


def test_memory_estimate_keeps_no_scores_with_fused_attention(monkeypatch):
    """With cuDNN attention (bf16 on an NVIDIA GPU) the estimate drops the (t x t) scores."""
    c = tiny()
    c.model.dtype = "bfloat16"
    mesh, rules = sharding.single_device_mesh(), sharding.DEFAULT_RULES
    m = model_spec(c.model)
    xla = [memory.layer_bytes(m, 0, t, mesh, rules)["attention"] for t in (64, 128)]
    assert xla[1] == 2 * xla[0]  # grows with the sequence: scores and probabilities
    gpu = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])
    m = model_spec(c.model)  # the backend is resolved with the spec: cuDNN here
    fused = [memory.layer_bytes(m, 0, t, mesh, rules)["attention"] for t in (64, 128)]
    assert fused[0] == fused[1] == c.model.n_heads * 4  # one float32 log-sum-exp per head
    c.model.attention = "xla"  # asked for by name: scores again
    assert memory.layer_bytes(model_spec(c.model), 0, 64, mesh, rules)["attention"] == xla[0]


def _compiled_step_and_jaxpr(shape: dict, moe: bool, dtype: str = "float32"):
    """The train step of the tiny model on mesh ``shape`` (optimised HLO text) and the
    model's forward pass (jaxpr)."""
    config = tiny(moe, **shape)
    config.model.dtype = dtype
    spec = run_spec(config, num_devices=math.prod(shape.values()))
    rs = build_run_state(spec)
    b, t = config.data.batch_size, config.data.seq_len + 1
    abstract = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rs.batch_sharding)
    fn = trainer.make_train_step(rs.graphdef, spec.train)
    with jax.set_mesh(rs.mesh), sharding.axis_rules(rs.rules):
        jitted = jax.jit(fn, in_shardings=(rs.state_shardings, rs.batch_sharding))
        hlo = jitted.lower(rs.state, abstract).compile().as_text()
        graphdef, params = nnx.split(nnx.merge(rs.graphdef, rs.state)[0])
        jaxpr = jax.make_jaxpr(lambda p, tokens: nnx.merge(graphdef, p)(tokens))(params, abstract)
    return hlo, jaxpr


def _collectives(hlo: str) -> dict[str, int]:
    ops = re.findall(r" (all-to-all|collective-permute|all-gather|all-reduce)(?:-start)?\(", hlo)
    return {op: ops.count(op) for op in set(ops)}


def _shard_map_operands(jaxpr) -> list[list[tuple]]:
    """``(aval, in_spec)`` of the operands of every ``shard_map`` in ``jaxpr`` and its
    sub-jaxprs."""
    found = [
        list(zip([v.aval for v in eqn.invars], eqn.params["in_specs"], strict=True))
        for eqn in jaxpr.eqns
        if eqn.primitive.name == "shard_map"
    ]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found += _shard_map_operands(sub)
    return found


@pytest.mark.parametrize(
    "shape", [dict(data=2, fsdp=2, tensor=2), dict(data=2, fsdp=4), dict(fsdp=2, expert=4)]
)
def test_dense_step_on_a_mesh_moves_no_tokens_between_shards(shape, capfd):
    """Data/FSDP/tensor parallel dense step: no all-to-all or collective-permute (the
    embedding lookup on a sharded table and a fused gated matmul concatenated along the
    tensor-sharded axis made them), and no involuntary full rematerialisation."""
    hlo, _ = _compiled_step_and_jaxpr(shape, moe=False)
    found = _collectives(hlo)
    assert not found.get("all-to-all") and not found.get("collective-permute"), found
    assert found.get("all-gather") and found.get("all-reduce")  # FSDP and data parallel
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_moe_step_on_a_mesh_exchanges_bf16_expert_weights_and_only_tokens(capfd):
    """(fsdp, expert, tensor) = (2, 2, 2), bfloat16: the expert weights enter the MoE
    ``shard_map`` in the compute dtype (only the router logits are float32), split over
    experts and over their hidden dimension (tensor-parallel experts), tokens move by
    all-to-all only, and nothing is rematerialised."""
    hlo, jaxpr = _compiled_step_and_jaxpr(
        dict(fsdp=2, expert=2, tensor=2), moe=True, dtype="bfloat16"
    )
    operands = _shard_map_operands(jaxpr.jaxpr)
    assert operands
    for layer in operands:
        dtypes = [str(aval.dtype) for aval, _ in layer]
        assert dtypes == ["bfloat16", "float32"] + ["bfloat16"] * 3, dtypes  # x, logits, w
        weight_specs = {tuple(spec) for _, spec in layer[2:]}
        # w1/w3 (E, d, f) and w2 (E, f, d): experts over "expert", f over "tensor".
        assert weight_specs == {("expert", None, "tensor"), ("expert", "tensor", None)}
    found = _collectives(hlo)
    assert found.get("all-to-all") and not found.get("collective-permute"), found
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_rules_in_config_choose_the_sharding():
    c = tiny(fsdp=8)
    rules = dict(sharding.parse_rules(c.mesh.rules))
    rules.update(embed=None, mlp="fsdp")  # FSDP over the FFN hidden dim instead of embed
    c.mesh.rules = [[k, v] for k, v in rules.items()]
    spec = run_spec(c)
    rs = build_run_state(spec, sharding.make_mesh(spec.mesh.shape))
    w1 = rs.state[0]["layers"]["blocks"][0]["ffn"]["w1"].get_value()
    assert w1.sharding.spec == P(None, None, "fsdp")
    assert w1.sharding.shard_shape(w1.shape) == (2, 64, w1.shape[-1] // 8)


@pytest.mark.parametrize(
    "shape, model, message",
    [
        (dict(data=2, fsdp=2), {}, r"mesh.shape=.* multiplies to 4 but there are 8 devices"),
        (dict(data=-1, fsdp=-1), {}, r"mesh.shape: at most one axis may be -1"),
        (dict(data=3, fsdp=-1), {}, r"fixed axes multiply to 3, which does not divide the 8"),
        (
            dict(tensor=8),
            {},
            r"model.n_heads=4 is not divisible by the 8-way sharding of "
            r"logical axis 'heads'; change model.n_heads or mesh.shape",
        ),
        (
            dict(fsdp=8),
            {"model.d_model": 36, "model.n_heads": 2, "model.n_kv_heads": 2},
            r"model.d_model=36 is not divisible by the 8-way sharding of logical axis 'embed'",
        ),
    ],
)
def test_bad_mesh_is_one_clear_line(shape, model, message):
    problems = validate_config(set_fields(tiny(**shape), model))
    assert any(re.search(message, p) for p in problems), problems
    assert all("\n" not in p for p in problems)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"initialize": "sometimes"}, r"distributed.initialize='sometimes' is unknown"),
        ({"num_processes": 2, "process_id": 2}, r"distributed.process_id=2 must be -1 .* \[0, "),
        ({"coordinator_address": "localhost"}, r"must look like host:port"),
        ({"timeout_s": 0}, r"distributed.timeout_s=0 must be positive"),
        ({"initialize": "never", "num_processes": 4}, r"'never' contradicts"),
    ],
)
def test_bad_distributed_fields(overrides, message):
    cfg = set_fields(get_config("swiglu,size=tiny").distributed, overrides)
    problems = distributed.config_problems(cfg)
    assert len(problems) == 1 and re.search(message, problems[0]), problems
    with pytest.raises(ConfigError, match=message):
        distributed.initialize(cfg)


@pytest.mark.parametrize(
    "mode, fields, env, expected",
    [
        ("auto", {}, {}, False),
        ("auto", {}, {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False),
        ("auto", {}, {"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, True),
        ("auto", {}, {"TPU_WORKER_HOSTNAMES": "t1,t2"}, True),
        ("auto", {}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ("auto", {"num_processes": 2}, {}, True),
        ("always", {}, {}, True),
        ("never", {}, {"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, False),
    ],
)
def test_when_to_initialize(mode, fields, env, expected):
    cfg = set_fields(get_config("swiglu,size=tiny").distributed, {"initialize": mode, **fields})
    assert distributed.should_initialize(cfg, env)[0] is expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
    """This environment with ``devices`` simulated CPU devices per process."""
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
    }


def train_cmd(workdir, *overrides) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config=configs/base.py:swiglu,size=tiny",
        f"--workdir={workdir}",
        *[f"--config.{o}" for o in overrides],
    ]


def test_unreachable_coordinator_times_out_with_one_line(tmp_path):
    workdir = tmp_path / "run"
    cmd = train_cmd(
        workdir,
        f"distributed.coordinator_address=localhost:{free_port()}",
        "distributed.num_processes=2",
        "distributed.process_id=1",
        "distributed.timeout_s=2",
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=cpu_env(4), capture_output=True, text=True, timeout=120
    )
    assert time.perf_counter() - t0 < 60
    assert proc.returncode == distributed.TIMEOUT_EXIT_CODE, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert (
        "did not finish within distributed.timeout_s=2: process 1 of 2 could not reach the "
        "coordinator localhost:" in errors[0]
    )
    assert not workdir.exists()


TWO_PROC = (
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.final_eval=False",
    "train.checkpoint_every=3",
)


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def restored_leaves(workdir, shape: dict | None):
    """The run's last checkpoint restored in this process onto ``shape`` (None: one device)."""
    full = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **(shape or {})}
    spec = load_spec(str(workdir), full)
    mesh = sharding.make_mesh(full) if shape else sharding.single_device_mesh()
    rs = build_run_state(spec, mesh)
    ckpt = Checkpointer(str(workdir), every=3, keep=2)
    try:
        state, meta, step = ckpt.restore(rs.state)
    finally:
        ckpt.close()
    return state, step


def two_processes(workdir, port: int, devices: int, *overrides) -> list[subprocess.Popen]:
    """Start ``train.py`` with ``overrides`` as processes 0 and 1 of a 2-process job, each with
    ``devices`` simulated CPU devices."""
    return [
        subprocess.Popen(
            train_cmd(
                workdir,
                *overrides,
                f"distributed.coordinator_address=localhost:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
            ),
            cwd=ROOT,
            env=cpu_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def same_losses_as_one_process(two, one, devices: int, overrides: tuple[str, ...]) -> None:
    """Train ``overrides`` in one process with ``devices`` devices into ``one``; its loss at
    every step equals the multi-process run's in ``two``."""
    proc = subprocess.run(
        train_cmd(one, *overrides),
        cwd=ROOT,
        env=cpu_env(devices),
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(two), losses(one)
    steps = next(int(o.split("=")[1]) for o in overrides if o.startswith("train.steps="))
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one_and_restore_on_another_mesh(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    port = free_port()
    t0 = time.perf_counter()
    procs = two_processes(two, port, 4, *TWO_PROC)
    outs = [p.communicate(timeout=500) for p in procs]
    wall = time.perf_counter() - t0
    print(f"two-process run: {wall:.1f} s wall")
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "INFO run swiglu-tiny" not in outs[1][1]  # info logs on process 0 only
    rows = read_metrics(two)
    start = [r for r in rows if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["devices"] == 8  # one writer, the global mesh
    assert start[0]["memory_estimate"]["total"] > 0 and start[0]["memory_compiled"]["total"] > 0

    same_losses_as_one_process(two, one, 8, TWO_PROC)
    # Validation, bits per byte included (bytes are counted once, not once per process).
    val = [[r for r in read_metrics(w) if "val_loss" in r] for w in (two, one)]
    assert [r["step"] for r in val[0]] == [r["step"] for r in val[1]] == [3, 6]
    for r2, r1 in zip(*val, strict=True):
        assert r2["val_bytes"] == r1["val_bytes"] > 0 and r2["val_tokens"] == r1["val_tokens"]
        assert r2["val_bits_per_byte"] == pytest.approx(r1["val_bits_per_byte"], rel=1e-5)

    state, step = restored_leaves(two, dict(data=2, fsdp=2, tensor=2))
    ref, ref_step = restored_leaves(one, None)
    assert step == ref_step == 6
    wq = state[0]["layers"]["blocks"][0]["attn"]["wq"].get_value()
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len(wq.sharding.device_set) == 8
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(ref), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


PREEMPT = (
    "train.steps=60",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.final_eval=False",
    "train.checkpoint_every=1000",
    "mesh.shape.data=1",
    "mesh.shape.tensor=2",
)


@pytest.mark.slow
def test_tensor_across_processes_and_sigterm_to_one_of_them(tmp_path):
    """Two processes x one device with ``tensor=2`` across them (each feeds the whole
    batch): SIGTERM to process 1 only makes both save the same step and exit 0 within 60 s;
    the rerun resumes, and the losses of all steps equal one process with two devices."""
    two, one = tmp_path / "two", tmp_path / "one"
    procs = two_processes(two, free_port(), 1, *PREEMPT)
    deadline = time.time() + 300
    while not any(s >= 3 for s in losses(two)) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    t0 = time.time()
    outs = [p.communicate(timeout=120) for p in procs]
    assert time.time() - t0 < 60
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    saved = [re.findall(r"saved a checkpoint at step (\d+), exiting", err) for _, err in outs]
    assert saved[0] and saved[0] == saved[1], [err[-2000:] for _, err in outs]
    stop = int(saved[0][0])
    assert 3 <= stop < 60
    rows = read_metrics(two)
    assert [r["step"] for r in rows if r.get("event") == "preempted"] == [stop]

    rerun = two_processes(two, free_port(), 1, *PREEMPT)
    outs = [p.communicate(timeout=300) for p in rerun]
    for p, (_, err) in zip(rerun, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert re.search(rf"resumed \S+ from step {stop}\b", outs[0][1]), outs[0][1][-2000:]

    same_losses_as_one_process(two, one, 2, PREEMPT)
