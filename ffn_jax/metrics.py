"""Metric writers: ``metrics.jsonl`` + TensorBoard event files, and a progress bar.

Only process 0 writes; other processes get a writer that does nothing, so call sites
need no ``if jax.process_index() == 0``.
"""

from __future__ import annotations

import json
import logging
import math
import os
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


class MetricWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the scalars
    to TensorBoard (tensorboardX) under ``workdir/tb``."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._file: TextIO | None = None
        self._tb: Any = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, METRICS_FILE)
            cut = cut_torn_line(path)
            if cut:
                log.warning(
                    "%s ended in a torn row (%d bytes, a write cut short); removed it", path, cut
                )
            self._file = open(path, "a")  # noqa: SIM115
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` at ``step``: scalars to TensorBoard, everything to the JSONL file."""
        if self._file is None:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")  # one write per row: whole lines or a torn tail
        self._file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()


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
    """A tqdm bar on process 0 (disabled elsewhere and when stderr is not a terminal in CI)."""
    disable = jax.process_index() != 0 or os.environ.get("CI") == "true"
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)
