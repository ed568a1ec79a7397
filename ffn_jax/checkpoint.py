"""Orbax checkpoints of the train state, run metadata and the data iterator.

A checkpoint holds two items: ``state`` (model + optimiser, as a pure dict of arrays,
PRNG keys stored as their raw key data) and ``meta`` (JSON: step, tokens seen, ...). The
data order needs no state of its own: the loader resumes at the step
(``ffn_jax.data.train_iterator(start=step)``), so a run resumes on any number of processes.
(Checkpoints of older versions also hold ``data``, the grain iterator's per-process state;
it is not read.) Restoring tries the newest step first and falls back to older ones if a
checkpoint is corrupt or partial; with several processes every process tries each step and
they agree (all-gather) on whether it restored everywhere, so all resume from one step.

Integrity: once a save has committed, ``checkpoints/manifests/<step>.json`` records the
sha256 of every file of that step. A restore checks the step against it first, so flipped
bytes are a corrupt checkpoint (skipped, never loaded), not a silently different model. A
step that fails (checksum or restore) is moved to ``checkpoints/corrupt/`` on a
single-process run, so training from the older step can save that step again and finish.
Steps saved before manifests existed restore unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from ffn_jax.files import PathLike, files_under, normalize_workdir, write_text_atomic

log = logging.getLogger(__name__)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(state: nnx.State) -> dict:
    """A pure dict of ``state`` with PRNG key arrays replaced by their ``key_data``."""
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if _is_key(x) else x, nnx.to_pure_dict(state)
    )


def abstract_saveable(state: nnx.State) -> dict:
    """The ShapeDtypeStruct tree (with shardings) that ``to_saveable(state)`` would produce."""

    def one(x):
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_key_sharding(x))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, nnx.to_pure_dict(state))


def _key_sharding(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (x.ndim + 1 - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return sharding


def from_saveable(state: nnx.State, saved: dict) -> nnx.State:
    """Write the restored pure dict ``saved`` back into ``state`` (re-wrapping PRNG keys)."""
    template = nnx.to_pure_dict(state)
    values = jax.tree.map(
        lambda t, s: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t)) if _is_key(t) else s,
        template,
        saved,
    )
    nnx.replace_by_pure_dict(state, values)
    return state


def manifest_path(directory: PathLike, step: int) -> epath.Path:
    """Where the checksum manifest of ``step`` in the checkpoint ``directory`` lives."""
    return epath.Path(directory) / "manifests" / f"{step}.json"


def step_digests(directory: PathLike, step: int) -> dict[str, str]:
    """sha256 of every file of ``step``, by path relative to the step directory."""
    root, out = epath.Path(directory) / str(step), {}
    for path in files_under(root):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        out[os.fspath(path.relative_to(root))] = h.hexdigest()
    return dict(sorted(out.items()))


def verify_step(directory: PathLike, step: int) -> str | None:
    """Why ``step`` in ``directory`` does not match its manifest (None: it matches, or was
    saved before manifests existed)."""
    path = manifest_path(directory, step)
    if not path.exists():
        log.info(
            "checkpoint step %d has no manifest (saved before manifests existed); "
            "restoring it unverified",
            step,
        )
        return None
    want = json.loads(path.read_text())
    got = step_digests(directory, step)
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    return f"{len(bad)} file(s) differ from its manifest, e.g. {bad[0]}" if bad else None


def _everywhere(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (an all-gather; just ``ok`` on one process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.array(ok, np.int32)).all())


class Checkpointer:
    """Saves every ``every`` steps (and when forced), keeps the last ``keep``, asynchronously,
    in ``workdir/checkpoints`` (a local directory or an object-store URL)."""

    def __init__(self, workdir: PathLike, every: int, keep: int):
        self.directory = epath.Path(normalize_workdir(workdir)) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, every),
            max_to_keep=max(1, keep),
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def _manifest(self, step: int) -> epath.Path:
        return manifest_path(self.directory, step)

    def seal(self) -> None:
        """Write the manifest of every committed step that has none (process 0)."""
        if jax.process_index() != 0:
            return
        for step in self.steps():
            path = self._manifest(step)
            if not path.exists():
                write_text_atomic(path, json.dumps(step_digests(self.directory, step), indent=1))

    def verify(self, step: int) -> str | None:
        """Why ``step`` does not match its manifest (None: it matches, or has none)."""
        return verify_step(self.directory, step)

    def _quarantine(self, step: int) -> None:
        """Move a failed step out of orbax's view (single process only), with its manifest."""
        if jax.process_count() > 1:
            return
        dest = self.directory / "corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(dest)
            if self._manifest(step).exists():
                self._manifest(step).rename(dest / "manifest.json")
        except OSError as e:  # e.g. a read-only run evaluated: skip it, leave it in place
            log.warning("could not move the failed checkpoint step %d aside (%s)", step, e)
            return
        self.manager.reload()
        log.warning("moved the failed checkpoint step %d to %s", step, dest)

    def save(self, step: int, state: nnx.State, meta: dict, force: bool = False) -> bool:
        """Save (asynchronously) if ``step`` is due or ``force``; True if a save started."""
        items = {
            "state": ocp.args.StandardSave(to_saveable(state)),
            "meta": ocp.args.JsonSave(meta),
        }
        if not (force or self.manager.should_save(step)):
            return False
        self.manager.wait_until_finished()  # the previous save has committed: seal it
        self.seal()
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, state: nnx.State, step: int | None = None):
        """Restore into ``state`` (shapes/shardings taken from it).

        Returns ``(state, meta, step)``, or None when there is no checkpoint. Without an
        explicit ``step``, a checkpoint that fails to restore is skipped with a warning and
        the next older one is tried; if all fail, raises RuntimeError.
        """
        if step is not None and step not in self.steps():
            raise FileNotFoundError(
                f"{self.directory} holds no checkpoint of step {step}; saved steps: {self.steps()}"
            )
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            return None
        errors: list[str] = []
        failed: list[int] = []
        for s in candidates:
            items = {
                "state": ocp.args.StandardRestore(abstract_saveable(state)),
                "meta": ocp.args.JsonRestore(),
            }
            problem = self.verify(s)
            if problem is None:
                try:
                    out = self.manager.restore(s, args=ocp.args.Composite(**items))
                except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                    first = str(e).splitlines()[0] if str(e) else ""
                    problem = f"{type(e).__name__}: {first[:200]}"
            if not _everywhere(problem is None) and problem is None:
                problem = "it failed to restore on another process"
            if problem is not None:
                log.warning(
                    "checkpoint step %d in %s is unusable (%s); trying an older one",
                    s,
                    self.directory,
                    problem,
                )
                errors.append(f"step {s}: {problem}")
                failed.append(s)
                continue
            # An older step restored, so the newer failures are those steps' own (not a
            # config that matches no checkpoint): move them aside so they can be saved anew.
            for bad in failed if step is None else []:
                self._quarantine(bad)
            return from_saveable(state, out["state"]), dict(out["meta"]), s
        raise RuntimeError(
            f"no checkpoint in {self.directory} could be restored ({'; '.join(errors)}); "
            "if the run's config or process count changed since it saved them, restore with "
            "those, else point --workdir elsewhere"
        )

    def wait(self) -> None:
        """Block until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.seal()
        self.manager.close()
