"""A run on disk and on device: the workdir layout, atomic JSON files, the run's spec,
building and restoring its state.

Workdir of a run (the contract in ``../shared/DESIGN.md``), a local directory or an
object-store URL (``gs://...``; every file goes through ``etils.epath``, see
``ffn_jax.files``)::

    .lock           held by the process training into the directory (``WorkdirLock``;
                    local directories only)
    config.json     the resolved config (JSON; read back with ``load_spec``)
    run.json        provenance: git commit, library versions, devices (written at start)
    metrics.jsonl   one JSON object per logged step (``ffn_jax.metrics``)
    tb/             TensorBoard event files
    checkpoints/    orbax checkpoints, one directory per step
    eval.json       held-out scores after evaluation
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import platform
import socket
import subprocess
import time
from typing import Any

import jax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from ffn_jax import data as data_lib
from ffn_jax import programs, sharding
from ffn_jax.files import PathLike, is_url, read_json, write_json_atomic
from ffn_jax.model import LM, count_params
from ffn_jax.optim import make_optimizer
from ffn_jax.spec import ConfigError, RunSpec, config_diff, from_config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "run.json"
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoints"


# ---- the run's config ---------------------------------------------------------------------


def load_spec(workdir: PathLike, mesh_shape: dict[str, int] | None = None) -> RunSpec:
    """The spec of the run in ``workdir`` (its ``config.json``, upgraded if older), on the
    current devices or on a mesh of ``mesh_shape``."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"--workdir={workdir} holds no run (no config.json); train into it first with train.py"
        )
    return from_config(read_json(path), mesh_shape=mesh_shape)


def _move_aside(workdir: PathLike, why: str) -> None:
    """Rename ``workdir`` to ``<workdir>.old-<time>`` (process 0; on an object store a
    rename copies every object, then deletes the originals)."""
    if jax.process_index() != 0:
        return
    aside = f"{os.fspath(workdir).rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    epath.Path(workdir).rename(aside)
    log.warning("%s: moved the existing run in %s to %s", why, workdir, aside)


def check_workdir(spec: RunSpec, workdir: PathLike, resume: bool) -> bool:
    """Refuse an incompatible existing run in ``workdir``; with ``resume=False`` move the old
    run aside to ``<workdir>.old-<time>`` instead, so nothing is lost. A run that stopped
    before its first checkpoint has nothing to resume: a new config moves it aside too.
    Returns whether the old run was moved aside."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return False
    try:
        old = read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path} is not a readable config ({e}); move the run aside or use a new --workdir"
        ) from None
    diff = config_diff(old, dict(spec.source))
    if resume and diff and latest_step(workdir) is None:
        _move_aside(workdir, f"no checkpoint to resume and a new config ({diff[0]})")
        return True
    if resume and diff:
        raise ConfigError(
            f"--workdir={workdir} holds a run with a different config ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}); use a new --workdir, or pass "
            "--config.train.resume=False to move the old run aside and start over"
        )
    if not resume:
        _move_aside(workdir, "train.resume=False")
    return not resume


class WorkdirBusyError(RuntimeError):
    """Another process is training into the workdir."""


class WorkdirLock:
    """An OS file lock on ``workdir/.lock`` held while a run trains into ``workdir``, so a
    second ``train.py`` on the same directory stops with one line naming the holder instead
    of training into the same files. Process 0 holds it for a multi-host job; the lock is
    released by the OS when the holder exits, however it exits.

    An object-store workdir (``gs://...``) has no file locks: it is not locked, and two jobs
    started on the same URL are not detected.
    """

    def __init__(self, workdir: PathLike):
        self.path = os.path.join(os.fspath(workdir), ".lock")
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        busy = ""
        if is_url(self.path):
            log.info("%s is an object-store workdir: not locked", os.path.dirname(self.path))
        elif jax.process_index() == 0:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = os.read(fd, 256).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
            else:
                self._fd = fd
                os.ftruncate(fd, 0)
                os.write(
                    fd,
                    f"pid {os.getpid()} on {socket.gethostname()} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(),
                )
        if jax.process_count() > 1:  # every process stops if process 0 could not lock
            from jax.experimental import multihost_utils

            busy = "another job" if multihost_utils.broadcast_one_to_all(bool(busy)) else ""
        if busy:
            raise WorkdirBusyError(
                f"--workdir={os.path.dirname(self.path)} is in use by {busy}; "
                "wait for that run to end or use another --workdir"
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance() -> dict[str, Any]:
    """Where a result came from: code commit, library versions, devices, host."""
    import flax
    import optax
    import orbax.checkpoint

    dev = jax.devices()[0]
    return {
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": orbax.checkpoint.__version__,
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_config(spec: RunSpec, workdir: PathLike) -> None:
    """Write the resolved config and the provenance sidecar (process 0 only)."""
    if jax.process_index() != 0:
        return
    write_json_atomic(epath.Path(workdir) / CONFIG_FILE, dict(spec.source))
    write_json_atomic(epath.Path(workdir) / PROVENANCE_FILE, provenance())


# ---- checkpoints on disk ------------------------------------------------------------------


def latest_step(workdir: PathLike) -> int | None:
    """The newest committed checkpoint step in ``workdir`` (None if there is none). On an
    object store orbax saves into the step's own directory and marks it committed last
    (``commit_success.txt``), so an interrupted save is a step directory that is skipped."""
    from orbax.checkpoint import step as ocp_step

    ckpt_dir = epath.Path(workdir) / CHECKPOINT_DIR
    steps = [d for d in ckpt_dir.iterdir() if d.name.isdigit()] if ckpt_dir.is_dir() else []
    done = [int(d.name) for d in steps if ocp_step.is_path_finalized(d)]
    return max(done) if done else None


def run_is_finished(workdir: PathLike, steps: int) -> bool:
    """Whether ``workdir`` holds a checkpoint at (or beyond) ``steps`` that matches its
    checksum manifest (a corrupt final checkpoint is an unfinished run)."""
    from ffn_jax.checkpoint import verify_step

    latest = latest_step(workdir)
    if latest is None or latest < steps:
        return False
    problem = verify_step(epath.Path(workdir) / CHECKPOINT_DIR, latest)
    if problem:
        log.warning(
            "%s: the final checkpoint (step %d) is corrupt (%s); training resumes",
            workdir,
            latest,
            problem,
        )
    return problem is None


# ---- the run on device --------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """Everything a run needs on device: the mesh, the split model+optimiser, shardings."""

    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    graphdef: nnx.GraphDef
    state: nnx.State
    state_shardings: nnx.State
    batch_sharding: NamedSharding
    n_params: int


def build_run_state(spec: RunSpec, mesh: jax.sharding.Mesh | None = None) -> RunState:
    """Create the sharded model and optimiser of ``spec`` on ``mesh`` (default: its own).

    The state is created inside one jit with the target out_shardings (no device ever holds
    the full unsharded model), with the seed and the learning rate as traced arguments, so
    runs of a sweep that differ only in them share the compiled initialiser
    (``ffn_jax.programs``).
    """
    mesh = mesh or spec.mesh.build()
    rules = spec.mesh.rules

    def build(seed, lr):
        keys = {"params": seed, "dropout": seed + 1}
        if not isinstance(seed, int):  # traced: nnx.Rngs takes ints or key arrays
            keys = {k: jax.random.key(v) for k, v in keys.items()}
        model = LM(spec.model, rngs=nnx.Rngs(**keys))
        tx = make_optimizer(dataclasses.replace(spec.train, lr=lr))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        abstract = nnx.eval_shape(lambda: build(spec.seed, spec.train.lr))
        graphdef, abstract_state = nnx.split(abstract)
        shardings = sharding.state_shardings(abstract_state, mesh, rules)
        init, _ = programs.cached(
            "init",
            spec,
            lambda: jax.jit(lambda seed, lr: nnx.state(build(seed, lr)), out_shardings=shardings),
        )
        state = init(jax.numpy.int32(spec.seed), jax.numpy.float32(spec.train.lr))
    model, _ = nnx.merge(graphdef, state)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), rules))
    return RunState(mesh, rules, graphdef, state, shardings, batch_sharding, count_params(model))


@dataclasses.dataclass
class Restored:
    """A run rebuilt from its workdir: spec, data, device state and the restored step."""

    spec: RunSpec
    prep: data_lib.Prepared
    rs: RunState
    state: nnx.State
    step: int


def restore(
    workdir: PathLike, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> Restored:
    """Rebuild the run in ``workdir`` and restore its checkpoint (latest or ``step``) onto
    ``mesh`` (default: the run's configured mesh on the current devices)."""
    from ffn_jax.checkpoint import Checkpointer

    spec = load_spec(workdir, dict(mesh.shape) if mesh is not None else None)
    ckpt = Checkpointer(workdir, spec.train.checkpoint_every, spec.train.keep_checkpoints)
    if not ckpt.steps():
        raise FileNotFoundError(
            f"--workdir={workdir} has no checkpoints; train it first "
            "(python train.py --workdir=... with its config)"
        )
    prep = data_lib.prepare(spec.data, workdir)
    rs = build_run_state(spec, mesh)
    try:
        restored = ckpt.restore(rs.state, step)
    finally:
        ckpt.close()  # also on failure: orbax's threads otherwise spew tracebacks at exit
    assert restored is not None
    state, _, step = restored
    return Restored(spec, prep, rs, state, step)
