"""TPU meshes on mock device lists: multi-slice (ICI x DCN) layouts, split physical axes,
the layout jax.make_mesh gives where both can build, and the one-line errors."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from ffn_jax import sharding
from ffn_jax.spec import ConfigError, from_config
from tests.helpers import tiny


@dataclasses.dataclass(frozen=True)
class MockTpu:
    """The attributes of a TPU device that ``jax.experimental.mesh_utils`` reads."""

    id: int
    coords: tuple[int, int, int]
    slice_index: int
    process_index: int
    device_kind: str = "TPU v4"
    core_on_chip: int = 0
    platform: str = "tpu"


def tpu_slices(dims=(4, 4, 4), slices=1, kind="TPU v4", chips_per_host=4) -> list[MockTpu]:
    """``slices`` slices of a ``dims`` torus (one core per chip), devices numbered slice by
    slice with x fastest, ``chips_per_host`` consecutive chips per process."""
    per_slice = int(np.prod(dims))
    return [
        MockTpu(
            id=s * per_slice + i,
            coords=(x, y, z),
            slice_index=s,
            process_index=(s * per_slice + i) // chips_per_host,
            device_kind=kind,
        )
        for s in range(slices)
        for i, (z, y, x) in enumerate(itertools.product(*map(range, reversed(dims))))
    ]


def shape_of(*sizes: int) -> dict[str, int]:
    return dict(zip(sharding.MESH_AXES, sizes, strict=True))


def slice_ids(array: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.slice_index)(array)


@pytest.mark.parametrize(
    "dims, shape, dcn, axis",
    [
        ((4, 4, 4), shape_of(2, 16, 1, 4), shape_of(2, 1, 1, 1), 0),  # data across slices
        ((2, 2, 4), shape_of(1, 32, 1, 1), shape_of(1, 2, 1, 1), 1),  # fsdp across slices
        ((2, 2, 2), shape_of(1, 2, 2, 4), shape_of(1, 1, 1, 2), 3),  # tensor across slices
    ],
)
def test_multi_slice_mesh_keeps_each_slice_a_contiguous_ici_block(dims, shape, dcn, axis):
    devices = tpu_slices(dims, slices=2)
    mesh = sharding.make_mesh(shape, devices, dcn_shape=dcn)
    assert dict(mesh.shape) == shape and mesh.axis_names == sharding.MESH_AXES
    array = mesh.devices
    assert sorted(d.id for d in array.flat) == list(range(len(devices)))
    ids = slice_ids(array)
    half = shape[sharding.MESH_AXES[axis]] // 2
    first, second = np.split(ids, [half], axis=axis)
    assert (first == 0).all() and (second == 1).all()
    # each slice's block is the single-slice mesh of its devices at the per-slice shape
    ici = sharding.ici_shape(shape, sharding.resolve_dcn_shape(dcn))
    for s, block in enumerate(np.split(array, 2, axis=axis)):
        own = [d for d in devices if d.slice_index == s]
        assert (block == sharding.mesh_devices(ici, own)).all()


@pytest.mark.parametrize("sizes", [(4, 8, 1, 2), (8, 8, 1, 1)])
def test_split_physical_axes_only_when_allowed(sizes):
    devices = tpu_slices((4, 4, 4))
    with pytest.raises(ValueError, match="set --config.mesh.allow_split_physical_axes=True") as e:
        sharding.mesh_devices(shape_of(*sizes), devices)
    assert "\n" not in str(e.value)
    array = sharding.mesh_devices(shape_of(*sizes), devices, allow_split_physical_axes=True)
    assert array.shape == sizes and sorted(d.id for d in array.flat) == list(range(64))


def test_split_physical_axes_across_slices():
    devices = tpu_slices((4, 4, 4), slices=2)
    shape, dcn = shape_of(8, 8, 1, 2), shape_of(2, 1, 1, 1)  # per slice (4, 8, 1, 2)
    with pytest.raises(ValueError, match=r"per slice \{'data': 4, 'fsdp': 8"):
        sharding.mesh_devices(shape, devices, dcn_shape=dcn)
    array = sharding.mesh_devices(shape, devices, dcn_shape=dcn, allow_split_physical_axes=True)
    first, second = np.split(slice_ids(array), 2, axis=0)
    assert (first == 0).all() and (second == 1).all()


@pytest.mark.parametrize(
    "devices, sizes",
    [
        (tpu_slices((4, 4, 4)), (4, 4, 4, 1)),
        (tpu_slices((4, 4, 4)), (1, 16, 1, 4)),
        (tpu_slices((4, 4, 1), kind="TPU v5 lite"), (2, 8, 1, 1)),  # jax splits on v5e itself
        (tpu_slices((4, 4, 1), kind="TPU v5 lite"), (1, 1, 1, 16)),
        (jax.devices(), (2, 1, 1, 4)),
    ],
    ids=["v4-4x4x4", "v4-16x4", "v5e-split", "v5e-ring", "cpu"],
)
def test_single_slice_layout_is_jax_make_mesh(devices, sizes):
    ours = sharding.make_mesh(shape_of(*sizes), devices)
    theirs = jax.make_mesh(sizes, sharding.MESH_AXES, devices=devices)
    assert (ours.devices == theirs.devices).all()
    assert ours.axis_types == (jax.sharding.AxisType.Auto,) * 4


@pytest.mark.parametrize(
    "devices, dcn, message",
    [
        (jax.devices(), shape_of(2, 1, 1, 1), "cpu devices have no slice_index"),
        (tpu_slices((2, 2, 2), slices=2), None, r"multiplies to 1 but the devices span 2 slice"),
        (tpu_slices((2, 2, 2), slices=2), shape_of(4, 1, 1, 1), "multiplies to 4 but the"),
        (tpu_slices((2, 2, 2), slices=2), shape_of(3, 1, 1, 1), "mesh.shape.data=4 is not a"),
        (tpu_slices((2, 2, 2), slices=2), {"model": 2}, "mesh.dcn_shape.model: unknown mesh"),
        (tpu_slices((2, 2, 2), slices=2), shape_of(-1, 1, 1, 1), "mesh.dcn_shape.data=-1"),
    ],
)
def test_bad_dcn_shapes_are_one_line_errors(devices, dcn, message):
    shape = shape_of(4, len(devices) // 4, 1, 1)
    with pytest.raises(ValueError, match=message) as e:
        sharding.mesh_devices(shape, devices, dcn_shape=dcn)
    assert "\n" not in str(e.value)


def test_spec_checks_the_mesh_fields_with_the_others():
    c = tiny(
        **{
            "mesh.dcn_shape.data": 3,
            "mesh.dcn_shape.tensor": 0,
            "mesh.rules": [["hidden", None]],
            "train.lr": 0.0,
        }
    )
    raw = c.to_dict()
    raw["mesh"]["allow_split_physical_axes"] = "yes"
    with pytest.raises(ConfigError) as e:
        from_config(raw, num_devices=8)
    problems = e.value.problems
    for start in (
        "mesh.rules:",
        "mesh.dcn_shape.tensor=0: sizes must be positive",
        "mesh.allow_split_physical_axes='yes' must be True or False",
        "train.lr=0.0",
    ):
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)
    with pytest.raises(ConfigError, match=r"mesh.shape.data=8 is not a multiple of mesh.dcn"):
        from_config(tiny(**{"mesh.dcn_shape.data": 3}), num_devices=8)


def test_spec_mesh_fields_defaults_legacy_configs_and_build():
    s = from_config(tiny(**{"mesh.dcn_shape.data": 2}), num_devices=16)
    assert s.mesh.shape == shape_of(16, 1, 1, 1)  # total sizes; per slice data=8
    assert s.mesh.dcn_shape == shape_of(2, 1, 1, 1) and s.mesh.allow_split_physical_axes is False
    mesh = s.mesh.build(tpu_slices((2, 2, 2), slices=2))
    assert (slice_ids(mesh.devices)[:8] == 0).all() and (slice_ids(mesh.devices)[8:] == 1).all()
    # a run restored onto a given mesh does not keep its own slice layout
    assert from_config(s.source, mesh_shape={"data": 1}).mesh.dcn_shape == shape_of(1, 1, 1, 1)

    old = tiny().to_dict()
    del old["mesh"]["dcn_shape"], old["mesh"]["allow_split_physical_axes"]
    legacy = from_config(old, num_devices=8).mesh
    assert legacy.dcn_shape == shape_of(1, 1, 1, 1) and legacy.allow_split_physical_axes is False
    assert (legacy.build().devices == sharding.make_mesh(legacy.shape).devices).all()
