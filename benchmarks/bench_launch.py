"""Launch stress: N local processes start the same sweep command together, R times.

    python benchmarks/bench_launch.py                          # 16 processes x 10 rounds
    python benchmarks/bench_launch.py --processes=4 --rounds=3

Each round starts ``--processes`` copies of ``train.py --config=configs/compare.py:quick``
(cut to one variant, one seed, no tuning stage and ``--steps`` steps) as the processes of
one ``jax.distributed`` job on this machine, one simulated CPU device each, into a fresh
workdir, all at once, the way a pod or a SLURM array starts them. It checks what a
multi-host launch used to get wrong at start (issue 17: every process wrote ``sweep.json``
through one temporary name, and ~40% of 16-process launches crashed): every process exits
0 within ``--timeout`` seconds, and the sweep's files are whole. One JSON line per round
(exit codes, wall seconds, failures with the last line of stderr), then a ``summary`` line;
exit status 1 if any round failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(workdir: str, port: int, n: int, i: int, steps: int) -> list[str]:
    overrides = {
        "sweep.variants": "relu",
        "sweep.seeds": 1,
        "sweep.tune.field": "",
        "train.steps": steps,
        "train.warmup_steps": 0,
        "train.eval_every": steps,
        "train.eval_batches": 1,
        "train.final_val_batches": 1,
        "distributed.coordinator_address": f"localhost:{port}",
        "distributed.num_processes": n,
        "distributed.process_id": i,
    }
    return [
        sys.executable,
        "train.py",
        "--config=configs/compare.py:quick",
        f"--workdir={workdir}",
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]


def _env() -> dict[str, str]:
    flags = " ".join(
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1".strip(),
    }


def _files_whole(workdir: str) -> list[str]:
    """Problems with the sweep's JSON files in ``workdir`` (empty when every one parses)."""
    problems = []
    for name in ("sweep.json",):
        path = os.path.join(workdir, name)
        try:
            with open(path) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            problems.append(f"{name}: {e}")
    return problems


def one_round(n: int, steps: int, timeout: float) -> dict:
    """Start ``n`` processes of one job together; wait for all; report."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir, port = os.path.join(tmp, "sweep"), _free_port()
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                _command(workdir, port, n, i, steps),
                cwd=ROOT,
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(n)
        ]
        codes, errors = [], {}
        deadline = start + timeout
        for i, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                _, err = p.communicate()
                codes.append("timeout")
            else:
                codes.append(p.returncode)
            if codes[-1] != 0:
                lines = [line for line in (err or "").splitlines() if line.strip()]
                errors[i] = lines[-1] if lines else ""
        wall = time.perf_counter() - start
        problems = _files_whole(workdir) if not errors else []
    return {
        "processes": n,
        "ok": not errors and not problems,
        "exit_codes": codes,
        "wall_s": round(wall, 1),
        "errors": errors,
        "file_problems": problems,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--processes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2, help="training steps of the one run")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per round")
    args = ap.parse_args()
    failed = 0
    for r in range(args.rounds):
        row = {"round": r, **one_round(args.processes, args.steps, args.timeout)}
        failed += not row["ok"]
        print(json.dumps(row), flush=True)
    summary = {"summary": True, "rounds": args.rounds, "failed": failed}
    print(json.dumps({**summary, "processes": args.processes}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
