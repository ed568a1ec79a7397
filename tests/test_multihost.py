"""Multi-host input (issue 17): which rows each process feeds, read from the batch sharding,
on the 8 simulated CPU devices with made-up process assignments; and sampling from a run in
every process of a 2-process job."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import NamedSharding

from ffn_jax import sharding
from ffn_jax.data import batch_block, to_global
from tests.test_scale import ROOT, cpu_env, free_port, two_processes

SHAPE = dict(data=1, fsdp=1, expert=1, tensor=1)


def batch_sharding(**shape) -> NamedSharding:
    mesh = sharding.make_mesh({**SHAPE, **shape})
    spec = sharding.logical_to_spec(("batch", None), sharding.DEFAULT_RULES)
    return NamedSharding(mesh, spec)


def processes(s: NamedSharding, axis: str) -> list[set]:
    """Made-up processes: one per index of mesh ``axis`` (each holds that slice's devices)."""
    names = list(s.mesh.axis_names)
    devices = np.moveaxis(s.mesh.devices, names.index(axis), 0)
    return [set(d.flat) for d in devices]


def test_one_process_feeds_the_whole_batch():
    assert batch_block(batch_sharding(data=2, tensor=4), 16) == (0, 1)


def test_processes_along_the_batch_axis_feed_their_block():
    s = batch_sharding(data=4, tensor=2)
    blocks = [batch_block(s, 16, p) for p in processes(s, "data")]
    assert blocks == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_tensor_replicas_across_processes_feed_the_same_rows():
    """Processes along ``tensor`` (issue 17's crash): each holds every row, so each feeds
    the whole batch, not a disjoint half."""
    s = batch_sharding(data=4, tensor=2)
    assert [batch_block(s, 16, p) for p in processes(s, "tensor")] == [(0, 1), (0, 1)]
    s = batch_sharding(data=2, fsdp=2, tensor=2)  # 2 x 2 processes: data x tensor
    mesh = s.mesh.devices  # (data, fsdp, expert, tensor) = (2, 2, 1, 2)
    grid = [[set(mesh[d, :, :, t].flat) for t in range(2)] for d in range(2)]
    assert [[batch_block(s, 16, p) for p in row] for row in grid] == [
        [(0, 2), (0, 2)],
        [(1, 2), (1, 2)],
    ]


def test_interleaved_devices_are_one_clear_error():
    s = batch_sharding(data=8)
    devices = s.mesh.devices.flat
    with pytest.raises(ValueError, match=r"not one aligned block; order the mesh"):
        batch_block(s, 16, [devices[0], devices[2]])


def test_to_global_with_the_global_row_count():
    s = batch_sharding(data=2, tensor=4)
    rows = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    out = to_global(rows, s.mesh, s.spec, global_rows=16)
    assert out.shape == (16, 3) and out.sharding.is_equivalent_to(s, 2)
    np.testing.assert_array_equal(np.asarray(out), rows)


@pytest.mark.slow
def test_every_process_of_a_job_samples_the_same_text(tmp_path):
    """``eval.py --sample`` run by both processes of a 2-process job (two CPU devices each)
    after a 2-process training run: each restores the model onto its own first device
    (``jax.devices()[0]`` is process 0's) and prints the same greedy continuation."""
    workdir = tmp_path / "run"
    train = two_processes(
        workdir,
        free_port(),
        2,
        "train.steps=4",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.final_eval=False",
        "train.checkpoint_every=4",
    )
    for p, (_, err) in zip(train, [p.communicate(timeout=500) for p in train], strict=True):
        assert p.returncode == 0, err[-3000:]
    port = free_port()
    evals = [
        subprocess.Popen(
            [
                sys.executable,
                "eval.py",
                f"--workdir={workdir}",
                "--sample=ROMEO:",
                "--max_new_tokens=12",
                f"--distributed.coordinator_address=localhost:{port}",
                "--distributed.num_processes=2",
                f"--distributed.process_id={i}",
            ],
            cwd=ROOT,
            env=cpu_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240) for p in evals]
    finally:  # a hang (what sampling on process 0's device did) leaves no process behind
        for p in evals:
            p.kill()
    for p, (_, err) in zip(evals, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "process 0 of 2, 2 local / 4 global devices" in outs[0][1]  # one job, joined
    texts = [  # gloo's connection lines aside
        "\n".join(x for x in out.strip().splitlines() if not x.startswith("[Gloo]"))
        for out, _ in outs
    ]
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:"), texts
    assert len(texts[0]) > len("ROMEO:")
