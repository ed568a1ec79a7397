"""Faults a user meets: a torn metrics row, two writers on one workdir, a first attempt
that failed before its first checkpoint, a start that cannot fit in memory."""

import json
import os
import subprocess
import sys

import pytest

from ffn_jax import memory
from ffn_jax.metrics import MetricWriter, read_metrics
from ffn_jax.run import WorkdirBusyError, WorkdirLock
from ffn_jax.spec import ConfigError
from tests.helpers import tiny, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(script: str, *flags: str) -> subprocess.CompletedProcess:
    """``python <script> flags...`` from the repository root (train.py: the tiny config)."""
    config = ["--config=configs/base.py:swiglu,size=tiny"] if script == "train.py" else []
    return subprocess.run(
        [sys.executable, script, *config, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_torn_metrics_row_is_skipped_and_cut_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    writer = MetricWriter(str(tmp_path), enabled=True)  # what a resumed run opens
    writer.write(3, {"loss": 2.0})
    writer.close()
    assert path.read_text().splitlines()[-1] == '{"step": 3, "loss": 2.0}'
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_a_corrupt_metrics_row_names_its_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        read_metrics(str(tmp_path))


def test_a_second_writer_is_refused_with_the_holder(tmp_path):
    workdir = str(tmp_path / "run")
    with WorkdirLock(workdir):
        with pytest.raises(
            WorkdirBusyError,
            match=rf"--workdir={workdir} is in use by pid "
            rf"{os.getpid()} on ",
        ):
            WorkdirLock(workdir).__enter__()
        proc = cli("train.py", f"--workdir={workdir}")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --workdir={workdir} is in use by pid {os.getpid()}"), last
    assert os.listdir(workdir) == [".lock"]  # nothing written by the refused start
    with WorkdirLock(workdir):  # released with the holder
        pass


def test_a_failed_first_attempt_does_not_lock_its_config(tmp_path):
    """A run that stopped before its first checkpoint has nothing to resume: a rerun with a
    new config (say a lower lr after a NaN at step 3) trains; the attempt is moved aside."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    old = tiny(**{"train.lr": 1.0}).to_dict()
    (workdir / "config.json").write_text(json.dumps(old))
    (workdir / "metrics.jsonl").write_text('{"step": 0, "event": "start"}\n')
    result = train(
        tiny(
            **{
                "train.steps": 4,
                "train.warmup_steps": 1,
                "train.eval_every": 0,
                "train.final_eval": False,
            }
        ),
        str(workdir),
    )
    assert result["step"] == 4
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert json.loads((aside / "config.json").read_text())["train"]["lr"] == 1.0
    assert json.loads((workdir / "config.json").read_text())["train"]["lr"] != 1.0


def test_a_start_that_cannot_fit_is_refused_before_anything_is_written(tmp_path):
    est = {"params": 2**30, "optimizer": 2**31, "gradients": 2**30, "activations": 2**40}
    est["total"] = sum(est.values())
    with pytest.raises(
        ConfigError,
        match=r"a training step needs about 1,028.00 GiB per "
        r"device \(params 1.00 GiB.*but a device holds "
        r"16.00 GiB; lower data.batch_size",
    ):
        memory.check_fits(est, capacity=16 * 2**30)
    memory.check_fits(est, capacity=1024 * 2**30)  # within the estimate's error: XLA decides
    workdir = tmp_path / "long"
    with pytest.raises(ConfigError, match=r"a training step needs about [\d,.]+ GiB"):
        train(tiny(**{"data.seq_len": 20000, "model.max_seq_len": 20000}), str(workdir))
    assert not (workdir / "config.json").exists()


def test_a_signal_during_start_up_exits_cleanly(tmp_path, monkeypatch):
    """SIGTERM while the run starts (here: during data preparation; in practice often during
    XLA compilation) is acted on once start-up returns: no traceback, nothing trained, the
    signal handlers restored afterwards."""
    import signal

    from ffn_jax import data as data_lib

    real_prepare = data_lib.prepare

    def prepare_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(data_lib, "prepare", prepare_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    result = train(tiny(**{"train.steps": 4, "train.warmup_steps": 1}), str(tmp_path / "run"))
    assert result["preempted"] and result["step"] == 0
    assert not [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    "flag, text",
    [
        ("--config.train.stpes=5", "names no field of the config: 'stpes' Did you mean \"steps\""),
        ("--config.train.steps=abc", "flag --config.train.steps=abc: invalid literal for int()"),
        (
            "--config=configs/nope.py",
            "--config=configs/nope.py: the config file could not be loaded",
        ),
        (
            "--config=configs/base.py:swiglu,size=huge",
            "config arg size='huge' is not a size preset",
        ),
        ("--nope=1", "Unknown command line flag 'nope'"),
    ],
)
def test_bad_flags_are_one_error_line(tmp_path, flag, text):
    proc = cli("train.py", f"--workdir={tmp_path / 'run'}", flag)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_a_corrupt_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model": ')
    proc = cli("eval.py", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'config.json'} is not valid JSON"), last


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = cli("train.py", f"--workdir={tmp_path / 'file' / 'run'}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'file'}") and "Not a directory" in last, last


@pytest.fixture
def full_disk(tmp_path):
    """A 3 MiB tmpfs with 16 KiB left (needs root to mount; skipped otherwise)."""
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()[:100]})")
    try:
        (mount / "fill").write_bytes(b"\0" * (3 * 2**20 - 16 * 2**10))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_stops_training_with_one_line_instead_of_hanging(full_disk):
    """The metrics writers fail in the loop's thread: no hang (tensorboardX's writer thread
    used to die and leave the loop blocked on its queue, deaf to SIGTERM)."""
    proc = cli("train.py", f"--workdir={full_disk / 'run'}", "--config.train.log_every=1")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {full_disk / 'run'}") and "No space left" in last, last
