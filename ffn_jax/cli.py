"""What ``train.py`` and ``eval.py`` do, behind the absl flag parsing: logging set-up,
single run vs sweep, and turning user errors into one clear line and a non-zero exit."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from etils import epath
from ml_collections import ConfigDict

from ffn_jax.configuration import ConfigError, resolve
from ffn_jax.files import check_workdir_backend, normalize_workdir
from ffn_jax.spec import DataSpec, DistributedSpec, RunSpec, distributed_spec
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
    the line the user needs is the last one, on a line of its own. For the entry points
    only: the process exits.
    """
    sys.stderr.flush()
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    # A leading newline: another thread may have left a partial line on stderr just before.
    os.write(real, f"\nerror: {message}\n".encode())
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
    """Train ``config`` (a single run, or every run of a sweep config) into ``workdir`` (a
    local directory, made absolute, or an object-store URL such as ``gs://bucket/run``)."""
    _setup_logging()
    from ffn_jax import distributed, sweep
    from ffn_jax.trainer import train_and_evaluate

    workdir = normalize_workdir(workdir)
    try:
        check_workdir_backend(workdir)
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


# ---- train.py --dry_run -----------------------------------------------------------------


@dataclass(frozen=True)
class _DryRow:
    """One row of the dry run: the single run, or one variant (cell) of a sweep with its
    number of runs (``least``..``most``: a tuning grid may grow) and its runs' specs."""

    name: str
    least: int
    most: int
    specs: list[RunSpec]

    @property
    def runs(self) -> str:
        return f"{self.least}" if self.most == self.least else f"{self.least}-{self.most}"


def run_dry(config: ConfigDict, workdir: str) -> None:
    """``train.py --dry_run``: resolve and check every run of ``config`` (one run, or each
    variant of a sweep) and print its parameters, training tokens (steps x batch x seq_len),
    tokens per (active) parameter and epochs of the training split. Prepares no data,
    compiles and trains nothing, and writes nothing (``workdir`` is not created). Exits 2 on
    a config problem or when a run would train for more than one epoch."""
    del workdir  # the same command line as training, but nothing is written
    _setup_logging()
    from ffn_jax.report import param_counts

    try:
        rows = _dry_rows(config)
    except ConfigError as e:
        _fail(str(e).replace("\n", "\nerror: "), 2)
        return
    least, most = sum(r.least for r in rows), sum(r.most for r in rows)
    print(
        f"dry run of {config.name}: {least if least == most else f'{least}-{most}'} run(s); "
        "no data prepared, nothing compiled, trained or written"
    )
    print(
        f"{'variant' if 'sweep' in config else 'run':<16} {'runs':>5} "
        f"{'params total':>14} {'params active':>14} {'train tokens':>15} "
        f"{'tokens/param':>13} {'epochs':>8}"
    )
    splits: dict[DataSpec, tuple[int | None, str]] = {}  # data spec -> training split, its source
    over = []  # (epochs, run, tokens, split) of runs past one epoch
    for row in rows:
        counts = param_counts(row.specs[0].model)
        spec = max(row.specs, key=lambda s: s.train.steps * s.tokens_per_step)
        tokens = spec.train.steps * spec.tokens_per_step
        if spec.data not in splits:
            splits[spec.data] = _train_split(config, spec.data)
        split = splits[spec.data][0]
        epochs = f"{tokens / split:.3f}" if split else "unknown"
        if split and tokens > split:
            over.append((tokens / split, spec.name, tokens, split))
        print(
            f"{row.name:<16} {row.runs:>5} {counts['params_total']:>14,} "
            f"{counts['params_active']:>14,} {tokens:>15,} "
            f"{tokens / counts['params_active']:>13.1f} {epochs:>8}"
        )
    for split, source in dict.fromkeys(splits.values()):
        print(f"training split: {f'{split:,} tokens ({source})' if split else source}")
    if over:
        epochs, run, tokens, split = max(over)
        _fail(
            f"{run}: {tokens:,} training tokens are {epochs:.2f} epochs of the {split:,}-token "
            "training split; lower train.steps or data.batch_size, or use a bigger corpus",
            2,
        )


def _dry_rows(config: ConfigDict) -> list[_DryRow]:
    """The dry run's rows, every run resolved (a tuned sweep: its grid's runs; the final
    stage differs only in seed and the tuned value). ConfigError with every problem."""
    from ffn_jax import sweep

    if not sweep.is_sweep(config):
        return [_DryRow(str(config.name), 1, 1, [resolve(config)])]
    sweep.runs(config)  # checks sweep.seeds and sweep.tune
    block: Any = config.sweep
    seeds, tune = block.seeds, sweep.Tuning.of(config)
    rows, problems = [], []
    for cell in sweep.cells(config):
        if tune is None:
            runs = [cell.run(seed) for seed in range(seeds)]
            least = most = seeds
        else:
            runs = [cell.run(i, {tune.field: v}) for v in tune.values for i in range(tune.seeds)]
            least = len(runs) + seeds - tune.seeds  # + the final stage's other seeds
            most = least + tune.max_extend * tune.seeds
        specs = []
        for run in runs:
            try:
                specs.append(resolve(sweep.run_config(config, run), group=run.group))
            except ConfigError as e:
                problems += e.problems
        rows.append(_DryRow(cell.name, least, most, specs))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return rows


def _train_split(config: ConfigDict, d: DataSpec) -> tuple[int | None, str]:
    """Tokens in the training split of the data spec ``d`` and where the figure comes from:
    a sweep's declared ``sweep.train_tokens_available`` (a streamed corpus, whose size is
    unknown until it is read), else the training shard already in the cache; ``(None,
    why)`` when neither is there. Nothing is fetched, trained or tokenised."""
    block: Any = config.get("sweep")
    declared = block.get("train_tokens_available") if block is not None else None
    if declared:
        return int(declared), "declared: sweep.train_tokens_available"
    from ffn_jax.data.pipeline import cached_split_tokens

    return cached_split_tokens(d, "train")


def run_eval(
    workdir: str,
    *,
    step: int | None = None,
    sample_prompt: str | None = None,
    temperature: float = 0.0,
    max_new_tokens: int = 200,
    seed: int = 0,
    dist: DistributedSpec | None = None,
) -> None:
    """Evaluate the run (or the sweep) in ``workdir`` (a local directory or an object-store
    URL), or sample from it. ``dist`` (``eval.py --distributed.*``) joins a multi-process
    job the way ``train.py``'s ``config.distributed`` does; every process then samples."""
    _setup_logging()
    from ffn_jax import distributed, sweep
    from ffn_jax.evaluate import evaluate_run, sample

    workdir = normalize_workdir(workdir)
    try:
        if dist is not None and distributed.initialize(dist):  # before jax touches devices
            distributed.log_from_process_zero_only()
        check_workdir_backend(workdir)
        if not epath.Path(workdir).is_dir():
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
            scores = evaluate_run(workdir, step)
            for split in ("validation", "test"):
                scores[split].pop("blocks")  # per-block sums: in eval.json, not the summary
            print(json.dumps(scores, indent=2))
    except (ConfigError, OSError, ValueError, RuntimeError) as e:  # incl. DistributedInitError
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

    workdir = normalize_workdir(workdir)
    try:
        check_workdir_backend(workdir)
        if not epath.Path(workdir).is_dir():
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
        print(epath.Path(workdir) / "inspect.md")
    except (ConfigError, OSError, ValueError) as e:
        _fail(_message(e), 2)
