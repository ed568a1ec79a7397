"""Logical axis names, the mesh built from config, and logical -> mesh rules.

Model code names the axes of parameters and activations with the *logical* names
below and never mentions a mesh axis. Which mesh axis (if any) a logical name maps
to lives in the config (``config.mesh.rules``), one rule per name.

Parameters use ``embed, mlp, heads, kv_heads, kv, vocab, expert, layers``;
activations use ``batch, length`` and the ``act_*`` names, so that e.g. FSDP can
shard the ``embed`` axis of weights over ``fsdp`` while the batch of activations is
sharded over the same mesh axis (a mesh axis may appear only once per array).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> what it names
LOGICAL_AXES: dict[str, str] = {
    "batch": "activation batch (sequences)",
    "length": "activation sequence position",
    "act_embed": "activation model dimension",
    "act_heads": "activation attention heads",
    "act_mlp": "activation FFN hidden dimension",
    "act_vocab": "activation vocabulary (logits)",
    "embed": "parameter model dimension",
    "mlp": "parameter FFN hidden dimension",
    "heads": "parameter query heads",
    "kv_heads": "parameter key/value heads",
    "kv": "parameter head dimension",
    "vocab": "parameter vocabulary",
    "expert": "experts (parameters and routed activations)",
    "layers": "stacked (scanned) layers",
}

# Data + FSDP + expert + tensor parallel defaults. The batch is sharded over every mesh
# axis that does not shard it otherwise (size-1 axes cost nothing).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def check_rules(rules: Rules) -> None:
    """Raise ValueError unless there is exactly one rule per logical name, to known mesh axes."""
    seen: dict[str, object] = {}
    for name, target in rules:
        if name not in LOGICAL_AXES:
            raise ValueError(
                f"mesh.rules: unknown logical axis {name!r}; known: {sorted(LOGICAL_AXES)}"
            )
        if name in seen:
            raise ValueError(f"mesh.rules: two rules for logical axis {name!r}; keep one")
        targets = () if target is None else (target,) if isinstance(target, str) else target
        for t in targets:
            if t not in MESH_AXES:
                raise ValueError(
                    f"mesh.rules: {name!r} maps to unknown mesh axis {t!r}; use one of {MESH_AXES}"
                )
        seen[name] = target
    missing = set(LOGICAL_AXES) - set(seen)
    if missing:
        raise ValueError(f"mesh.rules: no rule for logical axes {sorted(missing)}; add them")


def parse_rules(rules: Iterable) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """``config.mesh.rules`` (pairs, lists or tuples) as a checked tuple of (logical, mesh
    axes) pairs; ValueError naming ``mesh.rules`` otherwise."""
    rules = tuple((str(name), tuple(t) if isinstance(t, list | tuple) else t) for name, t in rules)
    check_rules(rules)
    return rules


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the single -1 entry of ``shape`` so the product equals ``num_devices``."""
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh.shape: at most one axis may be -1, got {unknown}")
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ValueError(f"mesh.shape.{a}={s}: axis sizes must be positive (or one -1)")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape: fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} devices; change mesh.shape"
            )
        sizes[unknown[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh.shape={sizes} multiplies to {known} but there are {num_devices} devices; "
            "make the product match or set one axis to -1"
        )
    return sizes


def resolve_dcn_shape(dcn_shape: Mapping[str, int] | None) -> dict[str, int]:
    """``mesh.dcn_shape`` (axis -> slices along it, missing axes 1) checked: mesh axes only,
    positive integer sizes (no -1)."""
    dcn_shape = dict(dcn_shape or {})
    for a, s in dcn_shape.items():
        if a not in MESH_AXES:
            raise ValueError(f"mesh.dcn_shape.{a}: unknown mesh axis; use one of {MESH_AXES}")
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(
                f"mesh.dcn_shape.{a}={s!r}: sizes must be positive integers (the slices "
                "along that axis; 1 = within a slice)"
            )
    return {a: int(dcn_shape.get(a, 1)) for a in MESH_AXES}


def ici_shape(shape: Mapping[str, int], dcn_shape: Mapping[str, int]) -> dict[str, int]:
    """The per-slice (ICI) axis sizes: the total, resolved ``shape`` divided by the slices
    along each axis (``dcn_shape``); ValueError naming the axis when one does not divide."""
    for a in MESH_AXES:
        if shape[a] % dcn_shape[a]:
            raise ValueError(
                f"mesh.shape.{a}={shape[a]} is not a multiple of mesh.dcn_shape.{a}="
                f"{dcn_shape[a]}; mesh.shape is the total size (slices x devices per slice)"
            )
    return {a: shape[a] // dcn_shape[a] for a in MESH_AXES}


# Device kinds on which jax.make_mesh splits physical axes by itself; kept so that a mesh
# builds on them exactly as it did through jax.make_mesh.
_SPLIT_BY_DEFAULT = ("TPU v5 lite", "TPU v5e")


def mesh_devices(
    shape: Mapping[str, int],
    devices: Sequence[Any],
    *,
    dcn_shape: Mapping[str, int] | None = None,
    allow_split_physical_axes: bool = False,
) -> np.ndarray:
    """The device array, axes ``MESH_AXES``, of a mesh of total axis sizes ``shape`` (one may
    be -1) over ``devices``.

    ``dcn_shape`` (default all 1) spreads axes across TPU slices (``device.slice_index``):
    each slice holds a ``shape / dcn_shape`` (ICI) block, and along an axis the slices come
    one after the other (``jax.experimental.mesh_utils.create_hybrid_device_mesh``).
    ``allow_split_physical_axes`` lets a mesh axis take part of a physical torus axis (also
    allowed on TPU v5e, as ``jax.make_mesh`` does). On devices without a topology (CPU)
    the devices are laid out in order, as ``jax.make_mesh`` does. ValueError with the field
    and the fix when the shape does not fit the devices.
    """
    devices = list(devices)
    sizes = resolve_mesh_shape(dict(shape), len(devices))
    dcn = resolve_dcn_shape(dcn_shape)
    ici = ici_shape(sizes, dcn)
    slices = math.prod(dcn.values())
    found = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1 and not hasattr(devices[0], "slice_index"):
        raise ValueError(
            f"mesh.dcn_shape={dcn} asks for {slices} slices but {devices[0].platform} devices "
            "have no slice_index (multi-slice TPU only); set every mesh.dcn_shape axis to 1"
        )
    if found != slices:
        raise ValueError(
            f"mesh.dcn_shape={dcn} multiplies to {slices} but the devices span {found} "
            f"slice(s); make the product {found} (e.g. --config.mesh.dcn_shape.data={found})"
        )
    split = allow_split_physical_axes or devices[0].device_kind in _SPLIT_BY_DEFAULT
    try:
        if slices == 1:
            return mesh_utils.create_device_mesh(
                tuple(ici.values()), devices, allow_split_physical_axes=split
            )
        return mesh_utils.create_hybrid_device_mesh(
            tuple(ici.values()), tuple(dcn.values()), devices, allow_split_physical_axes=split
        )
    except NotImplementedError:  # jax's "Failed to find assignment" (a documented type)
        raise ValueError(
            f"mesh.shape={sizes} (per slice {ici}) does not fit the "
            f"{devices[0].device_kind} torus without splitting a physical axis; set "
            "--config.mesh.allow_split_physical_axes=True or use products of its dimensions"
        ) from None


def make_mesh(
    shape: Mapping[str, int],
    devices: Sequence[Any] | None = None,
    *,
    dcn_shape: Mapping[str, int] | None = None,
    allow_split_physical_axes: bool = False,
) -> jax.sharding.Mesh:
    """A (data, fsdp, expert, tensor) mesh of Auto (GSPMD) axes of total sizes ``shape``
    (axis -> size, one may be -1; ``MeshSpec.shape`` is already resolved) over ``devices``
    (default all), laid out by :func:`mesh_devices` (``dcn_shape``: slices along each axis
    of a multi-slice TPU job; ``allow_split_physical_axes``: see there)."""
    devices = list(devices if devices is not None else jax.devices())
    array = mesh_devices(
        shape, devices, dcn_shape=dcn_shape, allow_split_physical_axes=allow_split_physical_axes
    )
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.Mesh(array, MESH_AXES, axis_types=auto)


def single_device_mesh() -> jax.sharding.Mesh:
    """A mesh of this process's first device, with every axis of size 1 (for tests and
    tools: sampling and inspecting a run work on every process of a multi-process job)."""
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.Mesh(
        np.array(jax.local_devices()[:1]).reshape((1,) * len(MESH_AXES)),
        MESH_AXES,
        axis_types=auto,
    )


def axis_rules(rules: Rules):
    """Context manager that makes ``rules`` the active logical -> mesh mapping."""
    return nnx.logical_axis_rules(tuple(rules))


def logical_to_spec(names: Iterable[str | None], rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose axes carry logical ``names`` (None = replicated)."""
    rules = core_spmd.get_logical_axis_rules() if rules is None else rules
    table = dict(rules)
    return PartitionSpec(*(None if n is None else table.get(n) for n in names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on activation ``x`` by logical axis names; a no-op without a mesh."""
    if not core_spmd.get_logical_axis_rules() or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def param(init, names: Sequence[str | None]):
    """Wrap initializer ``init`` so the Param it makes carries logical axis ``names``.

    Variables are not sharded when created (``eager_sharding=False``); ``create_sharded``
    places the whole model state at once from these names and the active rules.
    """
    return nnx.with_metadata(init, out_sharding=tuple(names), eager_sharding=False)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedSharding tree for an nnx State whose Variables carry logical ``out_sharding``."""

    def one(v):
        names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        spec = logical_to_spec(names, rules) if names else PartitionSpec()
        if len(spec) > len(getattr(value, "shape", ())):
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(build, mesh: jax.sharding.Mesh, rules: Rules):
    """Build the module returned by ``build()`` with its state placed on ``mesh`` by ``rules``.

    The state is created inside one jit with the target out_shardings, so no device ever
    holds the full unsharded model.
    """
    abstract = nnx.eval_shape(build)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)

    def init():
        return nnx.state(build())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_count(logical: str, rules: Rules, mesh_shape: Mapping[str, int]) -> int:
    """How many ways the mesh axes that ``logical`` maps to split an array dimension."""
    target = dict(rules).get(logical)
    axes = () if target is None else (target,) if isinstance(target, str) else target
    return math.prod(mesh_shape[a] for a in axes)
