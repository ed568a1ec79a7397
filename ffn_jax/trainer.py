"""The training loop: ``train_and_evaluate(spec, workdir)``.

One jitted functional train step (``nnx.split``/``merge``, donated state, explicit in/out
shardings on the config's mesh); the host syncs only when metrics are logged or a
checkpoint is due. Checkpoints (orbax) hold model, optimiser, dropout RNG state, the step
and the data iterator, so a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from ffn_jax import data as data_lib
from ffn_jax import distributed, memory, programs, sharding
from ffn_jax.checkpoint import Checkpointer
from ffn_jax.evaluate import evaluate_split, make_eval_step, score_splits
from ffn_jax.files import PathLike
from ffn_jax.flops import flops_per_token, peak_flops
from ffn_jax.metrics import MetricWriter, progress_bar
from ffn_jax.model import lm_loss
from ffn_jax.moe import health
from ffn_jax.optim import make_schedule
from ffn_jax.run import (
    RunState,
    WorkdirLock,
    build_run_state,
    check_workdir,
    provenance,
    write_config,
)
from ffn_jax.spec import RunSpec, TrainSpec

log = logging.getLogger(__name__)


MAX_IN_FLIGHT = 2  # train steps dispatched ahead of the one the host waits for


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def make_train_step(graphdef: nnx.GraphDef, t: TrainSpec):
    """``step(state, tokens (B, T+1)) -> (state, metrics)``, pure; jit it with shardings."""
    accum, z_coef = t.grad_accum, t.logits_z_loss

    def step(state: nnx.State, tokens: jax.Array):
        model, opt = nnx.merge(graphdef, state)
        model.train()
        gdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, rest, tok):
            # Fresh Variable objects for this trace: RNG counts (dropout, jitter) are updated
            # inside nnx.scan, which rejects Variables created at the outer trace level.
            m = nnx.merge(gdef, params, jax.tree.map(lambda x: x, rest))
            loss, metrics = lm_loss(m, tok, z_coef)
            return loss, (metrics, nnx.state(m, nnx.Not(nnx.Param)))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (loss, (metrics, rest)), grads = grad_fn(params, rest, tokens)
        else:
            micro = tokens.reshape(accum, tokens.shape[0] // accum, tokens.shape[1])

            def body(carry, tok):
                g_sum, rest = carry
                (loss, (metrics, rest)), g = grad_fn(params, rest, tok)
                return (jax.tree.map(jnp.add, g_sum, g), rest), (loss, metrics)

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, rest), (losses, metrics) = jax.lax.scan(body, (zeros, rest), micro)
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, metrics = losses.mean(), jax.tree.map(lambda m: m.mean(0), metrics)
        nnx.update(model, rest)
        opt.update(model, grads)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return nnx.state((model, opt)), metrics

    return step


def _compile_train_step(spec: RunSpec, rs: RunState, state: nnx.State):
    """The run's train step, lowered for its state and batch shardings and compiled."""
    jitted = jax.jit(
        make_train_step(rs.graphdef, spec.train),
        in_shardings=(rs.state_shardings, rs.batch_sharding),
        out_shardings=(rs.state_shardings, None),
        donate_argnums=0,
    )
    batch_shape = (spec.data.batch_size, spec.data.seq_len + 1)
    abstract_batch = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=rs.batch_sharding)
    return jitted.lower(state, abstract_batch).compile()


@dataclasses.dataclass
class Timing:
    """Where a run's wall time went (seconds, summed over the processes that ran it and
    carried in the checkpoint meta): XLA compilation, evaluation, checkpoint saves, and
    the whole of ``train_and_evaluate``; training is the rest of the loop."""

    compile_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    wall_s: float = 0.0
    loop_s: float = 0.0  # the training loop, evaluations and checkpoints included (at the end)

    def split(self) -> dict[str, float]:
        """``{"wall_s", "compile_s", "eval_s", "checkpoint_s", "train_s", "other_s"}``."""
        train = self.loop_s - self.eval_s - self.checkpoint_s
        other = self.wall_s - self.loop_s - self.compile_s
        return {
            "wall_s": self.wall_s,
            "compile_s": self.compile_s,
            "eval_s": self.eval_s,
            "checkpoint_s": self.checkpoint_s,
            "train_s": train,
            "other_s": other,
        }


def _summarise(window: list[dict]) -> dict:
    """Mean over the logged window of per-step metrics (already on host)."""
    out = {}
    for k in window[0]:
        v = np.mean(np.stack([np.asarray(w[k]) for w in window]), axis=0)
        out[k] = float(v) if np.ndim(v) == 0 else v.tolist()
    return out


class _Profiler:
    """Writes a ``jax.profiler`` trace of steps ``start+1 .. stop`` (``"start:stop"``) to
    ``directory`` (view it with TensorBoard's profile plugin or Perfetto); process 0 only.
    jax's profiler writes the directory itself: on an object-store workdir that needs a
    jax build that can write there (untested; profile into a local workdir)."""

    def __init__(self, steps: str, directory: str):
        self.start, self.stop = (int(x) for x in steps.split(":")) if steps else (-1, -1)
        self.directory = directory
        self.active = False

    def maybe_start(self, step: int) -> None:
        if step == self.start and jax.process_index() == 0:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def maybe_stop(self, step: int, last_output: jax.Array) -> None:
        if self.active and step >= self.stop:
            jax.block_until_ready(last_output)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d..%d written to %s", self.start + 1, step, self.directory)


class _Preemption:
    """Turns SIGTERM / SIGINT into a stop that every process takes at the same step.

    One process: a Python handler sets a flag the loop reads once per step (start-up checks
    it before the loop); a second Ctrl-C aborts at once (KeyboardInterrupt).

    Several processes (``jax.distributed`` with its preemption service): SIGTERM is left to
    JAX's preemption notifier, which tells every process through the coordination service;
    ``stop_at(step)`` is ``multihost_utils.reached_preemption_sync_point``, true on every
    process at the same step (one past the furthest any process had reached), so all of
    them save that step and exit. SIGINT re-raises SIGTERM in this process, taking the
    same path. A per-process flag would stop only the signalled process and hang the
    others in the next collective.
    """

    def __init__(self):
        self.signal: int | None = None
        self._old = {}
        self.agreed = _preemption_service_running()

    def __enter__(self):
        for sig in (signal.SIGINT,) if self.agreed else (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.agreed:  # to JAX's notifier: every process stops at one agreed step
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def stop_at(self, step: int) -> bool:
        """Whether to save and exit after ``step`` (call once per step, on every process)."""
        if self.agreed:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = self.signal or signal.SIGTERM
                return True
            return False
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _preemption_service_running() -> bool:
    """Whether this is one of several processes with JAX's preemption sync manager."""
    from jax._src import distributed as jax_distributed  # its state has no public accessor

    state = jax_distributed.global_state
    return jax.process_count() > 1 and state.preemption_sync_manager is not None


def train_and_evaluate(spec: RunSpec, workdir: PathLike) -> dict:
    """Train the run ``spec`` into ``workdir`` (resuming if it holds a compatible run),
    holding the workdir's lock throughout.

    Returns the final metrics (last training window and validation results).
    """
    # Signals are caught from the start: one during start-up (data, XLA compilation) is
    # acted on once that returns, instead of a KeyboardInterrupt inside jax.
    with _Preemption() as pre:
        with WorkdirLock(workdir):  # checked under the lock: never move a live run aside
            if not check_workdir(spec, workdir, spec.train.resume):
                return _train_and_evaluate(spec, workdir, pre)
        with WorkdirLock(workdir):  # the old run (and its lock) moved aside: lock the new one
            return _train_and_evaluate(spec, workdir, pre)


def _train_and_evaluate(spec: RunSpec, workdir: PathLike, pre: _Preemption) -> dict:
    t_entry = time.perf_counter()
    t = spec.train
    # Process 0 prepares (downloads, tokenises, caches) the corpus; the others then read
    # its cache (or, on hosts without a shared cache, prepare their own).
    prep = distributed.process_zero_first(
        lambda: data_lib.prepare(spec.data, workdir), "ffn_jax: corpus prepared"
    )
    if prep.tokenizer.vocab_size != spec.model.tokenizer_vocab:
        raise ValueError(
            f"the tokenizer of data.tokenizer={spec.data.tokenizer!r} has "
            f"{prep.tokenizer.vocab_size} ids, not the "
            f"{spec.model.tokenizer_vocab} expected; set data.vocab_size to match"
        )
    rs = build_run_state(spec)
    mem_estimate = memory.estimate(spec, rs.state, rs.mesh, rs.rules)  # computed once
    memory.check_fits(mem_estimate)
    write_config(spec, workdir)
    writer = MetricWriter(workdir)
    ckpt = Checkpointer(workdir, t.checkpoint_every, t.keep_checkpoints)
    state, step, tokens_seen, time_before = rs.state, 0, 0, 0.0
    timing = Timing()
    # Per-step metrics since the last log row, carried over a resume (checkpoint meta) so
    # that the first row after it averages the same steps as an uninterrupted run's.
    window: list = []
    alarm = health.CollapseAlarm(t.collapse_windows)  # its counts are carried likewise
    try:
        restored = ckpt.restore(state) if t.resume else None
    except BaseException:
        ckpt.close()  # orbax's threads otherwise spew tracebacks at exit
        writer.close()
        raise
    if restored is not None:
        state, meta, step = restored
        tokens_seen, time_before = meta["tokens_seen"], meta["train_time_s"]
        timing = Timing(**meta.get("timing", {}))
        window = [
            {k: np.asarray(v, dtype=dt) for k, (dt, v) in r.items()} for r in meta.get("window", [])
        ]
        alarm.runs = list(meta.get("collapse_runs", []))
        log.info("resumed %s from step %d", workdir, step)
    carried = len(window)  # of them, the steps not timed in this process
    first_step, signalled = step, None
    # This process's block of each batch (replicas of a batch shard, e.g. processes along
    # tensor, read the same rows), from batch ``step`` on: the order depends only on the
    # seed and the global batch, so any process count resumes exactly.
    block, blocks = data_lib.batch_block(rs.batch_sharding, spec.data.batch_size)
    train_iter = data_lib.train_iterator(
        prep.splits["train"],
        seq_len=spec.data.seq_len,
        global_batch=spec.data.batch_size,
        seed=spec.seed,
        process_index=block,
        process_count=blocks,
        num_workers=spec.data.num_workers,
        start=step,
    )

    with jax.set_mesh(rs.mesh), sharding.axis_rules(rs.rules):
        t0 = time.perf_counter()
        train_step, reused = programs.cached(
            "train_step", spec, lambda: _compile_train_step(spec, rs, state)
        )
        compile_s = time.perf_counter() - t0
        timing.compile_s += compile_s
        mem_estimate, mem_compiled = memory.log_memory(mem_estimate, train_step)
        eval_step, _ = programs.cached(
            "eval_step",
            spec,
            lambda: make_eval_step(rs.graphdef, rs.state_shardings, rs.batch_sharding),
        )

    tokens_per_step = spec.tokens_per_step
    fpt = flops_per_token(spec.model, spec.data.seq_len)["train"]
    peak, peak_source = peak_flops(spec.model.dtype)
    peak_total = peak * jax.device_count()
    summary = {
        "n_params": rs.n_params,
        "flops_per_token": fpt,
        "compile_s": compile_s,
        "compiled_step_reused": reused,
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "devices": jax.device_count(),
        "mesh": dict(rs.mesh.shape),
        "memory_estimate": mem_estimate,
        "memory_compiled": mem_compiled,
    }
    log.info("run %s: %s", spec.name, json.dumps(summary))
    if step == 0:
        writer.write(0, {"event": "start", **summary, "provenance": provenance()})

    schedule = make_schedule(t)
    bar = progress_bar(t.steps, step, spec.name)
    inflight: collections.deque = collections.deque()
    profiler = _Profiler(t.profile_steps, os.fspath(epath.Path(workdir) / "profile"))
    last_eval: dict = {}
    t_start = t_window = time.perf_counter()
    data_s = 0.0  # host time spent getting batches in the current log window
    paused_s = 0.0  # time of evaluations and checkpoints in the current log window
    try:
        if pre.signal is not None:  # arrived during start-up: nothing new to save
            log.warning("signal %d during start-up: exiting before training", pre.signal)
            signalled = pre.signal
        with jax.set_mesh(rs.mesh), sharding.axis_rules(rs.rules):
            while step < t.steps and signalled is None:
                profiler.maybe_start(step)
                t_data = time.perf_counter()
                batch = data_lib.to_global(
                    next(train_iter), rs.mesh, rs.batch_sharding.spec, spec.data.batch_size
                )
                data_s += time.perf_counter() - t_data
                state, metrics = train_step(state, batch)
                inflight.append(metrics["loss"])
                if len(inflight) > MAX_IN_FLIGHT:
                    # Waits for an older step, never transfers: the host runs ahead by a
                    # bounded number of steps (XLA:CPU collectives can deadlock otherwise).
                    jax.block_until_ready(inflight.popleft())
                step += 1
                profiler.maybe_stop(step, metrics["loss"])
                tokens_seen += tokens_per_step
                window.append(metrics)
                bar.update(1)
                last = step == t.steps
                preempted = pre.stop_at(step)  # read once: a signal may land any time
                due_log = step % t.log_every == 0 or last
                due_ckpt = step % t.checkpoint_every == 0 or last or preempted
                host = jax.device_get(window) if due_log or due_ckpt else []
                if host:
                    _check_finite(host, step, ckpt)
                if due_log:
                    dt = time.perf_counter() - t_window - paused_s
                    row = _summarise(host)
                    if spec.model.moe is not None and "moe/expert_fraction" in row:
                        k = spec.model.moe.top_k
                        row.update(health.health_row(row["moe/expert_fraction"], k, alarm, step))
                    timed = len(window) - carried  # steps run (and timed) in this window
                    tps = tokens_per_step * timed / dt
                    row.update(
                        tokens=tokens_seen,
                        lr=float(np.asarray(schedule(step - 1))),
                        step_time_s=dt / timed,
                        tokens_per_s=tps,
                        mfu=fpt * tps / peak_total,
                        # The host fetches batch n+1 while steps n-1 and n run (async dispatch,
                        # MAX_IN_FLIGHT); this stays far below step_time_s unless input-bound.
                        data_time_s=data_s / timed,
                    )
                    writer.write(step, row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    if bar.disable and jax.process_index() == 0:  # no live bar: one line
                        log.info(
                            "%s step %d/%d: loss %.4f, %s tokens/s",
                            spec.name,
                            step,
                            t.steps,
                            row["loss"],
                            f"{tps:,.0f}",
                        )
                    window, t_window, data_s, carried = [], time.perf_counter(), 0.0, 0
                    paused_s = 0.0
                if last or (t.eval_every and step % t.eval_every == 0):
                    t_eval = time.perf_counter()
                    if last and t.final_eval:  # every token of the final splits
                        scores = score_splits(
                            workdir, eval_step, state, step, spec, prep, rs, t.final_splits
                        )
                        last_eval = scores[t.final_splits[0]]
                    else:
                        last_eval = evaluate_split(
                            eval_step,
                            state,
                            prep.splits["validation"],
                            spec.data,
                            rs,
                            prep.tokenizer.token_bytes,
                            max_batches=t.eval_batches,
                        )
                    last_eval = {k: v for k, v in last_eval.items() if k != "blocks"}
                    writer.write(
                        step,
                        {"tokens": tokens_seen, **{f"val_{k}": v for k, v in last_eval.items()}},
                    )
                    timing.eval_s += time.perf_counter() - t_eval
                    paused_s += time.perf_counter() - t_eval
                if due_ckpt:
                    t_ckpt = time.perf_counter()
                    meta = {
                        "step": step,
                        "tokens_seen": tokens_seen,
                        "name": spec.name,
                        "train_time_s": time_before + time.perf_counter() - t_start,
                        "timing": {  # wall time so far, for a resumed run's total
                            **dataclasses.asdict(timing),
                            "wall_s": timing.wall_s + time.perf_counter() - t_entry,
                        },
                        "window": [  # (dtype, values): the float32 means stay bit-exact
                            {
                                k: (str(np.asarray(v).dtype), np.asarray(v).tolist())
                                for k, v in r.items()
                            }
                            for r in (host if window else [])
                        ],
                        "collapse_runs": list(alarm.runs),  # after this step's log row
                    }
                    ckpt.save(step, state, meta, force=last or preempted)
                    timing.checkpoint_s += time.perf_counter() - t_ckpt
                    paused_s += time.perf_counter() - t_ckpt
                if preempted:
                    log.warning(
                        "signal %d: saved a checkpoint at step %d, exiting", pre.signal, step
                    )
                    writer.write(step, {"event": "preempted", "signal": pre.signal})
                    signalled = pre.signal
                    break
            if step == t.steps and step > first_step:  # not again when rerun once finished
                train_time = time_before + time.perf_counter() - t_start
                timing.wall_s += time.perf_counter() - t_entry
                timing.loop_s = train_time
                writer.write(
                    step,
                    {
                        "event": "end",
                        "train_time_s": train_time,
                        "tokens": tokens_seen,
                        **timing.split(),
                    },
                )
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    return {
        "step": step,
        "preempted": signalled is not None,
        **{f"val_{k}": v for k, v in last_eval.items()},
    }


def _check_finite(host_window: list[dict], step: int, ckpt: Checkpointer) -> None:
    losses = np.array([float(m["loss"]) for m in host_window])
    if not np.all(np.isfinite(losses)):
        bad = step - len(losses) + int(np.argmax(~np.isfinite(losses))) + 1
        kept = ckpt.steps()
        raise NonFiniteLossError(
            f"training loss is {losses[~np.isfinite(losses)][0]} at step {bad}; stopped. "
            f"Last good checkpoint: {kept[-1] if kept else 'none'}. Train again with a lower "
            "train.lr or a train.grad_clip: add --config.train.resume=False, which moves this "
            "run aside (a changed config cannot resume it)"
        )
