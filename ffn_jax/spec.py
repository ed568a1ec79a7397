"""Typed, frozen run specs resolved once from the config: ``RunSpec = (model, data, train,
mesh)``, with every derived value and every config problem.

``from_config(config)`` is the one place below the CLI that reads raw config blocks. It
upgrades configs written before a field existed (``LEGACY_DEFAULTS``), collects *every*
problem (one line each: field, value, fix) and raises :class:`ConfigError` listing them, or
returns the specs. Library modules take these specs, never a raw config.

Each derived value is computed here and only here:

* ``ModelSpec.d_ff``: ``model.d_ff`` or the parameter-matched width (``ffn.matched_d_ff``);
* ``ModelSpec.head_dim`` (``d_model // n_heads``) and ``attention_impl`` (the backend);
* ``ModelSpec.vocab_size``: the tokenizer's vocabulary (byte: 257, BPE: ``data.vocab_size``,
  a tokenizer.json: read from it) padded up to ``model.vocab_multiple_of``;
* ``ModelSpec.moe`` (:class:`~ffn_jax.moe.settings.MoESettings`) and ``ffn_kinds``, the
  FFN of every layer (``"dense"`` or ``"moe"``);
* ``MeshSpec.shape``: ``mesh.shape`` with its ``-1`` resolved against the device count (the
  total axis sizes; a multi-slice job's per-slice sizes are ``shape / dcn_shape``).

Field metadata says what may differ where: ``resumable`` fields may change when a run is
resumed (they do not change what is computed); ``shared`` fields must be equal across the
runs of one comparison (unless a sweep varies them). ``config_field_names`` lists both.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ffn_jax import data as data_lib
from ffn_jax import ffn as ffn_lib
from ffn_jax import model as model_lib
from ffn_jax import optim, sharding
from ffn_jax.moe.exchange import EXCHANGES
from ffn_jax.moe.routers import ROUTERS
from ffn_jax.moe.settings import (
    AUX_SCOPES,
    BALANCES,
    DROPLESS_IMPLS,
    ROUTING_MODES,
    MoESettings,
)

if TYPE_CHECKING:
    import jax

# Fields added after runs were already written: a config without them means these.
LEGACY_DEFAULTS: dict[str, Any] = {
    "model.norm_position": "pre",
    "model.positions": "rope",
    "model.max_seq_len": 0,
    "model.ffn_init": "default",
    "train.eval_splits": "validation,test",
    "train.final_val_batches": 0,
    "train.collapse_windows": 0,  # no collapse alarm before it existed
    "model.moe.router_bias": False,
    "model.moe.balance": "aux",
    "model.moe.balance_rate": 1e-3,
    "model.moe.aux_scope": "batch",
    "model.moe.routing": "learned",
    "model.moe.exchange": "padded",
    "mesh.dcn_shape": {a: 1 for a in sharding.MESH_AXES},  # one slice
    "mesh.allow_split_physical_axes": False,
}


class ConfigError(ValueError):
    """One or more config problems; ``str()`` lists them one per line."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _field(*, resumable: bool = False, shared: bool = False, default: Any = dataclasses.MISSING):
    return dataclasses.field(default=default, metadata={"resumable": resumable, "shared": shared})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model: config fields of ``config.model`` plus the resolved values."""

    d_model: int = _field(shared=True)
    n_layers: int = _field(shared=True)
    n_heads: int = _field(shared=True)
    n_kv_heads: int = _field()
    ffn: str = _field()
    d_ff: int = _field()  # resolved: model.d_ff or the parameter-matched width
    ffn_bias: bool = _field()
    ffn_init: str = _field()  # hidden-activation gain at init (ffn_jax.ffn.FFN_INITS)
    dropout: float = _field()
    norm: str = _field()
    norm_position: str = _field()
    positions: str = _field()
    max_seq_len: int = _field()
    tie_embeddings: bool = _field()
    rope_theta: float = _field()
    dtype: str = _field()
    vocab_size: int = _field(resumable=True)  # resolved: tokenizer vocab, padded
    scan_layers: bool = _field(resumable=True)
    remat: str = _field(resumable=True)
    attention: str = _field(resumable=True)
    # ---- derived ----
    tokenizer_vocab: int = _field()  # ids the tokenizer uses (vocab_size is it, padded)
    head_dim: int = _field()
    attention_impl: str = _field()  # the backend model.attention resolves to here
    ffn_kinds: tuple[str, ...] = _field()  # per layer: "dense" or "moe"
    moe: MoESettings | None = _field()

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) holds the MoE FFN."""
        return self.ffn_kinds[layer] == "moe"

    @property
    def group_size(self) -> int:
        """Blocks per scanned group (the last of each group holds the MoE FFN)."""
        return self.moe.every if self.moe is not None else 1


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """``config.data`` (see ``configs/base.py`` for every field)."""

    corpus: str = _field(shared=True)
    paths: str = _field(shared=True)
    hf_name: str = _field(shared=True)
    hf_config: str = _field(shared=True)
    hf_split: str = _field(shared=True)
    hf_text_field: str = _field(shared=True)
    hf_streaming: bool = _field(shared=True)
    hf_max_docs: int = _field(shared=True)
    heldout_fraction: float = _field(shared=True)
    tokenizer: str = _field(shared=True)
    vocab_size: int = _field(shared=True)
    seq_len: int = _field(shared=True)
    batch_size: int = _field(shared=True)
    cache_dir: str = _field(resumable=True)
    num_workers: int = _field(resumable=True)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """``config.train`` (see ``configs/base.py`` for every field)."""

    steps: int = _field(resumable=True, shared=True)
    lr: float = _field(shared=True)
    schedule: str = _field(shared=True)
    warmup_steps: int = _field(shared=True)
    min_lr_ratio: float = _field()
    b1: float = _field()
    b2: float = _field()
    eps: float = _field()
    weight_decay: float = _field()
    decay_norms: bool = _field()
    decay_biases: bool = _field()
    decay_embeddings: bool = _field()
    grad_clip: float = _field()
    grad_accum: int = _field()
    logits_z_loss: float = _field()
    final_eval: bool = _field()
    eval_splits: str = _field(resumable=True)  # comma-separated splits the final eval scores
    log_every: int = _field(resumable=True)
    eval_every: int = _field(resumable=True)
    eval_batches: int = _field(resumable=True)
    final_val_batches: int = _field(resumable=True)  # 0 = every validation token at the end
    checkpoint_every: int = _field(resumable=True)
    keep_checkpoints: int = _field(resumable=True)
    resume: bool = _field(resumable=True)
    profile_steps: str = _field(resumable=True)
    collapse_windows: int = _field(resumable=True)  # MoE collapse alarm (ffn_jax.moe.health)

    @property
    def final_splits(self) -> tuple[str, ...]:
        """The splits the final evaluation scores (``eval_splits``), in order."""
        return tuple(x.strip() for x in self.eval_splits.split(",") if x.strip())


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """The device mesh: ``shape`` (axis -> total size, resolved), the logical -> mesh rules,
    ``dcn_shape`` (axis -> TPU slices along it; all 1 = one slice) and whether a mesh axis
    may split a physical torus axis (``sharding.mesh_devices``)."""

    shape: Mapping[str, int] = _field(resumable=True)
    rules: sharding.Rules = _field(resumable=True)
    dcn_shape: Mapping[str, int] = _field(resumable=True)
    allow_split_physical_axes: bool = _field(resumable=True)

    def build(self, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
        """This mesh on ``devices`` (default: all of jax's)."""
        return sharding.make_mesh(
            self.shape,
            devices,
            dcn_shape=self.dcn_shape,
            allow_split_physical_axes=self.allow_split_physical_axes,
        )

    def ways(self, logical: str) -> int:
        """How many ways the mesh splits the logical axis ``logical``."""
        return sharding.shard_count(logical, self.rules, self.shape)


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """``config.distributed``: how this process joins a multi-host job (every field may
    change on resume)."""

    initialize: str = _field(resumable=True)
    coordinator_address: str = _field(resumable=True)
    num_processes: int = _field(resumable=True)
    process_id: int = _field(resumable=True)
    timeout_s: float = _field(resumable=True)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: its name, seed, the four specs, and the resolved config as written to
    ``config.json`` (``source``, a plain JSON-able dict)."""

    name: str
    seed: int
    group: Mapping[str, Any]  # a sweep's group keys (variant, seed, ...) of this run
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    mesh: MeshSpec
    source: Mapping[str, Any] = dataclasses.field(compare=False, repr=False)

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len


SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "train": TrainSpec,
    "mesh": MeshSpec,
    "distributed": DistributedSpec,
}


def config_field_names(kind: str) -> list[str]:
    """Dotted config names of the fields whose metadata ``kind`` (``"resumable"`` or
    ``"shared"``) is set, e.g. ``"train.steps"``."""
    return [
        f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f.metadata.get(kind)
    ]


# ---- the legacy upgrade -----------------------------------------------------------------


def to_dict(config: Any) -> dict:
    """A plain JSON-able nested dict of ``config`` (an ml_collections config or a dict)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else config
    return json.loads(json.dumps(raw))


def upgrade(raw: Mapping[str, Any]) -> dict:
    """``raw`` (a nested config dict) with the fields added since it was written filled
    with the values they had before (``LEGACY_DEFAULTS``); a new dict."""
    out = to_dict(raw)
    for dotted, default in LEGACY_DEFAULTS.items():
        *path, name = dotted.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node.setdefault(name, copy.deepcopy(default))  # defaults may be dicts
    if "group" not in out and "name" in out:
        # Runs written before sweeps stored their group: "<variant>-s<seed>" names.
        m = re.fullmatch(r"(.+)-s(\d+)", str(out["name"]))
        out["group"] = (
            {"variant": m[1], "seed": int(m[2])}
            if m
            else {"variant": out["name"], "seed": out.get("seed", 0)}
        )
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"field: old -> new"`` for every field that differs between two config dicts and
    matters for resuming (fields not marked ``resumable``; a sweep's ``group`` is identity,
    not computation)."""
    a, b = _flatten(upgrade(old)), _flatten(upgrade(new))
    free = (*config_field_names("resumable"), "group")
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not any(k == f or k.startswith(f + ".") for f in free)
    ]


# ---- problems, one line each ------------------------------------------------------------


def _choice(field: str, value: Any, options) -> list[str]:
    return (
        []
        if value in options
        else [f"{field}={value!r} is not supported; use one of {list(options)}"]
    )


def _model_problems(m: Mapping[str, Any]) -> list[str]:
    p = []
    if m["ffn"] not in ffn_lib.VARIANTS:
        p.append(
            f"model.ffn={m['ffn']!r} is unknown; valid variants: {', '.join(ffn_lib.VARIANTS)}"
        )
    p += _choice("model.ffn_init", m["ffn_init"], ffn_lib.FFN_INITS)
    p += _choice("model.dtype", m["dtype"], model_lib.DTYPES)
    p += _choice("model.norm", m["norm"], model_lib.NORMS)
    p += _choice("model.norm_position", m["norm_position"], model_lib.NORM_POSITIONS)
    p += _choice("model.positions", m["positions"], model_lib.POSITIONS)
    if m["positions"] == "learned" and m["max_seq_len"] <= 0:
        p.append(
            f"model.max_seq_len={m['max_seq_len']} must be positive with learned "
            "positions; set it to at least data.seq_len"
        )
    p += _choice("model.remat", m["remat"], model_lib.REMAT_POLICIES)
    p += _choice("model.attention", m["attention"], model_lib.ATTENTION_IMPLS)
    for field in (
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_multiple_of",
        "ffn_multiple_of",
    ):
        if m[field] <= 0:
            p.append(f"model.{field}={m[field]} must be positive")
    if m["vocab_size"] is not None and m["vocab_size"] <= 0:
        p.append(f"model.vocab_size={m['vocab_size']} must be positive")
    if m["d_ff"] is not None and m["d_ff"] <= 0:
        p.append(f"model.d_ff={m['d_ff']} must be positive (or None for the matched width)")
    n, d = m["n_heads"], m["d_model"]
    if n > 0 and d % n:
        p.append(
            f"model.d_model={d} is not divisible by model.n_heads={n}; pick a head count "
            "that divides it"
        )
    elif m["positions"] == "rope" and n > 0 and (d // n) % 2:
        p.append(
            f"model.d_model/n_heads={d // n} must be even for rotary embeddings; change "
            "model.n_heads"
        )
    if m["n_kv_heads"] > 0 and n % m["n_kv_heads"]:
        p.append(
            f"model.n_heads={n} is not divisible by model.n_kv_heads={m['n_kv_heads']}; "
            "use a divisor for grouped-query attention"
        )
    if not 0.0 <= m["dropout"] < 1.0:
        p.append(f"model.dropout={m['dropout']} must be in [0, 1)")
    if not p and m["attention"] == "cudnn":
        h = d // n
        if model_lib.attention_impl("auto", model_lib.DTYPES[m["dtype"]], h) != "cudnn":
            import jax

            p.append(
                f"model.attention='cudnn' needs an NVIDIA GPU, model.dtype=bfloat16 and a "
                f"head dim that is a multiple of 8 up to 128 (here "
                f"{jax.devices()[0].device_kind}, {m['dtype']}, {h}); use 'auto'"
            )
    return p


def _moe_problems(moe: Mapping[str, Any], n_layers: int, d_ff: int | None) -> list[str]:
    e = moe["num_experts"]
    if e < 0:
        return [f"model.moe.num_experts={e} must be >= 0 (0 = dense FFN)"]
    if e == 0:
        return []
    p = _choice("model.moe.router", moe["router"], ROUTERS)
    p += _choice("model.moe.dropless_impl", moe["dropless_impl"], DROPLESS_IMPLS)
    p += _choice("model.moe.exchange", moe["exchange"], EXCHANGES)
    router = ROUTERS.get(moe["router"])
    if router is not None and moe["dispatch"] not in router.dispatches:
        p.append(
            f"model.moe.dispatch={moe['dispatch']!r} does not apply to "
            f"router={moe['router']!r}; use one of {list(router.dispatches)}"
        )
    g = moe["granularity"]
    if g < 1:
        return p + [f"model.moe.granularity={g} must be >= 1"]
    if not 1 <= moe["top_k"] <= e:
        p.append(
            f"model.moe.top_k={moe['top_k']} must be in [1, num_experts={e}]; lower top_k "
            "or add experts"
        )
    on_capacity = router is not None and router.uses_capacity(moe["dispatch"])
    if on_capacity and not moe["capacity_factor"] > 0:
        p.append(
            f"model.moe.capacity_factor={moe['capacity_factor']} must be > 0 on the "
            "capacity path; use e.g. 1.25, or dispatch='dropless'"
        )
    if moe["eval_capacity_factor"] < 0:
        p.append(
            f"model.moe.eval_capacity_factor={moe['eval_capacity_factor']} must be >= 0 "
            "(0: evaluate dropless)"
        )
    p += _choice("model.moe.balance", moe["balance"], BALANCES)
    p += _choice("model.moe.aux_scope", moe["aux_scope"], AUX_SCOPES)
    if router is not None and moe["balance"] in BALANCES and moe["balance"] not in router.balances:
        p.append(
            f"model.moe.balance={moe['balance']!r} does not apply to router={moe['router']!r} "
            f"(it balances token choice; expert choice is balanced by construction); use "
            f"one of {list(router.balances)} or a token-choice router"
        )
    p += _choice("model.moe.routing", moe["routing"], ROUTING_MODES)
    if router is not None and moe["routing"] in ROUTING_MODES:
        if moe["routing"] not in router.routings:
            p.append(
                f"model.moe.routing={moe['routing']!r} does not apply to "
                f"router={moe['router']!r} (it forces token choice); use 'learned' or a "
                "token-choice router"
            )
        elif moe["routing"] != "learned" and moe["balance"] == "loss_free":
            p.append(
                f"model.moe.routing={moe['routing']!r} forces the selection the loss-free "
                "bias would steer; use model.moe.balance='aux' or 'none' with it"
            )
    for field in ("num_shared", "jitter", "lb_loss_coef", "z_loss_coef", "balance_rate"):
        if moe[field] < 0:
            p.append(f"model.moe.{field}={moe[field]} must be >= 0")
    if not isinstance(moe["router_bias"], bool):
        p.append(f"model.moe.router_bias={moe['router_bias']!r} must be true or false")
    if not moe["jitter"] < 1:
        p.append(f"model.moe.jitter={moe['jitter']} must be < 1 (e.g. 0.01)")
    every = moe["every"]
    if every < 1 or every > n_layers or n_layers % every:
        p.append(
            f"model.moe.every={every} must divide model.n_layers={n_layers} so that every "
            "group of layers ends in one MoE layer"
        )
    if d_ff is not None and d_ff // g < 1:
        p.append(f"model.moe.granularity={g} leaves expert width 0; lower granularity")
    return p


def _train_problems(t: Mapping[str, Any], batch_size: int) -> list[str]:
    p = []
    if t["steps"] <= 0:
        p.append(f"train.steps={t['steps']} must be positive")
    if not t["lr"] > 0:
        p.append(f"train.lr={t['lr']} must be positive, e.g. 1e-3")
    if t["warmup_steps"] < 0 or (t["steps"] > 0 and t["warmup_steps"] >= t["steps"]):
        p.append(
            f"train.warmup_steps={t['warmup_steps']} must be in [0, train.steps="
            f"{t['steps']}); shorten the warmup or train longer"
        )
    if t["schedule"] not in optim.SCHEDULES:
        p.append(
            f"train.schedule={t['schedule']!r} is unknown; use one of {tuple(optim.SCHEDULES)}"
        )
    if not 0.0 <= t["min_lr_ratio"] <= 1.0:
        p.append(f"train.min_lr_ratio={t['min_lr_ratio']} must be in [0, 1]")
    for field in ("weight_decay", "grad_clip", "logits_z_loss"):
        if t[field] < 0:
            p.append(f"train.{field}={t[field]} must be >= 0")
    if t["grad_accum"] < 1 or batch_size % max(1, t["grad_accum"]):
        p.append(
            f"train.grad_accum={t['grad_accum']} must be >= 1 and divide data.batch_size="
            f"{batch_size}"
        )
    for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if t[field] < 1:
            p.append(f"train.{field}={t[field]} must be >= 1")
    for field in ("eval_every", "eval_batches", "final_val_batches"):
        if t[field] < 0:
            p.append(f"train.{field}={t[field]} must be >= 0 (0 = at the end / whole split)")
    splits = [x.strip() for x in str(t["eval_splits"]).split(",") if x.strip()]
    if not splits or any(x not in ("validation", "test") for x in splits):
        p.append(
            f"train.eval_splits={t['eval_splits']!r} must list 'validation' and/or 'test', "
            "e.g. 'validation,test'"
        )
    if t["collapse_windows"] < 0:
        p.append(
            f"train.collapse_windows={t['collapse_windows']} must be >= 0 (log windows in a row "
            "before the MoE collapse alarm; 0 = off), e.g. 3"
        )
    steps = t["profile_steps"]
    m = re.fullmatch(r"(\d+):(\d+)", steps) if steps else None
    if steps and not (m and int(m[1]) < int(m[2])):
        p.append(
            f"train.profile_steps={steps!r} must be 'start:stop' with start < stop, e.g. 10:15"
        )
    return p


def _sharded_dim_problems(m: ModelSpec, mesh: MeshSpec) -> list[str]:
    """Model dimensions that the mesh axes they are sharded over do not divide."""
    dims = [
        ("embed", m.d_model, "model.d_model"),
        ("heads", m.n_heads, "model.n_heads"),
        ("kv_heads", m.n_kv_heads, "model.n_kv_heads"),
        ("mlp", m.d_ff, "model.d_ff"),
        ("vocab", m.vocab_size, "model.vocab_size"),
    ]
    if m.moe is not None:
        dims.append(("expert", m.moe.num_experts, "model.moe.num_experts*granularity"))
    p = []
    for logical, dim, field in dims:
        n = mesh.ways(logical)
        if dim > 0 and dim % n:
            p.append(
                f"{field}={dim} is not divisible by the {n}-way sharding of logical axis "
                f"{logical!r}; change {field} or mesh.shape"
            )
    return p


def _batch_problems(batch_size: int, grad_accum: int, mesh: MeshSpec) -> list[str]:
    # Divisible by the batch shards is enough for any process layout: each process feeds
    # whole shards (``ffn_jax.data.batch_block``), and replicas across processes (tensor
    # across hosts) feed the same rows, so the process count need not divide the batch.
    p = []
    dp = mesh.ways("batch") * max(1, grad_accum)
    if batch_size % dp:
        p.append(
            f"data.batch_size={batch_size} is not divisible by the data-parallel size "
            f"{mesh.ways('batch')} x train.grad_accum={grad_accum}; use a multiple of {dp}"
        )
    return p


# ---- building the specs -----------------------------------------------------------------


def _build(cls: type, values: Mapping[str, Any], **derived: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in values.items() if k in names}, **derived})


def resolve_d_ff(m: Mapping[str, Any]) -> int:
    """The dense FFN width: ``model.d_ff`` or the parameter-matched rule."""
    if m["d_ff"]:
        return int(m["d_ff"])
    return ffn_lib.matched_d_ff(m["ffn"], m["d_model"], m["ffn_multiplier"], m["ffn_multiple_of"])


def padded_vocab(vocab: int, multiple_of: int) -> int:
    """``vocab`` rounded up to a multiple of ``multiple_of`` (unused ids; shardable)."""
    return -(-vocab // multiple_of) * multiple_of


def model_spec(m: Mapping[str, Any], vocab_size: int | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a ``config.model`` block (a config block or a dict);
    ``vocab_size`` (unpadded) defaults to ``model.vocab_size``. Raises ConfigError."""
    m = upgrade({"model": to_dict(m)})["model"]
    p = _model_problems(m)
    d_ff = resolve_d_ff(m) if not p else None
    p += _moe_problems(m["moe"], m["n_layers"], d_ff) if m["n_layers"] > 0 else []
    vocab = vocab_size if vocab_size is not None else m["vocab_size"]
    if vocab is None and not p:
        p.append(
            "model.vocab_size is unset and the tokenizer's vocabulary is unknown; set "
            "data.tokenizer to 'byte', 'bpe' or an existing tokenizer.json"
        )
    if p:
        raise ConfigError(list(dict.fromkeys(p)))
    assert d_ff is not None and vocab is not None
    moe = None
    if m["moe"]["num_experts"] > 0:
        moe = MoESettings.from_block(m["moe"], d_ff, dropout=m["dropout"])
    every = moe.every if moe is not None else 0
    kinds = tuple(
        "moe" if every and (i + 1) % every == 0 else "dense" for i in range(m["n_layers"])
    )
    head_dim = m["d_model"] // m["n_heads"]
    return _build(
        ModelSpec,
        {**m, "vocab_size": padded_vocab(vocab, m["vocab_multiple_of"])},
        d_ff=d_ff,
        tokenizer_vocab=vocab,
        head_dim=head_dim,
        ffn_kinds=kinds,
        moe=moe,
        attention_impl=model_lib.attention_impl(
            m["attention"], model_lib.DTYPES[m["dtype"]], head_dim
        ),
    )


def mesh_spec(mesh: Mapping[str, Any], num_devices: int) -> MeshSpec:
    """The :class:`MeshSpec` of a ``config.mesh`` block on ``num_devices`` devices (raises
    ConfigError with every problem, each naming its field)."""
    mesh = upgrade({"mesh": to_dict(mesh)})["mesh"]
    p: list[str] = []

    def checked(fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or None with its ValueError added to the problems."""
        try:
            return fn(*args)
        except ValueError as e:
            p.append(str(e))

    rules = checked(sharding.parse_rules, mesh["rules"])
    shape = checked(sharding.resolve_mesh_shape, mesh["shape"], num_devices)
    dcn_shape = checked(sharding.resolve_dcn_shape, mesh["dcn_shape"])
    if shape is not None and dcn_shape is not None:
        checked(sharding.ici_shape, shape, dcn_shape)
    split = mesh["allow_split_physical_axes"]
    if not isinstance(split, bool):
        p.append(f"mesh.allow_split_physical_axes={split!r} must be True or False")
    if p:
        raise ConfigError(p)
    assert rules is not None and shape is not None and dcn_shape is not None
    return MeshSpec(shape=shape, rules=rules, dcn_shape=dcn_shape, allow_split_physical_axes=split)


def distributed_spec(dist: Any) -> DistributedSpec:
    """The :class:`DistributedSpec` of a ``config.distributed`` block (no checks here: they
    run in ``distributed.initialize``, before jax touches the devices)."""
    return _build(DistributedSpec, to_dict(dist))


def problems(config: Any, num_devices: int | None = None) -> list[str]:
    """Every problem of ``config`` (empty list if none), checked before anything is written."""
    try:
        from_config(config, num_devices)
    except ConfigError as e:
        return e.problems
    return []


def from_config(
    config: Any,
    num_devices: int | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    group: Mapping[str, Any] | None = None,
) -> RunSpec:
    """Resolve ``config`` (a config from ``configs/`` or a ``config.json`` dict) into a
    :class:`RunSpec` on ``num_devices`` devices (default: all of jax's). ``mesh_shape`` replaces
    ``mesh.shape`` (restoring a run onto another mesh); ``group`` sets the run's sweep group
    (stored in ``config.json``). Raises ConfigError with every problem."""
    import jax

    raw = to_dict(config)
    if group is not None:
        raw["group"] = dict(group)
    raw = upgrade(raw)
    if mesh_shape is not None:
        raw["mesh"]["shape"] = dict(mesh_shape)
        # The mesh is given: how the run's own mesh spread over slices does not apply to it.
        raw["mesh"]["dcn_shape"] = {a: 1 for a in sharding.MESH_AXES}
        num_devices = math.prod(mesh_shape.values())
    num_devices = num_devices or jax.device_count()
    d, t, m = raw["data"], raw["train"], raw["model"]
    p = list(data_lib.validate(_build(DataSpec, d)))
    if m["positions"] == "learned" and d["seq_len"] > m["max_seq_len"] > 0:
        p.append(
            f"data.seq_len={d['seq_len']} is longer than model.max_seq_len="
            f"{m['max_seq_len']} (learned positions); raise model.max_seq_len"
        )
    p += _train_problems(t, d["batch_size"])
    model = mesh = None
    vocab = data_lib.tokenizer_vocab_size(d["tokenizer"], d["vocab_size"])
    if vocab is None and p:
        vocab = 1  # the tokenizer's problem is listed above; check the rest of the model
    try:
        model = model_spec(m, vocab)
    except ConfigError as e:
        p += e.problems
    try:
        mesh = mesh_spec(raw["mesh"], num_devices)
    except ConfigError as e:
        p += e.problems
    if mesh is not None:
        p += _batch_problems(d["batch_size"], t["grad_accum"], mesh)
        if model is not None:
            p += _sharded_dim_problems(model, mesh)
    if p:
        raise ConfigError(list(dict.fromkeys(p)))
    assert model is not None and mesh is not None
    raw["model"]["vocab_size"] = model.vocab_size
    return RunSpec(
        name=raw["name"],
        seed=int(raw["seed"]),
        group=raw["group"],
        model=model,
        data=_build(DataSpec, d),
        train=_build(TrainSpec, t),
        mesh=mesh,
        source=raw,
    )
