"""Small helpers shared by the tests."""

from ml_collections import ConfigDict

from configs.base import get_config
from ffn_jax import spec as spec_lib
from ffn_jax.moe.settings import MoESettings


def set_fields(config: ConfigDict, overrides: dict) -> ConfigDict:
    """Set dotted ``overrides`` (``{"train.steps": 5}``) on ``config``; returns it."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny(**overrides) -> ConfigDict:
    """The tiny config (``configs/base.py:swiglu,size=tiny``) with dotted ``overrides``."""
    return set_fields(get_config("swiglu,size=tiny"), overrides)


def tiny_model_cfg(**overrides) -> ConfigDict:
    """The tiny config's ``model`` block, vocabulary 97 (unpadded), with ``overrides``."""
    cfg = get_config("swiglu,size=tiny").model
    cfg.vocab_size = 97
    cfg.vocab_multiple_of = 1
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def model_spec(model_cfg: ConfigDict) -> spec_lib.ModelSpec:
    """The resolved spec of a ``model`` block (its own ``vocab_size``)."""
    return spec_lib.model_spec(model_cfg)


def tiny_model(**overrides) -> spec_lib.ModelSpec:
    """``model_spec(tiny_model_cfg(**overrides))``."""
    return model_spec(tiny_model_cfg(**overrides))


def moe_settings(moe_cfg: ConfigDict, d_ff: int) -> MoESettings:
    """The resolved MoE settings of a ``model.moe`` block for dense width ``d_ff``."""
    return MoESettings.from_block(moe_cfg.to_dict(), d_ff)


def run_spec(config: ConfigDict, num_devices: int | None = None) -> spec_lib.RunSpec:
    """The run spec of a full config (ConfigError on a problem)."""
    return spec_lib.from_config(config, num_devices)


def train(config: ConfigDict, workdir: str) -> dict:
    """Resolve ``config`` and train it into ``workdir`` (what ``train.py`` does)."""
    from ffn_jax.trainer import train_and_evaluate

    return train_and_evaluate(run_spec(config), workdir)
