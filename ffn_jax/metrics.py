"""Metric writers: ``metrics.jsonl`` + TensorBoard event files, and a progress bar.

Only process 0 writes; other processes get a writer that does nothing, so call sites
need no ``if jax.process_index() == 0``. Both files go through :class:`AppendLog`, so a
workdir may be a local directory or an object-store URL (``gs://...``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import sys
import time
from typing import IO, Any

import jax
from etils import epath
from tqdm import tqdm

from ffn_jax.files import PathLike, is_url, read_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
UPLOAD_EVERY_S = 30.0  # at most one upload of a growing file per this many seconds (URLs)


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


class AppendLog:
    """A file a run appends records to (``metrics.jsonl``, a TensorBoard event file).

    On a local disk the file is opened for appending and every write is flushed: a kill
    leaves whole records and at most one torn one. An object store (a URL) cannot append:
    the content, starting from what the file already holds, is kept in memory and uploaded
    whole on the first write, then at most every ``upload_every_s`` seconds (default
    ``UPLOAD_EVERY_S``) and at ``close``. Each upload replaces the object whole, so readers
    only ever see whole records; a kill loses at most the last ``upload_every_s`` seconds
    of them.
    """

    def __init__(self, path: PathLike, upload_every_s: float | None = None):
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._upload_every_s = UPLOAD_EVERY_S if upload_every_s is None else upload_every_s
        self._file: IO | None = None
        self._data = bytearray()
        self._uploaded_at = -math.inf
        self._pending = False
        if not is_url(self.path):
            self._file = self.path.open("ab")
        elif self.path.exists():
            self._data += self.path.read_bytes()

    def write(self, data: bytes) -> None:
        """Append ``data`` (local: written and flushed now; URL: uploaded when due)."""
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
            return
        self._data += data
        self._pending = True
        if time.monotonic() - self._uploaded_at >= self._upload_every_s:
            self._upload()

    def _upload(self) -> None:
        self.path.write_bytes(bytes(self._data))
        self._uploaded_at, self._pending = time.monotonic(), False

    def close(self) -> None:
        """Flush what is pending (the last upload, for a URL) and close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._pending:
            self._upload()


class TensorBoardScalars:
    """Scalars to a TensorBoard event file in ``logdir``, written in the calling thread
    through :class:`AppendLog` (a local directory or an object-store URL).

    tensorboardX's ``SummaryWriter`` writes from a background thread behind a bounded
    queue: when that thread dies (a full disk), the training loop blocks on the queue
    forever, deaf to signals; and its ``gs://`` writer needs ``google-cloud-storage`` and
    uploads the whole file at every flush. Here each ``Event`` proto (tensorboardX's) is
    framed as a TFRecord, the format TensorBoard reads: the length (uint64), its masked
    CRC32C, the bytes, their masked CRC32C (little-endian); a failed write is an exception
    in the loop.
    """

    def __init__(self, logdir: PathLike):
        from tensorboardX.proto import event_pb2

        now = time.time()
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}"
        self._log = AppendLog(epath.Path(logdir) / name)
        self._write_event(
            event_pb2.Event(  # pyright: ignore[reportAttributeAccessIssue] (protobuf)
                wall_time=now, file_version="brain.Event:2"
            )
        )

    def _write_event(self, event: Any) -> None:
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._log.write(
            header
            + struct.pack("<I", masked_crc32c(header))
            + data
            + struct.pack("<I", masked_crc32c(data))
        )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Log ``scalars`` (name -> value) at ``step``."""
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        now = time.time()
        for name, value in scalars.items():
            self._write_event(
                event_pb2.Event(  # pyright: ignore[reportAttributeAccessIssue] (protobuf)
                    wall_time=now, step=step, summary=scalar(name, value)
                )
            )

    def close(self) -> None:
        """Write what is pending and close the file."""
        self._log.close()


class MetricWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the scalars
    to TensorBoard event files under ``workdir/tb`` (both :class:`AppendLog` files: on an
    object-store workdir they appear at the first row, then every ``UPLOAD_EVERY_S``
    seconds and at ``close``). A write that fails (a full disk) raises an OSError naming
    the file, in the caller's thread."""

    def __init__(self, workdir: PathLike, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = epath.Path(workdir) / METRICS_FILE
        self._file: AppendLog | None = None
        self._tb: TensorBoardScalars | None = None
        if self.enabled:
            cut = cut_torn_line(self.path)
            if cut:
                log.warning(
                    "%s ended in a torn row (%d bytes, a write cut short); removed it",
                    self.path,
                    cut,
                )
            self._file = AppendLog(self.path)
            self._tb = TensorBoardScalars(epath.Path(workdir) / "tb")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` at ``step``: everything to the JSONL file, the scalars and per-layer
        lists to TensorBoard (``tensorboard_scalars``)."""
        if self._file is None or self._tb is None:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        try:
            # One write a row: whole lines, or a torn tail on a local disk.
            self._file.write((json.dumps(row) + "\n").encode("utf-8"))
            self._tb.write(step, tensorboard_scalars(row))
        except OSError as e:
            raise OSError(
                e.errno, f"{e.strerror} (writing the run's metrics)", os.fspath(self.path)
            ) from e

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


def cut_torn_line(path: PathLike) -> int:
    """Cut a last line that has no newline (a row whose write a full disk or a kill cut
    short) off the file at ``path`` (truncated in place on a local disk, uploaded again
    at a URL); returns the bytes removed (0: none, or no file)."""
    p = epath.Path(path)
    if not p.exists():
        return 0
    data = p.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    if is_url(p):
        p.write_bytes(data[:keep])
    else:
        os.truncate(p, keep)
    return len(data) - keep


def read_metrics(workdir: PathLike) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl`` (empty if the file does not exist). A torn last
    row (no newline) is skipped; a corrupt row elsewhere is a ValueError naming the line."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    text = read_text(path)
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
