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
    """Print ``error: message`` as the last line of stderr and exit with ``code``.

    After a failed checkpoint restore, orbax / TensorStore threads still print tracebacks
    while the interpreter shuts down. Everything else written to stderr from here on (any
    thread, Python or native) goes to /dev/null, and the error line is written past it, so
    the line the user needs is the last one. For the entry points only: the process exits.
    """
    sys.stderr.flush()
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.write(real, f"error: {message}\n".encode())
    sys.exit(code)


def _message(e: Exception) -> str:
    """The line to print for ``e``: a system error (a workdir that is a file, a read-only
    directory) as path, reason and fix; the project's own errors as they are."""
    if isinstance(e, OSError) and e.errno is not None and e.filename:
        return (
            f"{e.filename}: {e.strerror}; --workdir and data.cache_dir must be writable "
            "directories (or creatable)"
        )
    return str(e)


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line: the innermost wrapped exception's text, the last
    line of an embedded traceback."""
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    if "Traceback (most recent call last)" in text:
        text = text.strip().splitlines()[-1]
    return " ".join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for the entry points (``app.run(main, flags_parser=parse_flags)``),
    every error as one ``error:`` line and exit 2: a typo in a ``--config.`` override (with
    ml_collections' suggestion), a missing or broken config file, an unknown flag."""
    from absl import flags

    given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    config_arg = given[-1] if given else None  # the last one wins, as in absl
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            _ = flags.FLAGS.config.keys()  # a config file that failed to load raises here
        return rest
    except flags.Error as e:
        _fail(f"{_one_line(e)} (see --helpfull)", 2)
    except (AttributeError, KeyError) as e:  # an override naming no field of the config
        _fail(
            f"a --config.* override names no field of the config: {_one_line(e)}; the "
            "fields are in configs/base.py",
            2,
        )
    except OSError as e:  # the config file could not be loaded
        cause = e.__cause__ or e
        _fail(
            f"--config={config_arg}: the config file could not be loaded "
            f"({type(cause).__name__}: {_one_line(cause)[:300]}); give an existing "
            "configs/<name>.py[:arg]",
            2,
        )
    except (TypeError, ValueError) as e:  # an override of the wrong type, a bad config arg
        _fail(_one_line(e), 2)
    raise AssertionError("unreachable")


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
    except (OSError, ValueError, distributed.DistributedInitError) as e:
        _fail(_message(e), 2)
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
    except (ConfigError, OSError, ValueError, RuntimeError) as e:
        _fail(_message(e), 2)


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
    except (ConfigError, OSError, ValueError) as e:
        _fail(_message(e), 2)
