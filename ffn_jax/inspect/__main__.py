"""``python -m ffn_jax.inspect --workdir=DIR [...]``: the same as ``eval.py --inspect``."""

import argparse

from ffn_jax.cli import run_inspect


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and run the inspection (errors: one line and a non-zero exit)."""
    ap = argparse.ArgumentParser(
        description="Key-value memories and expert specialisation "
        "of a trained run; writes inspect.md into it."
    )
    ap.add_argument("--workdir", required=True, help="a run directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--layers", default="", help="comma-separated layer indices (default: all)")
    ap.add_argument("--neurons", type=int, default=8, help="neurons per dense layer")
    ap.add_argument("--contexts", type=int, default=5, help="top contexts per neuron")
    ap.add_argument(
        "--windows",
        type=int,
        default=64,
        help="validation windows to scan, evenly spaced over the split",
    )
    ap.add_argument(
        "--experts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="expert specialisation (default: for MoE runs)",
    )
    a = ap.parse_args(argv)
    run_inspect(
        a.workdir,
        step=a.step,
        layers=a.layers,
        neurons=a.neurons,
        contexts=a.contexts,
        windows=a.windows,
        experts=a.experts,
    )


if __name__ == "__main__":
    main()
