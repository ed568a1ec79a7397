"""The ConfigDict side of the spec boundary: checking a config and resolving it into a
:class:`~ffn_jax.spec.RunSpec` (everything below this layer takes specs).

``validate_config`` collects every problem (one line each: field, value, fix) so a user
sees them all at once; ``resolve`` returns the spec or raises :class:`ConfigError` with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from etils import epath
from ml_collections import ConfigDict

from ffn_jax.files import PathLike, read_json
from ffn_jax.run import CONFIG_FILE
from ffn_jax.spec import ConfigError, RunSpec, from_config, problems

__all__ = ["ConfigError", "load_config", "resolve", "validate_config"]


def validate_config(config: ConfigDict, num_devices: int | None = None) -> list[str]:
    """Every problem of ``config`` (empty list if none), checked before anything is written."""
    return problems(config, num_devices)


def resolve(
    config: ConfigDict, num_devices: int | None = None, group: Mapping[str, Any] | None = None
) -> RunSpec:
    """The run spec of ``config`` on ``num_devices`` devices (default: all), in sweep group
    ``group`` (default: none, or the one its name implies); ConfigError."""
    return from_config(config, num_devices, group=group)


def load_config(workdir: PathLike) -> ConfigDict:
    """The resolved config a run wrote to ``workdir/config.json``, as a ConfigDict."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"--workdir={workdir} holds no run (no config.json); train into it first with train.py"
        )
    return ConfigDict(read_json(path))
