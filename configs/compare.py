"""The variant comparison: every FFN variant x seeds on the same data, steps and seeds.

    python train.py --config=configs/compare.py --workdir=runs/compare        # cpu preset
    python eval.py --workdir=runs/compare                                      # the table
    python train.py --config=configs/compare.py:quick --workdir=/tmp/quick    # smoke run
    python train.py --config=configs/compare.py:gpu --workdir=runs/gpu        # one GPU

Presets:
  cpu    (default) every dense variant (minus the tanh GELU forms) + two MoE FFNs at matched
         active parameters, 3 seeds; sized to finish in <= 30 minutes on a 2-core CPU
  quick  3 variants x 2 seeds, a few minutes on a CPU (smoke run)
  gpu    ~85M-parameter models (GPT-2-small width, 8 layers), bf16, for one GPU
  pod    ~350M-parameter models for a TPU/GPU pod slice (FSDP over the data axis)

Dense variants are parameter-matched by the d_ff rule (gated variants get 2/3 width).
MoE presets are matched in *active* parameters and FLOPs per token to the dense SwiGLU:
``moe_top1`` routes each token to 1 of 8 experts of full width (Switch), ``moe_fine`` to
2 of 16 half-width experts (fine-grained, granularity 2); total parameters are reported.
``original`` (add it with ``--config.sweep.variants=...,original``) is the 2017 block:
post-norm LayerNorm, ReLU with biases, dropout 0.1, learned positions.
"""

from __future__ import annotations

from ml_collections import config_dict

from configs import base
from ffn_jax.ffn import VARIANTS

DENSE = [name for name in VARIANTS if name != "silu"]  # silu is an alias of swish
# The 2-core CPU budget (30 min) skips the tanh forms of GELU/GEGLU: they differ from the
# exact forms by < 1e-3 in activation value; the gpu and pod presets include them.
CPU_DENSE = [name for name in DENSE if not name.endswith("_tanh")]

MOE_PRESETS = {
    # Switch top-1 over 8 full-width SwiGLU experts: active params = the dense SwiGLU.
    "moe_top1": dict(ffn="swiglu", num_experts=8, top_k=1, granularity=1),
    # Fine-grained: 8 experts split in 2 -> 16 half-width experts, top-1 x 2 = top-2.
    "moe_fine": dict(ffn="swiglu", num_experts=8, top_k=1, granularity=2),
}

PRESETS = {
    # size, variants, seeds, steps, overrides
    "cpu": dict(
        size="small",
        variants=CPU_DENSE + list(MOE_PRESETS),
        seeds=3,
        steps=160,
        d_model=128,
        n_layers=4,
        n_heads=4,
        seq_len=128,
        batch_size=16,
        tokenizer="byte",
        lr=3e-3,
        warmup=16,
        eval_every=40,
        eval_batches=8,
    ),
    "quick": dict(
        size="tiny",
        variants=["relu", "swiglu", "moe_top1"],
        seeds=2,
        steps=60,
        d_model=64,
        n_layers=2,
        n_heads=4,
        seq_len=64,
        batch_size=16,
        tokenizer="byte",
        lr=3e-3,
        warmup=6,
        eval_every=20,
        eval_batches=4,
    ),
    "gpu": dict(
        size="gpu",
        variants=DENSE + list(MOE_PRESETS),
        seeds=3,
        steps=5000,
        d_model=768,
        n_layers=8,
        n_heads=12,
        seq_len=1024,
        batch_size=64,
        tokenizer="bpe",
        lr=6e-4,
        warmup=250,
        eval_every=500,
        eval_batches=32,
    ),
    "pod": dict(
        size="gpu",
        variants=DENSE + list(MOE_PRESETS),
        seeds=3,
        steps=20000,
        d_model=1024,
        n_layers=24,
        n_heads=16,
        seq_len=1024,
        batch_size=256,
        tokenizer="bpe",
        lr=3e-4,
        warmup=1000,
        eval_every=1000,
        eval_batches=64,
    ),
}


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    """The sweep config for preset ``arg`` (default ``cpu``)."""
    preset = arg or "cpu"
    if preset not in PRESETS:
        raise ValueError(
            f"config arg {preset!r} is not a compare preset; use one of {list(PRESETS)}"
        )
    p = PRESETS[preset]
    c = base.get_config(f"swiglu,size={p['size']}")
    c.name = f"compare-{preset}"
    m, d, t = c.model, c.data, c.train
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = (
        p["d_model"],
        p["n_layers"],
        p["n_heads"],
        p["n_heads"],
    )
    d.seq_len, d.batch_size, d.tokenizer = p["seq_len"], p["batch_size"], p["tokenizer"]
    t.steps, t.lr, t.warmup_steps = p["steps"], p["lr"], p["warmup"]
    t.eval_every, t.eval_batches = p["eval_every"], p["eval_batches"]
    t.log_every = min(t.log_every, p["eval_every"])
    t.checkpoint_every = p["steps"] // 2
    if preset == "pod":
        c.mesh.shape.data, c.mesh.shape.fsdp = 1, -1

    s = c.sweep = config_dict.ConfigDict()
    s.variants = ",".join(p["variants"])  # comma-separated; override to run a subset
    s.seeds = p["seeds"]  # seeds 0 .. n-1 (init and data order)
    s.axes = ""  # grid over any fields, e.g. "train.lr=1e-3,3e-3" (';' between axes)
    # Named variants beyond the registry: model / model.moe fields (MoE, the 2017 block).
    s.presets = config_dict.ConfigDict(
        {
            **MOE_PRESETS,
            "original": dict(ffn="relu", max_seq_len=p["seq_len"], **base.PRESETS["original"]),
        }
    )
    return c
