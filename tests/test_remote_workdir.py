"""Workdirs at object-store URLs (issue 17): ``gs://`` stays a URL from the command line to
orbax, and a run trains, resumes, evaluates and samples in a ``gs://`` workdir served by a
fake GCS without a network (``tests/fake_gcs.py``); the local behaviour is unchanged."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import struct

import pytest
from etils import epath

from ffn_jax import cli, files, sweep
from ffn_jax.checkpoint import verify_step
from ffn_jax.evaluate import evaluate_run, sample
from ffn_jax.metrics import METRICS_FILE, MetricWriter, TensorBoardScalars, read_metrics
from ffn_jax.run import CHECKPOINT_DIR, CONFIG_FILE, EVAL_FILE, latest_step
from ffn_jax.spec import to_dict
from tests import fake_gcs
from tests.helpers import tiny, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """``gs://`` served from ``tmp_path/gcs`` for this test; yields that directory."""
    root = tmp_path / "gcs"
    fake_gcs.install(root, monkeypatch)
    yield root
    fake_gcs.forget_filesystems()


def test_a_url_workdir_stays_a_url_through_the_cli(monkeypatch, tmp_path, gcs):
    assert files.normalize_workdir("gs://bucket/run") == "gs://bucket/run"
    assert files.normalize_workdir("s3://bucket/a/b/") == "s3://bucket/a/b/"
    monkeypatch.chdir(tmp_path)
    assert files.normalize_workdir("runs/x") == str(tmp_path / "runs" / "x")  # as before
    seen = []
    monkeypatch.setattr(
        "ffn_jax.trainer.train_and_evaluate", lambda spec, workdir: seen.append(workdir) or {}
    )
    cli.run_train(tiny(), "gs://bucket/run")
    assert seen == ["gs://bucket/run"]
    assert not (tmp_path / "gs:").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("gcsfs") is not None
    or importlib.util.find_spec("tensorflow") is not None,
    reason="a gs:// backend is installed",
)
def test_a_gs_workdir_without_its_backend_is_one_line_with_the_fix():
    files.check_workdir_backend("/tmp/local/run")  # local: nothing to check
    fix = r"--workdir=gs://b/run: .*gcsfs.*pip install -e '.\[gcs\]'"
    with pytest.raises(ValueError, match=fix):
        files.check_workdir_backend("gs://b/run")


@pytest.mark.parametrize("where", ["local", "url"])
def test_json_writes_leave_one_whole_file(where, tmp_path, gcs):
    folder = str(tmp_path / "local" / "run") if where == "local" else "gs://bucket/run"
    on_disk = tmp_path / "local" / "run" if where == "local" else gcs / "bucket" / "run"
    files.write_json_atomic(epath.Path(folder) / "a.json", {"x": 1})
    files.write_json_atomic(epath.Path(folder) / "a.json", {"x": 2})
    assert files.read_json(f"{folder}/a.json") == {"x": 2}
    assert os.listdir(on_disk) == ["a.json"]  # no temporary file left behind
    (on_disk / "bad.json").write_text('{"x": ')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON"):
        files.read_json(f"{folder}/bad.json")


def test_metrics_at_a_url_are_uploaded_whole_and_kept_on_resume(gcs, monkeypatch):
    on_disk = gcs / "bucket" / "run" / METRICS_FILE
    writer = MetricWriter("gs://bucket/run", enabled=True)
    writer.write(1, {"loss": 3.0})
    assert on_disk.read_text() == '{"step": 1, "loss": 3.0}\n'  # the first row at once
    writer.write(2, {"loss": 2.5})
    assert on_disk.read_text().count("\n") == 1  # the next upload is not due yet
    writer.close()
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1, 2]

    with on_disk.open("a") as f:
        f.write('{"step": 3, "lo')  # a torn row (a local copy, or a foreign writer)
    monkeypatch.setattr("ffn_jax.metrics.UPLOAD_EVERY_S", 0.0)
    writer = MetricWriter("gs://bucket/run", enabled=True)  # what a resumed run opens
    writer.write(3, {"loss": 2.0})
    writer.write(4, {"loss": 1.5})  # uploaded at once: UPLOAD_EVERY_S=0
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1, 2, 3, 4]
    writer.close()
    tb = [r for f in (gcs / "bucket" / "run" / "tb").iterdir() for r in records(f.read_bytes())]
    assert len(tb) == 2 + 4  # each writer's file-version event, one loss event per row


def test_an_interrupted_save_at_a_url_is_not_the_latest_step(gcs):
    """On an object store orbax writes into the step's directory and commits it last
    (``commit_success.txt``): a directory without the marker is an interrupted save."""
    ckpts = gcs / "bucket" / "run" / CHECKPOINT_DIR
    (ckpts / "2").mkdir(parents=True)
    (ckpts / "2" / "commit_success.txt").write_text("")
    (ckpts / "4" / "state").mkdir(parents=True)  # cut short before its marker
    assert latest_step("gs://bucket/run") == 2


def records(data: bytes) -> list[bytes]:
    """The payloads of a TFRecord file, every length and CRC checked."""
    from tensorboardX.record_writer import masked_crc32c

    out, i = [], 0
    while i < len(data):
        header = data[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8 : i + 12])[0] == masked_crc32c(header)
        payload = data[i + 12 : i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n : i + 16 + n])[0] == masked_crc32c(payload)
        out.append(payload)
        i += 16 + n
    return out


@pytest.mark.parametrize("where", ["local", "url"])
def test_tensorboard_events_match_tensorboardx(where, tmp_path, gcs):
    """Our event file, local or at a URL, holds the records tensorboardX's own writer
    makes for the same events, after the file-version event TensorBoard expects first."""
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import scalar

    logdir = str(tmp_path / "tb") if where == "local" else "gs://bucket/run/tb"
    tb = TensorBoardScalars(logdir)
    tb.write(3, {"loss": 2.5, "lr": 1e-3})
    tb.close()
    (path,) = epath.Path(logdir).iterdir()
    assert path.name.startswith("events.out.tfevents.")
    ours = records(path.read_bytes())
    first = event_pb2.Event.FromString(ours[0])  # pyright: ignore[reportAttributeAccessIssue]
    assert first.file_version == "brain.Event:2"
    events = [event_pb2.Event.FromString(r) for r in ours[1:]]  # pyright: ignore[reportAttributeAccessIssue]
    assert [(e.step, e.summary.value[0].tag) for e in events] == [(3, "loss"), (3, "lr")]
    assert events[0].summary.value[0].simple_value == 2.5

    (tmp_path / "ref").mkdir()
    ref = EventsWriter(str(tmp_path / "ref" / "events"))
    for e in events:
        ref.write_event(
            event_pb2.Event(  # pyright: ignore[reportAttributeAccessIssue]
                wall_time=e.wall_time,
                step=e.step,
                summary=scalar(e.summary.value[0].tag, e.summary.value[0].simple_value),
            )
        )
    ref.close()
    (ref_file,) = (tmp_path / "ref").iterdir()
    assert records(ref_file.read_bytes())[1:] == ours[1:]


@pytest.mark.slow
def test_a_run_in_a_gs_workdir_trains_resumes_evaluates_and_samples(gcs, monkeypatch):
    workdir = "gs://bucket/runs/tiny"
    on_disk = gcs / "bucket" / "runs" / "tiny"
    monkeypatch.chdir(on_disk.parent.parent.parent)  # a stray local write would land here
    fast = {
        "train.warmup_steps": 1,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.final_eval": False,
        "train.checkpoint_every": 2,
        "train.final_val_batches": 2,
        "data.tokenizer": "bpe",  # its run copy, tokenizer.json, goes into the workdir too
        "data.vocab_size": 512,
    }
    first = train(tiny(**{**fast, "train.steps": 4}), workdir)
    assert first["step"] == 4
    config = json.loads(epath.Path(workdir, "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["model"]["ffn"] == "swiglu"
    assert latest_step(workdir) == 4
    assert verify_step(f"{workdir}/checkpoints", 4) is None  # the manifest, written there
    assert (on_disk / "checkpoints" / "4" / "commit_success.txt").exists()  # object-store commit
    assert (on_disk / "tokenizer.json").exists()

    second = train(tiny(**{**fast, "train.steps": 6}), workdir)  # resumes from step 4
    assert second["step"] == 6
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r.get("event") for r in rows if "event" in r] == ["start", "end", "end"]

    scores = evaluate_run(workdir, splits=("validation",))
    assert files.read_json(f"{workdir}/eval.json")["validation"]["loss"] == pytest.approx(
        scores["validation"]["loss"]
    )
    assert sample(workdir, "ROMEO:", max_new_tokens=4).startswith("ROMEO:")
    assert sorted(os.listdir(gcs)) == ["bucket"]
    assert not any(name.startswith("gs:") for name in os.listdir(os.getcwd()))
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


def fake_run(sweep_dir, variant: str, seed: int, test_loss: float) -> None:
    """A finished run of a sweep, as the report reads it (config, a checkpoint step, eval
    and metrics), written straight into ``sweep_dir`` (the fake bucket's directory)."""
    d = sweep_dir / f"{variant}-s{seed}"
    (d / CHECKPOINT_DIR / "10").mkdir(parents=True)
    (d / CHECKPOINT_DIR / "10" / "commit_success.txt").write_text("")  # orbax's, on GCS
    c = tiny(**{"model.ffn": variant, "train.steps": 10, "train.warmup_steps": 1})
    group = {"variant": variant, "seed": seed}
    (d / CONFIG_FILE).write_text(json.dumps(to_dict(c) | {"seed": seed, "group": group}))
    scores = {"loss": test_loss, "perplexity": math.exp(test_loss), "bits_per_byte": 2.9}
    scores |= {"tokens": 1000, "bytes": 1000}
    ev = {"step": 10, "validation": scores, "test": scores}
    (d / EVAL_FILE).write_text(json.dumps(ev))
    rows = [
        {"step": 5, "loss": 2.5, "tokens": 640, "val_loss": 2.6, "tokens_per_s": 1e3, "mfu": 0.1},
        {"step": 10, "loss": 2.2, "tokens": 1280, "val_loss": 2.3, "tokens_per_s": 1e3, "mfu": 0.1},
        {"step": 10, "event": "end", "train_time_s": 1.0, "wall_s": 3.0, "train_s": 1.0},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_sweep_report_is_written_into_a_gs_sweep_dir(gcs):
    on_disk = gcs / "bucket" / "sweep"
    for seed, (relu, swiglu) in enumerate([(2.3, 2.2), (2.35, 2.2), (2.3, 2.25)]):
        fake_run(on_disk, "relu", seed, relu)
        fake_run(on_disk, "swiglu", seed, swiglu)
    (on_disk / "sweep_timing.json").write_text('{"wall_s": 60.0}')
    workdir = "gs://bucket/sweep"
    assert sweep.is_sweep_dir(workdir)
    assert sweep.run_dirs(workdir)[0] == "gs://bucket/sweep/relu-s0"
    table = sweep.evaluate_sweep(workdir)
    assert "| relu |" in table and "| swiglu |" in table
    assert "Sweep wall time 1.0 min over 6 runs" in (on_disk / "results.md").read_text()
    for name in ("results.md", "results.csv", "runs.csv", "loss_curves.png", "forest.png"):
        assert (on_disk / name).stat().st_size > 0, name
    assert (on_disk / "forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(on_disk / "results.csv", newline="") as f:
        assert {r["variant"] for r in csv.DictReader(f)} == {"relu", "swiglu"}
