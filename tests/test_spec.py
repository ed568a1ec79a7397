"""The run spec: every derived value resolved once, every problem in one pass, field
metadata, the legacy upgrade."""

import dataclasses

import pytest

from ffn_jax import ffn, spec
from ffn_jax.data import train_bpe
from ffn_jax.spec import ConfigError, config_diff, config_field_names, from_config
from tests.helpers import tiny


def test_every_problem_of_every_section_at_once():
    c = tiny(
        **{
            "model.ffn": "swishglu",
            "model.dropout": 1.5,
            "train.lr": 0.0,
            "train.schedule": "step",
            "data.seq_len": 0,
            "mesh.shape.data": 3,
            "train.final_val_batches": -1,
        }
    )
    with pytest.raises(ConfigError) as e:
        from_config(c, num_devices=8)
    problems = e.value.problems
    for start in (
        "model.ffn='swishglu'",
        "model.dropout=1.5",
        "train.lr=0.0",
        "train.schedule='step'",
        "data.seq_len=0",
        "mesh.shape=",
        "train.final_val_batches=-1",
    ):
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)
    assert all("\n" not in p for p in problems)
    assert str(e.value).count("\n") == len(problems) - 1


@pytest.mark.parametrize("variant", ["relu", "swiglu"])
def test_derived_model_values(variant):
    s = from_config(tiny(**{"model.ffn": variant}), num_devices=8)
    m = s.model
    assert m.d_ff == ffn.matched_d_ff(variant, 64, 4.0, 8) == (256 if variant == "relu" else 168)
    assert m.head_dim == 16 and m.attention_impl == "einsum"  # "auto" on CPU
    assert m.vocab_size == 384  # 257 byte ids padded to a multiple of 128
    assert m.ffn_kinds == ("dense", "dense") and m.moe is None and m.group_size == 1
    assert s.mesh.shape == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}  # -1 resolved
    assert s.tokens_per_step == 16 * 64


def test_explicit_d_ff_and_moe_layers():
    c = tiny(
        **{
            "model.d_ff": 96,
            "model.n_layers": 4,
            "model.moe.num_experts": 4,
            "model.moe.every": 2,
            "model.moe.granularity": 2,
            "model.moe.num_shared": 1,
        }
    )
    m = from_config(c, num_devices=8).model
    assert m.d_ff == 96 and m.ffn_kinds == ("dense", "moe", "dense", "moe")
    assert m.group_size == 2 and m.is_moe_layer(3) and not m.is_moe_layer(2)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_width, m.moe.shared_width) == (
        8,
        4,
        48,
        48,
    )
    assert m.moe.lb_loss_coef == c.model.moe.lb_loss_coef  # the aux weights travel along


def test_moe_width_check_uses_the_resolved_d_ff():
    """An explicit d_ff narrower than the granularity is refused (the old check assumed
    4 * d_model when d_ff was unset, and the layer then disagreed)."""
    c = tiny(**{"model.d_ff": 8, "model.moe.num_experts": 4, "model.moe.granularity": 16})
    (problem,) = spec.problems(c, num_devices=8)
    assert problem.startswith("model.moe.granularity=16 leaves expert width 0")


def test_vocab_is_known_before_data_preparation(tmp_path):
    bpe = from_config(tiny(**{"data.tokenizer": "bpe", "data.vocab_size": 300}), 8)
    assert bpe.model.vocab_size == 384
    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 50], 270)
    path = tmp_path / "tok.json"
    path.write_text(tok.json)
    user = from_config(tiny(**{"data.tokenizer": str(path), "model.vocab_multiple_of": 1}), 8)
    assert user.model.vocab_size == 270
    # Sharded-dimension checks see the vocabulary in the same pass.
    c = tiny(
        **{
            "model.vocab_multiple_of": 1,
            "mesh.shape.data": 1,
            "mesh.shape.tensor": 8,
            "model.n_heads": 8,
            "model.n_kv_heads": 8,
        }
    )
    problems = spec.problems(c, num_devices=8)
    assert any(p.startswith("model.vocab_size=257 is not divisible by the 8-way") for p in problems)


def test_specs_are_frozen():
    s = from_config(tiny(), num_devices=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.model.d_ff = 1  # type: ignore[misc]


def test_field_metadata_replaces_hand_kept_lists():
    resumable = set(config_field_names("resumable"))
    assert {
        "train.steps",
        "train.log_every",
        "train.resume",
        "data.cache_dir",
        "mesh.shape",
        "model.remat",
        "model.vocab_size",
        "distributed.timeout_s",
    } <= resumable
    assert not {"train.lr", "model.d_model", "data.seq_len", "model.ffn"} & resumable
    shared = set(config_field_names("shared"))
    assert {"train.lr", "train.steps", "data.seq_len", "model.d_model"} <= shared
    assert not {"data.cache_dir", "data.num_workers", "model.ffn"} & shared


def test_config_diff_ignores_resumable_fields_and_the_group():
    old = tiny().to_dict()
    new = tiny(**{"train.steps": 999, "train.log_every": 1, "mesh.shape.data": 2}).to_dict()
    new["group"] = {"variant": "x", "seed": 0}
    assert config_diff(old, new) == []
    new["train"]["lr"] = 1.0
    assert config_diff(old, new) == [f"train.lr: {old['train']['lr']!r} -> 1.0"]


def test_legacy_configs_are_upgraded_once():
    old = tiny().to_dict()
    for field in ("norm_position", "positions", "max_seq_len"):
        del old["model"][field]
    old["name"], old["seed"] = "moe_top1-s2", 2
    up = spec.upgrade(old)
    assert (up["model"]["norm_position"], up["model"]["positions"]) == ("pre", "rope")
    assert up["group"] == {"variant": "moe_top1", "seed": 2}
    assert from_config(old, num_devices=8).model.norm_position == "pre"
    assert config_diff(old, up) == []  # the upgrade changes nothing that matters
