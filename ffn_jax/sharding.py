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


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, expert, tensor) mesh of Auto (GSPMD) axes of ``shape`` (axis -> size,
    one may be -1; ``MeshSpec.shape`` is already resolved) over ``devices`` (default all)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(dict(shape), len(devices))
    axis_sizes = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(axis_sizes, MESH_AXES, axis_types=auto, devices=devices)


def single_device_mesh() -> jax.sharding.Mesh:
    """A mesh of the first device, with every axis of size 1 (for tests and tools)."""
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES, axis_types=auto
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
