"""Metric writers: ``metrics.jsonl`` + TensorBoard event files, and a progress bar.

Only process 0 writes; other processes get a writer that does nothing, so call sites
need no ``if jax.process_index() == 0``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, TextIO

import jax
from tqdm import tqdm


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
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` at ``step``: scalars to TensorBoard, everything to the JSONL file."""
        if self._file is None:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl`` (empty if the file does not exist)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, initial: int, desc: str) -> tqdm:
    """A tqdm bar on process 0 (disabled elsewhere and when stderr is not a terminal in CI)."""
    disable = jax.process_index() != 0 or os.environ.get("CI") == "true"
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)
