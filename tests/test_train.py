"""The training loop, checkpoints, preemption, eval.py and config validation."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.base import get_config
from ffn_jax import data
from ffn_jax.configuration import ConfigError, validate_config
from ffn_jax.metrics import read_metrics
from tests.helpers import tiny, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_json(*parts):
    with open(os.path.join(*map(str, parts))) as f:
        return json.load(f)


def read_text(*parts):
    with open(os.path.join(*map(str, parts))) as f:
        return f.read()


def losses(workdir):
    """step -> loss of the last logged training row for that step."""
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def run_cli(*args, timeout=300, **popen):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **popen
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny config trained to the end, scoring the whole validation split at the end."""
    workdir = str(tmp_path_factory.mktemp("tiny"))
    result = train(tiny(**{"train.eval_batches": 0}), workdir)
    return workdir, result


def test_tiny_trains_below_unigram_entropy(trained):
    workdir, result = trained
    c = get_config("swiglu,size=tiny")
    prep = data.prepare(c.data, workdir)
    counts = np.bincount(np.asarray(prep.splits["train"].tokens), minlength=257).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats per token, ~3.3 for Shakespeare bytes
    assert result["val_loss"] < unigram - 0.7, (result["val_loss"], unigram)
    rows = read_metrics(workdir)
    assert rows[0]["event"] == "start" and rows[-1]["event"] == "end"
    logged = [r for r in rows if "loss" in r]
    assert logged[-1]["loss"] < logged[0]["loss"] - 2.0
    for key in (
        "step",
        "tokens",
        "loss",
        "grad_norm",
        "lr",
        "step_time_s",
        "tokens_per_s",
        "mfu",
        "data_time_s",
    ):
        assert key in logged[-1]
    # Input overlaps compute: fetching batches takes a small part of the step time.
    assert all(0 < r["data_time_s"] < 0.5 * r["step_time_s"] for r in logged), logged
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
    cfg = read_json(workdir, "config.json")
    assert cfg["model"]["vocab_size"] == 384  # 257 byte tokens padded to a multiple of 128


def test_provenance_is_recorded(trained):
    """run.json and the start event say which code, libraries and devices made the run."""
    import jax

    workdir, _ = trained
    prov = read_json(workdir, "run.json")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", prov["git_commit"]), prov["git_commit"]
    assert prov["jax"] == jax.__version__ and prov["device_count"] == jax.device_count()
    assert prov["platform"] == "cpu" and prov["flax"] and prov["orbax"]
    start = read_metrics(workdir)[0]
    assert start["event"] == "start" and start["provenance"]["git_commit"] == prov["git_commit"]
    assert read_json(workdir, "config.json")["group"] == {"variant": "swiglu-tiny", "seed": 0}


def test_eval_in_fresh_process_matches_trainer(trained):
    workdir, result = trained
    proc = run_cli("eval.py", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = read_json(workdir, "eval.json")
    assert ev["step"] == 150
    np.testing.assert_allclose(ev["validation"]["loss"], result["val_loss"], rtol=1e-5)
    assert ev["validation"]["tokens"] == result["val_tokens"]
    assert ev["validation"]["bytes"] > 0 and ev["test"]["bytes"] > 0
    np.testing.assert_allclose(
        ev["test"]["bits_per_byte"],
        ev["test"]["loss"] * ev["test"]["tokens"] / (np.log(2) * ev["test"]["bytes"]),
        rtol=1e-6,
    )


def test_sample_generates_text(trained):
    workdir, _ = trained
    proc = run_cli(
        "eval.py",
        f"--workdir={workdir}",
        "--sample=KING",
        "--max_new_tokens=20",
        "--temperature=0.8",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout.strip()
    assert text.startswith("KING") and len(text) > len("KING")


def test_resume_after_kill_reproduces_losses(tmp_path):
    overrides = {
        "train.steps": 40,
        "train.log_every": 1,
        "train.checkpoint_every": 20,
        "train.eval_every": 0,
        "train.warmup_steps": 5,
    }
    straight = str(tmp_path / "straight")
    train(tiny(**overrides), straight)
    # A run that dies after its step-20 checkpoint, then is restarted.
    resumed = str(tmp_path / "resumed")
    args = ["train.py", "--config=configs/base.py:swiglu,size=tiny", f"--workdir={resumed}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = os.path.join(resumed, "checkpoints", "20")
    deadline = time.time() + 240
    while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = losses(resumed)
    assert 20 in done
    assert run_cli(*args).returncode == 0
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert a == b  # bitwise-identical losses, including the steps after the restart


def test_sigterm_saves_checkpoint_and_resume_continues(tmp_path):
    workdir = str(tmp_path / "run")
    args = [
        "train.py",
        "--config=configs/base.py:swiglu,size=tiny",
        f"--workdir={workdir}",
        "--config.train.steps=3000",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=1000",
        "--config.train.eval_every=0",
    ]
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(losses(workdir)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert len(steps) == 1 and 5 <= steps[0] < 3000
    preempted = [r for r in read_metrics(workdir) if r.get("event") == "preempted"]
    assert preempted and preempted[0]["step"] == steps[0]
    # Resume to a shorter total so the test stays fast: the run continues from the checkpoint.
    proc = run_cli(
        *args[:3],
        f"--config.train.steps={steps[0] + 5}",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=1000",
        "--config.train.eval_every=0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert max(losses(workdir)) == steps[0] + 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.lr": -1.0}, r"train.lr=-1.0 must be positive"),
        (
            {"data.batch_size": 12},
            r"data.batch_size=12 is not divisible by the data-parallel size 8",
        ),
        ({"train.warmup_steps": 500}, r"train.warmup_steps=500 must be in \[0, train.steps=150\)"),
        ({"mesh.shape.data": 3}, r"mesh.shape=.* multiplies to 3 but there are 8 devices"),
    ],
)
def test_bad_config_values(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(tiny(**overrides), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_all_problems_reported_together():
    problems = validate_config(tiny(**{"train.lr": 0.0, "model.ffn": "nope", "train.steps": 5}))
    assert any("train.lr" in p for p in problems)
    assert any("model.ffn='nope'" in p for p in problems)
    assert any("train.warmup_steps" in p for p in problems)


def test_mistyped_override_is_an_error(tmp_path):
    proc = run_cli(
        "train.py",
        "--config=configs/base.py:swiglu,size=tiny",
        f"--workdir={tmp_path}/run",
        "--config.train.lrr=0.1",
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr
    assert not os.path.exists(tmp_path / "run")


def test_unknown_size_preset_is_an_error(tmp_path):
    proc = run_cli(
        "train.py", "--config=configs/base.py:swiglu,size=huge", f"--workdir={tmp_path}/run"
    )
    assert proc.returncode != 0 and "size='huge' is not a size preset" in proc.stderr


def test_incompatible_workdir_is_refused(trained, tmp_path):
    workdir, _ = trained
    before = read_text(workdir, "metrics.jsonl")
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(model.ffn"):
        train(tiny(**{"model.ffn": "gelu", "train.eval_batches": 0}), workdir)
    assert read_text(workdir, "metrics.jsonl") == before


def test_resume_false_moves_old_run_aside(tmp_path):
    workdir = str(tmp_path / "run")
    c = tiny(**{"train.steps": 20, "train.warmup_steps": 2, "train.eval_every": 0})
    train(c, workdir)
    c.train.resume = False
    c.model.ffn = "relu"
    train(c, workdir)
    aside = [d for d in os.listdir(tmp_path) if d.startswith("run.old-")]
    assert len(aside) == 1
    assert read_json(tmp_path, aside[0], "config.json")["model"]["ffn"] == "swiglu"
    assert read_json(workdir, "config.json")["model"]["ffn"] == "relu"


def test_corrupt_latest_checkpoint_falls_back_and_finishes(tmp_path, caplog):
    """A broken step 20 falls back to step 10, and the rerun (the same command) trains steps
    11..20 again and saves step 20 anew: the broken one is moved aside, not collided with."""
    workdir = str(tmp_path / "run")
    c = tiny(
        **{
            "train.steps": 20,
            "train.warmup_steps": 2,
            "train.eval_every": 0,
            "train.checkpoint_every": 10,
            "train.log_every": 1,
        }
    )
    train(c, workdir)
    latest = os.path.join(workdir, "checkpoints", "20", "state")
    for root, _, files in os.walk(latest):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    first = losses(workdir)
    train(c, workdir)
    assert any("is unusable" in r.message for r in caplog.records)
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 21)) + list(range(11, 21))  # resumed at 10
    assert rows[-1]["loss"] == first[20]  # the retrained steps repeat the first ones exactly
    assert os.listdir(os.path.join(workdir, "checkpoints", "corrupt"))[0].startswith("20-")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "manifests"))) == [
        "10.json",
        "20.json",
    ]


def test_a_flipped_byte_is_caught_by_the_manifest(tmp_path, caplog):
    """One flipped bit in the array data restores without an error from orbax; the
    checksum manifest catches it, and the model is restored from the older step."""
    from ffn_jax.run import restore, run_is_finished

    workdir = str(tmp_path / "run")
    c = tiny(
        **{
            "train.steps": 4,
            "train.warmup_steps": 1,
            "train.eval_every": 0,
            "train.checkpoint_every": 2,
            "train.final_eval": False,
        }
    )
    train(c, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "4", "state")
    files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.seek(os.path.getsize(biggest) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    assert not run_is_finished(workdir, 4)  # a sweep rerun trains it again, not "skipped"
    assert restore(workdir).step == 2
    assert any("differ from its manifest" in r.message for r in caplog.records)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    args = [
        "train.py",
        "--config=configs/base.py:swiglu,size=tiny",
        f"--workdir={workdir}",
        "--config.train.lr=1e6",
        "--config.train.grad_clip=0",
        "--config.train.warmup_steps=1",
        "--config.train.checkpoint_every=1",
        "--config.train.log_every=1",
        "--config.train.keep_checkpoints=100",
    ]
    proc = run_cli(*args)
    assert proc.returncode == 1
    m = re.search(
        r"training loss is (nan|inf) at step (\d+); stopped. Last good checkpoint: (\d+)",
        proc.stderr,
    )
    assert m, proc.stderr[-2000:]
    bad, kept = int(m.group(2)), int(m.group(3))
    assert kept == bad - 1
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] == kept


def test_profile_window_writes_a_trace(tmp_path):
    workdir = str(tmp_path / "run")
    train(
        tiny(
            **{
                "train.steps": 6,
                "train.warmup_steps": 1,
                "train.eval_every": 0,
                "train.profile_steps": "2:4",
                "train.final_eval": False,
            }
        ),
        workdir,
    )
    traces = [
        f
        for _, _, files in os.walk(os.path.join(workdir, "profile"))
        for f in files
        if f.endswith((".xplane.pb", ".trace.json.gz"))
    ]
    assert traces


def test_dropout_trains_through_the_trainer(tmp_path):
    result = train(
        tiny(
            **{
                "model.dropout": 0.1,
                "train.steps": 12,
                "train.warmup_steps": 2,
                "train.eval_every": 0,
                "train.final_eval": False,
            }
        ),
        str(tmp_path / "run"),
    )
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert result["step"] == 12 and rows[-1]["loss"] < rows[0]["loss"]


def test_eval_of_a_step_that_was_not_saved_lists_the_saved_ones(trained):
    workdir, _ = trained
    proc = run_cli("eval.py", f"--workdir={workdir}", "--step=999")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "holds no checkpoint of step 999; saved steps: [100, 150]" in last, last


def test_a_config_that_matches_no_checkpoint_moves_none_aside(trained, tmp_path):
    """Every step failing to restore is the config's fault, not the checkpoints': they stay
    where they are, and the error (the last line) gives the real cause."""
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(trained[0], workdir)
    cfg = read_json(workdir, "config.json")
    cfg["model"]["d_model"] = 32
    (workdir / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("eval.py", f"--workdir={workdir}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: no checkpoint in {workdir / 'checkpoints'} could be "
        "restored (step 150: ValueError: Requested shape"
    ), last
    assert sorted(os.listdir(workdir / "checkpoints")) == ["100", "150", "manifests"]


def test_the_first_row_after_a_preemption_averages_the_same_steps(tmp_path, monkeypatch):
    """SIGTERM after step 6 with log_every=4: the resumed run's row at step 8 averages
    steps 5..8 (5 and 6 carried in the checkpoint), exactly like the uninterrupted run's.
    An MoE run of two top-1 experts, whose top expert always takes over half the tokens:
    its collapse alarm (2 windows) turns on at step 8 only if the count of the step-4 row
    was carried in the checkpoint too."""
    import signal

    from ffn_jax import data as data_lib

    c = tiny(
        **{
            "train.steps": 10,
            "train.warmup_steps": 1,
            "train.log_every": 4,
            "train.checkpoint_every": 100,
            "train.eval_every": 0,
            "train.final_eval": False,
            "train.collapse_windows": 2,
            "model.moe.num_experts": 2,
            "model.moe.top_k": 1,
        }
    )
    straight = str(tmp_path / "straight")
    train(c, straight)

    real, calls = data_lib.to_global, []

    def to_global_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the batch of step 6: the loop sees the signal after it
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    cut = str(tmp_path / "cut")
    monkeypatch.setattr(data_lib, "to_global", to_global_then_signal)
    assert train(c, cut) == {"step": 6, "preempted": True}
    monkeypatch.setattr(data_lib, "to_global", real)
    train(c, cut)
    rows = {r["step"]: r for r in read_metrics(straight) if "loss" in r}
    resumed = {r["step"]: r for r in read_metrics(cut) if "loss" in r}
    assert sorted(resumed) == sorted(rows) == [4, 8, 10]
    assert [rows[s]["moe/collapse"] for s in (4, 8, 10)] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    timed = ("step_time_s", "tokens_per_s", "mfu", "data_time_s")
    for step in (4, 8, 10):
        want = {k: v for k, v in rows[step].items() if k not in timed}
        assert {k: v for k, v in resumed[step].items() if k not in timed} == want, step


def test_eval_of_a_read_only_run_still_returns_its_scores(trained, monkeypatch, caplog):
    """A run directory eval.py cannot write into (read-only mount, another user's run): the
    scores are computed, returned and printed; eval.json is skipped with a warning."""
    import errno

    from ffn_jax import evaluate

    def read_only(path, obj):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(evaluate, "write_json_atomic", read_only)
    workdir, result = trained
    scores = evaluate.evaluate_run(workdir)
    assert scores["validation"]["loss"] == pytest.approx(result["val_loss"], rel=1e-6)
    assert any("could not write" in r.message and "eval.json" in r.message for r in caplog.records)


def test_final_val_batches_scores_evenly_spaced_validation_batches_and_all_of_test(
    trained, tmp_path
):
    """``train.final_val_batches=3``: the final validation score is the mean over 3 evenly
    spaced batches (the same as ``evaluate_split(max_batches=3)``); test stays complete."""
    import dataclasses

    import jax

    from ffn_jax import evaluate
    from ffn_jax.run import restore

    workdir, _ = trained
    full = evaluate.read_eval(workdir)
    r = restore(workdir)
    spec = dataclasses.replace(r.spec, train=dataclasses.replace(r.spec.train, final_val_batches=3))
    with jax.set_mesh(r.rs.mesh):
        step = evaluate.make_eval_step(r.rs.graphdef, r.rs.state_shardings, r.rs.batch_sharding)
        out = evaluate.score_splits(str(tmp_path), step, r.state, r.step, spec, r.prep, r.rs)
        three = evaluate.evaluate_split(
            step,
            r.state,
            r.prep.splits["validation"],
            spec.data,
            r.rs,
            r.prep.tokenizer.token_bytes,
            max_batches=3,
        )
    assert out["validation"]["batches"] == 3 < full["validation"]["batches"]
    assert out["validation"]["loss"] == pytest.approx(three["loss"], rel=1e-6)
    assert out["test"]["batches"] == full["test"]["batches"]
    assert out["test"]["loss"] == pytest.approx(full["test"]["loss"], rel=1e-6)
    assert evaluate.read_eval(str(tmp_path))["validation"]["batches"] == 3
