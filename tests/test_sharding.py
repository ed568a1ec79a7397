"""Mesh shapes, logical rules and their errors."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from ffn_jax import sharding


def test_resolve_mesh_shape_fills_the_one_free_axis():
    assert sharding.resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == {
        "data": 4,
        "fsdp": 1,
        "expert": 1,
        "tensor": 2,
    }
    assert sharding.resolve_mesh_shape({"fsdp": 8}, 8)["fsdp"] == 8


@pytest.mark.parametrize(
    "shape, message",
    [
        ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
        ({"data": 0}, r"mesh.shape.data=0: axis sizes must be positive"),
        ({"data": 3, "fsdp": -1}, "fixed axes multiply to 3, which does not divide the 8"),
        ({"data": 2}, "multiplies to 2 but there are 8 devices"),
    ],
)
def test_bad_mesh_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(shape, 8)


def test_parse_rules_checks_names_targets_and_coverage():
    rules = sharding.parse_rules(
        [[n, list(t) if isinstance(t, tuple) else t] for n, t in sharding.DEFAULT_RULES]
    )
    assert rules == sharding.DEFAULT_RULES
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        sharding.parse_rules([*rules, ("hidden", None)])
    with pytest.raises(ValueError, match="two rules for logical axis 'batch'"):
        sharding.parse_rules([*rules, ("batch", None)])
    with pytest.raises(ValueError, match="maps to unknown mesh axis 'model'"):
        sharding.parse_rules([*rules[:-1], ("layers", "model")])
    with pytest.raises(ValueError, match=r"no rule for logical axes \['layers'\]"):
        sharding.parse_rules(rules[:-1])


def test_logical_to_spec_and_shard_count():
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("batch", None, "act_mlp"), rules) == P(
        ("data", "fsdp", "expert"), None, "tensor"
    )
    shape = {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert sharding.shard_count("batch", rules, shape) == 4
    assert sharding.shard_count("mlp", rules, shape) == 2
    assert sharding.shard_count("length", rules, shape) == 1


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, ("batch", None)) is x


def test_make_mesh_axes_and_devices():
    mesh = sharding.make_mesh({"data": 2, "tensor": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 4
    assert mesh.size == len(jax.devices()) == 8
