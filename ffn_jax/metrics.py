"""Metric writers: ``metrics.jsonl`` + TensorBoard event files, and a progress bar.

Only process 0 writes; other processes get a writer that does nothing, so call sites
need no ``if jax.process_index() == 0``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, TextIO

import jax
from tqdm import tqdm

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def tensorboard_scalars(row: dict[str, Any]) -> dict[str, float]:
    """What TensorBoard gets of a metrics row: its numbers, and each flat list of numbers (a
    per-layer MoE metric, ``moe/<name>``) as one scalar per layer, ``moe/<name>/layer_<i>``;
    nested lists (``moe/expert_fraction``), strings and dicts are left to the JSONL file."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, int | float):
            out[k] = v
        elif (
            k.startswith("moe/")
            and isinstance(v, list)
            and all(isinstance(x, int | float) for x in v)
        ):
            out.update({f"{k}/layer_{i}": x for i, x in enumerate(v)})
    return out


class TensorBoardScalars:
    """Scalars to a TensorBoard event file in ``logdir``, written in the calling thread.

    tensorboardX's ``SummaryWriter`` writes from a background thread behind a bounded
    queue: when that thread dies (a full disk), the training loop blocks on the queue
    forever, deaf to signals. Written here, a failed write is an exception in the loop.
    """

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter

        os.makedirs(logdir, exist_ok=True)
        self._writer = EventsWriter(os.path.join(logdir, "events"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        now = time.time()
        for name, value in scalars.items():
            event = event_pb2.Event(  # pyright: ignore[reportAttributeAccessIssue] (protobuf)
                wall_time=now, step=step, summary=scalar(name, value)
            )
            self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the scalars
    to TensorBoard event files under ``workdir/tb``. A write that fails (a full disk) raises
    an OSError naming the file, in the caller's thread."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file: TextIO | None = None
        self._tb: TensorBoardScalars | None = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            cut = cut_torn_line(self.path)
            if cut:
                log.warning(
                    "%s ended in a torn row (%d bytes, a write cut short); removed it",
                    self.path,
                    cut,
                )
            self._file = open(self.path, "a")  # noqa: SIM115
            self._tb = TensorBoardScalars(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` at ``step``: everything to the JSONL file, the scalars and per-layer
        lists to TensorBoard (``tensorboard_scalars``)."""
        if self._file is None or self._tb is None:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(row) + "\n")  # one write a row: whole lines or a torn tail
            self._file.flush()
            self._tb.write(step, tensorboard_scalars(row))
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} (writing the run's metrics)", self.path) from e

    def close(self) -> None:
        """Close the files; a failure to close (a full disk) is logged, not raised, so that
        it never hides the error that ended the run."""
        for f in (self._file, self._tb):
            if f is not None:
                try:
                    f.close()
                except OSError as e:
                    log.warning("closing the metrics of %s failed: %s", self.path, e)
        self._file = self._tb = None


def cut_torn_line(path: str) -> int:
    """Cut a last line that has no newline (a row whose write a full disk or a kill cut
    short) off the file at ``path``; returns the bytes removed (0: none, or no file)."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        return len(data) - keep


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl`` (empty if the file does not exist). A torn last
    row (no newline) is skipped; a corrupt row elsewhere is a ValueError naming the line."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends in a newline
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} line {i} is not JSON ({e.msg}); delete that line or the "
                "run's metrics.jsonl"
            ) from None
    if torn.strip():
        log.warning("%s ends in a torn row; skipped it", path)
    return rows


def progress_bar(total: int, initial: int, desc: str) -> tqdm:
    """A tqdm bar on process 0 when stderr is a terminal; disabled elsewhere, in CI and in a
    log file (``nohup``, a cluster job's log), where the trainer logs one line per log
    interval instead of a frame per step."""
    tty = sys.stderr.isatty()
    disable = jax.process_index() != 0 or os.environ.get("CI") == "true" or not tty
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)
