"""Small helpers shared by the tests."""

from ml_collections import ConfigDict


def set_fields(config: ConfigDict, overrides: dict) -> ConfigDict:
    """Set dotted ``overrides`` (``{"train.steps": 5}``) on ``config``; returns it."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
