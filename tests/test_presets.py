"""The gpu and pod presets train on a single-epoch corpus at >= 20 tokens per parameter, as
``train.py --dry_run`` prints it: every run resolved, nothing prepared, trained or written."""

import os
import random
import re
import subprocess
import sys

import pytest

from configs import compare
from ffn_jax import data, sweep
from ffn_jax.cli import run_dry
from tests.helpers import run_spec, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_LINE = "training split: 9,900,000,000 tokens (declared: sweep.train_tokens_available)"


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def table(stdout: str) -> dict[str, dict]:
    """The dry run's rows by name: runs, params (total, active), tokens, tokens/param, epochs."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[1:2] == ["runs"]) + 1
    rows = {}
    for line in lines[start:]:
        if line.startswith("training split:"):
            break
        name, runs, total, active, tokens, per_param, epochs = line.split()
        rows[name] = {
            "runs": runs,
            "total": int(total.replace(",", "")),
            "active": int(active.replace(",", "")),
            "tokens": int(tokens.replace(",", "")),
            "per_param": float(per_param),
            "epochs": None if epochs == "unknown" else float(epochs),
        }
    return rows


@pytest.mark.parametrize("preset", ["gpu", "pod"])
def test_gpu_and_pod_stream_a_dataset_by_name_with_a_32k_bpe(preset):
    c = compare.get_config(preset)
    d = c.data
    assert (d.corpus, d.hf_streaming, d.tokenizer, d.vocab_size) == ("hf", True, "bpe", 32768)
    assert d.hf_name and d.hf_config
    assert c.sweep.train_tokens_available == compare.FINEWEB_EDU_TRAIN_TOKENS


@pytest.mark.parametrize("preset", ["gpu", "pod"])
def test_gpu_and_pod_dry_run_one_epoch_at_most_20_tokens_per_param_at_least(preset, tmp_path):
    workdir = tmp_path / "run"
    out = cli(f"--config=configs/compare.py:{preset}", f"--workdir={workdir}", "--dry_run")
    assert out.returncode == 0, out.stderr
    c = compare.get_config(preset)
    rows = table(out.stdout)
    assert list(rows) == [cell.name for cell in sweep.cells(c)], out.stdout
    for name, row in rows.items():
        assert row["tokens"] == c.train.steps * c.data.batch_size * c.data.seq_len
        assert row["per_param"] == pytest.approx(row["tokens"] / row["active"], abs=0.05)
        assert row["per_param"] >= 20, (name, row)
        assert row["epochs"] is not None and row["epochs"] <= 1, (name, row)
        assert row["runs"] == str(c.sweep.seeds)
    moe = next(row for name, row in rows.items() if name.startswith("moe_top1"))
    assert moe["total"] > 3 * moe["active"]  # MoE: active parameters count
    if preset == "gpu":  # three widths for the loss-vs-compute fit
        assert len({name.split("-")[1] for name in rows if name.startswith("relu")}) == 3
    assert SPLIT_LINE in out.stdout
    assert not workdir.exists()


def test_dry_run_past_one_epoch_is_a_one_line_error(tmp_path):
    workdir = tmp_path / "run"
    out = cli(
        "--config=configs/compare.py:gpu",
        "--config.sweep.variants=relu,swiglu",
        "--config.train.steps=10000000",
        f"--workdir={workdir}",
        "--dry_run",
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: \S+-s0: 655,360,000,000 training tokens are 66\.20 epochs of the "
        r"9,900,000,000-token training split; lower train\.steps .*",
        errors[0],
    ), errors
    assert "66.198" in out.stdout  # the table is still printed
    assert not workdir.exists()


def test_dry_run_reports_config_problems_of_every_run(tmp_path):
    out = cli(
        "--config=configs/compare.py:pod",
        "--config.model.n_heads=5",
        f"--workdir={tmp_path / 'run'}",
        "--dry_run",
    )
    assert out.returncode == 2
    assert "error: model.d_model=1024 is not divisible by model.n_heads=5" in out.stderr
    assert not (tmp_path / "run").exists()


def _write_docs(directory, n=6, words=900):
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(80)]
    directory.mkdir()
    for i in range(n):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(words)))


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_dry_run_epochs_from_the_cached_split_and_never_prepares(tokenizer, tmp_path, capsys):
    _write_docs(tmp_path / "docs")
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    config = tiny(
        **{
            "data.corpus": "text",
            "data.paths": str(tmp_path / "docs"),
            "data.cache_dir": str(cache),
            "data.tokenizer": tokenizer,
            "data.vocab_size": 300,
            "train.steps": 2,
            "train.warmup_steps": 1,
        }
    )
    run_dry(config, str(workdir))
    assert "training split: unknown (not prepared)" in capsys.readouterr().out
    assert not cache.exists() and not workdir.exists()

    train = data.prepare(run_spec(config).data).splits["train"]
    run_dry(config, str(workdir))
    out = capsys.readouterr().out
    assert f"training split: {train.n_tokens:,} tokens (cached shard {train.path.name})" in out
    [row] = table(out).values()
    assert row["epochs"] == pytest.approx(2 * 16 * 64 / train.n_tokens, abs=5e-4)
    assert not workdir.exists()
