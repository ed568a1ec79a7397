"""What ``train.py`` and ``eval.py`` do, behind the absl flag parsing: logging set-up,
single run vs sweep, and turning user errors into one clear line and a non-zero exit."""

from __future__ import annotations

import json
import logging
import os
import sys

from ml_collections import ConfigDict

from ffn_jax.configuration import ConfigError, resolve
from ffn_jax.spec import distributed_spec
from ffn_jax.trainer import NonFiniteLossError


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_train(config: ConfigDict, workdir: str) -> None:
    """Train ``config`` (a single run, or every run of a sweep config) into ``workdir``."""
    _setup_logging()
    from ffn_jax import distributed, sweep
    from ffn_jax.trainer import train_and_evaluate

    try:
        # Before anything touches jax devices:
        if distributed.initialize(distributed_spec(config.distributed)):
            distributed.log_from_process_zero_only()
        if sweep.is_sweep(config):
            sweep.train_sweep(config, workdir)
        else:
            result = train_and_evaluate(resolve(config), workdir)
            print(json.dumps(result))
    except ConfigError as e:
        _fail(str(e).replace("\n", "\nerror: "), 2)
    except (FileNotFoundError, ValueError, distributed.DistributedInitError) as e:
        _fail(str(e), 2)
    except (NonFiniteLossError, RuntimeError) as e:  # RuntimeError: no restorable checkpoint
        _fail(str(e), 1)


def run_eval(
    workdir: str,
    *,
    step: int | None = None,
    sample_prompt: str | None = None,
    temperature: float = 0.0,
    max_new_tokens: int = 200,
    seed: int = 0,
) -> None:
    """Evaluate the run (or the sweep) in ``workdir``, or sample from it."""
    _setup_logging()
    from ffn_jax import sweep
    from ffn_jax.evaluate import evaluate_run, sample

    try:
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"--workdir={workdir} does not exist")
        if sample_prompt is not None:
            print(
                sample(
                    workdir,
                    sample_prompt,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    seed=seed,
                    step=step,
                )
            )
        elif sweep.is_sweep_dir(workdir):
            print(sweep.evaluate_sweep(workdir))
        else:
            print(json.dumps(evaluate_run(workdir, step), indent=2))
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e), 2)


def run_inspect(
    workdir: str,
    *,
    step: int | None = None,
    layers: str = "",
    neurons: int = 8,
    contexts: int = 5,
    windows: int = 64,
    experts: bool | None = None,
) -> None:
    """Write the key-value memory / expert specialisation report ``inspect.md`` of the run in
    ``workdir`` (see ``ffn_jax.inspect``) and print its path."""
    _setup_logging()
    from ffn_jax.inspect import inspect_run

    try:
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"--workdir={workdir} does not exist")
        inspect_run(
            workdir,
            layers=layers,
            neurons=neurons,
            contexts=contexts,
            windows=windows,
            experts=experts,
            step=step,
        )
        print(os.path.join(workdir, "inspect.md"))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
