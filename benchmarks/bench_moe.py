"""MoE FFN step time (forward + backward) vs the dense FFN of the same active FLOPs.

Prints one JSON line per measurement. Parts:

* ``single`` (one device): the MoE layer (capacity, dropless ragged, dropless loop) and the
  dense comparator (an FFN of width ``k * expert_width``), alone and in a small LM-like stack
  of pre-norm residual blocks (``x + ffn(rmsnorm(x))``, no attention, to isolate the FFN).
* ``sharded``: the MoE layer on meshes ``(data, expert)`` over 8 devices vs the same layer
  on one device. Needs 8 devices: run in its own process (``all`` does that for you, with
  ``--xla_force_host_platform_device_count=8`` on CPU).

    python benchmarks/bench_moe.py                 # both parts
    python benchmarks/bench_moe.py --part single --variant swiglu --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "single", "sharded"), default="all")
    ap.add_argument("--variant", default="swiglu")
    ap.add_argument("--d_model", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--capacity_factor", type=float, default=1.25)
    ap.add_argument("--layers", type=int, default=4, help="blocks in the LM-like stack")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)",
    )
    return ap.parse_args()


def _time_step(step, *args, repeats: int) -> dict[str, float]:
    """Median and min wall time (ms) of ``step(*args)`` after two warm-up calls."""
    import jax

    for _ in range(2):
        jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(1e3 * (time.perf_counter() - t0))
    return {"ms": round(statistics.median(times), 3), "ms_min": round(min(times), 3)}


def _make(args, kind: str, n_layers: int):
    """A module (one FFN or a stack) of ``kind``: dense | capacity | ragged | loop."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs.base import get_config
    from ffn_jax.ffn import FFN, matched_d_ff
    from ffn_jax.moe import MoEFFN, MoESettings, moe_aux_loss

    d_ff = matched_d_ff(args.variant, args.d_model)
    dtype = jnp.dtype(args.dtype)
    cfg = get_config(args.variant).model.moe
    cfg.num_experts, cfg.top_k, cfg.capacity_factor = args.experts, args.top_k, args.capacity_factor
    cfg.dispatch = "capacity" if kind == "capacity" else "dropless"
    cfg.dropless_impl = "ragged" if kind == "capacity" else kind
    settings = MoESettings.from_block(cfg.to_dict(), d_ff)

    def build(i: int):
        rngs = nnx.Rngs(i)
        if kind == "dense":
            return FFN(args.d_model, args.top_k * d_ff, args.variant, dtype=dtype, rngs=rngs)
        return MoEFFN(args.d_model, settings, variant=args.variant, dtype=dtype, rngs=rngs)

    class Stack(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([build(i) for i in range(n_layers)])

        def __call__(self, x):
            loss = 0.0
            for layer in self.layers:
                h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
                out = layer(h)
                if isinstance(out, tuple):
                    out, aux = out
                    loss = loss + moe_aux_loss(aux, settings)
                x = x + out
            return jnp.mean(jnp.square(x)) + loss

    return Stack()


def _step_fn(module):
    """A jitted forward+backward step of ``module`` on ``x`` (grads of all params)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)

    @jax.jit
    def step(state, x):
        return jax.value_and_grad(lambda s: nnx.merge(graphdef, s)(x))(state)

    return step, state


def _emit(**row) -> None:
    print(json.dumps(row), flush=True)


def run_single(args) -> None:
    import jax

    x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.d_model))
    for n_layers, bench in ((1, "layer"), (args.layers, "stack")):
        dense_ms = None
        for kind in ("dense", "capacity", "loop", "ragged"):
            step, state = _step_fn(_make(args, kind, n_layers))
            t = _time_step(step, state, x, repeats=args.repeats)
            dense_ms = t["ms"] if kind == "dense" else dense_ms
            _emit(
                bench=f"{bench}_fwd_bwd",
                impl=kind,
                layers=n_layers,
                variant=args.variant,
                tokens=args.batch * args.length,
                d_model=args.d_model,
                experts=args.experts,
                top_k=args.top_k,
                capacity_factor=args.capacity_factor,
                dtype=args.dtype,
                vs_dense=round(t["ms"] / dense_ms, 3),
                device=jax.devices()[0].platform,
                **t,
            )


def run_sharded(args) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ffn_jax import sharding

    if len(jax.devices()) < 8:
        _emit(bench="sharded_fwd_bwd", skipped=f"needs 8 devices, found {len(jax.devices())}")
        return
    x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.d_model))
    rules = sharding.DEFAULT_RULES
    for kind in ("capacity", "loop"):
        module = _make(args, kind, 1)
        step, state = _step_fn(module)
        base = _time_step(step, state, x, repeats=args.repeats)
        _emit(bench="sharded_fwd_bwd", impl=kind, mesh="none (1 device)", **base)
        for data, expert in ((1, 8), (2, 4), (8, 1)):
            shape = dict(data=data, fsdp=1, expert=expert, tensor=1)
            mesh = sharding.make_mesh(shape)
            with sharding.axis_rules(rules), jax.set_mesh(mesh):
                placed = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
                xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
                t = _time_step(step, placed, xs, repeats=args.repeats)
            _emit(
                bench="sharded_fwd_bwd",
                impl=kind,
                mesh=f"data={data},expert={expert}",
                devices=len(jax.devices()),
                vs_one_device=round(t["ms"] / base["ms"], 3),
                **t,
            )


def main() -> None:
    args = _parse()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ffn_jax.host import prepare_process

    prepare_process()  # XLA:CPU flags, then huge-page malloc, as train.py (ffn_jax/host.py)
    import jax

    args.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if args.part in ("all", "single"):
        run_single(args)
    if args.part == "sharded":
        run_sharded(args)
    elif args.part == "all":
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
        argv = [f"--{k}={v}" for k, v in vars(args).items() if k != "part"]
        subprocess.run([sys.executable, __file__, "--part=sharded", *argv], env=env, check=True)


if __name__ == "__main__":
    main()
