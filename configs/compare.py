"""The variant comparison: every FFN variant x seeds on the same data, steps and seeds.

    python train.py --config=configs/compare.py --workdir=runs/compare        # cpu preset
    python eval.py --workdir=runs/compare                                      # the table
    python train.py --config=configs/compare.py:quick --workdir=/tmp/quick    # smoke run
    python train.py --config=configs/compare.py:gpu --workdir=runs/gpu        # one GPU
    python train.py --config=configs/compare.py:gpu --workdir=runs/gpu --dry_run  # sizes only

Presets:
  cpu    (default) every dense variant (minus the tanh GELU forms) + two MoE FFNs at matched
         active parameters; a learning-rate tuning stage (5 rates, x2 apart, seed 0), then
         5 seeds at each variant's own rate; 256 steps (524k tokens, every dense variant
         past the byte 3-gram); about 100 runs on a 2-core CPU (see README for its time).
         Selection and the val column use 16 evenly spaced validation batches
         (``train.final_val_batches``); the test split is scored in full
  quick  3 variants, a 3-point rate grid, 2 seeds: a few minutes on a CPU (smoke run)
  init   the cpu dense variants at both ``model.ffn_init`` values (default, unit_variance),
         one shared rate, 2 seeds: whether the ranking survives unit-variance activations
  moe    routers and load balancing at the cpu shape (``moe_fine``'s experts): softmax or
         sigmoid scores x aux-loss, loss-free (bias step 1e-3 and 1e-2) or no balancing,
         plus expert choice; 4 seeds at one rate, contrasts against ``softmax_aux``;
         router health in the report
  gpu    82M-parameter models (GPT-2-small width, 8 layers), bf16, for one GPU
  pod    336M-parameter models (d_model 1024, 24 layers) for a TPU/GPU pod slice (FSDP
         over the data axis)

The gpu and pod presets train on FineWeb-Edu, ``HuggingFaceFW/fineweb-edu`` config
``sample-10BT`` ("around 10B GPT-2 tokens", the dataset card), streamed by name (the ``hf``
extra: ``pip install -e .[hf]``), with a 32k BPE trained on its training split. 0.5% of the
documents each are held out for validation and test, which leaves ~9.9B training tokens
(``FINEWEB_EDU_TRAIN_TOKENS``, declared to the dry run as ``sweep.train_tokens_available``;
the 32k BPE's count is taken to be about GPT-2's, not measured). No run sees a token twice:

  preset  params (active)  training tokens per run        tokens/param  epochs  FLOPs/token
  gpu     81.8M-81.9M      32,000 x 64 x 1024 = 2.10B             25.6    0.21       0.57G
  pod     335.4M-335.8M    14,000 x 512 x 1024 = 7.34B            21.9    0.74       2.32G

The MoE rows have the dense SwiGLU's active parameters (346M / 1.74B in total). Expected
wall time = FLOPs/token (``ffn_jax.flops``) x tokens at an *assumed* 40% MFU of the
datasheet bf16 peak (989 TFLOP/s per H100, 459 per TPU v5p chip); training only (no
evaluation or data preparation), and MoE runs take longer than their FLOPs say:

  gpu  one H100:            ~50 min per run at d_model 768; the sweep adds widths 384 and 512
                            (for the loss-vs-compute fit, ~0.33x and ~0.51x its FLOPs):
                            ~61 h for 13 variants x 3 widths x 3 seeds = 117 runs
  pod  64 H100s:            ~11 min per run, ~7.3 h per sweep
       a v5p-64 (32 chips): ~48 min per run, ~31 h per sweep

The data is prepared once, before the first run, and cached for every run of both presets:
the stream is read, the BPE trained on the training split, and ~10B tokens written to
uint16 shards (~20 GB). ``--dry_run`` prints these numbers without any of it.

Dense variants are parameter-matched by the d_ff rule (gated variants get 2/3 width).
MoE presets are matched in *active* parameters and FLOPs per token to the dense SwiGLU:
``moe_top1`` routes each token to 1 of 8 experts of full width (Switch), ``moe_fine`` to
2 of 16 half-width experts (fine-grained, granularity 2); total parameters are reported.
``original`` (add it with ``--config.sweep.variants=...,original``) is the 2017 block:
post-norm LayerNorm, ReLU with biases, dropout 0.1, learned positions; ``original_moe`` the
same block with the reference MoE FFN (8 half-width GELU experts with biases, top-2, a
router bias, dropless, dropout 0.1 in the experts), to set beside a dense ``gelu`` row
(``--config.sweep.presets.original.ffn=gelu``).
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

# The ``moe`` preset's arms: ``moe_fine``'s shape (16 half-width SwiGLU experts, top-2:
# the dense SwiGLU's active parameters and FLOPs) with each router and balancing mode.
MOE_FINE = MOE_PRESETS["moe_fine"]
MOE_ARMS = {
    f"{score}_{balance}": dict(
        MOE_FINE, router=router, balance=balance.replace("lossfree", "loss_free")
    )
    for score, router in (("softmax", "topk"), ("sigmoid", "sigmoid_topk"))
    for balance in ("aux", "lossfree", "none")
}
# Loss-free balancing with a 10x bias step (1e-2): at 256 steps the default 1e-3 moves a
# bias by at most 0.256 in all, while DeepSeek-V3's runs are ~100x longer.
for score in ("softmax", "sigmoid"):
    MOE_ARMS[f"{score}_lossfree_fast"] = dict(MOE_ARMS[f"{score}_lossfree"], balance_rate=1e-2)
# Expert choice (non-causal in a decoder: a token's experts depend on later tokens),
# balanced by construction, so no balancing term; capacity factor 1: on average k experts
# per token, the token-choice arms' active FLOPs.
MOE_ARMS["expert_choice"] = dict(
    MOE_FINE, router="expert_choice", balance="none", capacity_factor=1.0
)

# The gpu and pod presets' corpus: FineWeb-Edu's ``sample-10BT`` config, streamed by name.
# The dataset card gives it as "around 10B GPT-2 tokens". 0.5% of the documents each go to
# validation and test (~50M tokens each: enough to score, and the final evaluation stays
# ~2% of a gpu run), so ~99% is training text. The 32k BPE trained on it is not GPT-2's
# tokenizer; its count has not been measured here and is taken to be about the same.
FINEWEB_EDU = dict(
    corpus="hf",
    hf_name="HuggingFaceFW/fineweb-edu",
    hf_config="sample-10BT",
    hf_split="train",
    hf_text_field="text",
    hf_streaming=True,
    heldout_fraction=0.005,
)
FINEWEB_EDU_TRAIN_TOKENS = 9_900_000_000  # 10B (the dataset card) x 0.99 (the train split)

# The cpu preset's model, data and schedule (2-core CPU scale), shared with ``init``.
CPU_RUN = dict(
    size="small",
    steps=256,
    d_model=128,
    n_layers=4,
    n_heads=4,
    seq_len=128,
    batch_size=16,
    tokenizer="byte",
    lr=4e-3,
    warmup=26,
    eval_every=64,
    eval_batches=8,
)

PRESETS = {
    # size, variants, seeds, steps, overrides
    "cpu": dict(
        CPU_RUN,
        variants=CPU_DENSE + list(MOE_PRESETS),
        seeds=5,
        tune="1e-3,2e-3,4e-3,8e-3,1.6e-2",
        final_val_batches=16,  # of the validation split's 124 batches, evenly spaced
    ),
    "quick": dict(
        size="tiny",
        variants=["relu", "swiglu", "moe_top1"],
        seeds=2,
        tune="2e-3,4e-3,8e-3",
        steps=60,
        d_model=64,
        n_layers=2,
        n_heads=4,
        seq_len=64,
        batch_size=16,
        tokenizer="byte",
        lr=4e-3,
        warmup=6,
        eval_every=20,
        eval_batches=4,
        final_val_batches=16,
    ),
    # Routers and balancing at the cpu shape: softmax vs sigmoid scores x aux-loss vs
    # loss-free vs no balancing, and expert choice; every arm at moe_fine's tuned rate
    # (4e-3 in docs/results/tuning.json), 4 seeds, paired against softmax_aux.
    "moe": dict(
        CPU_RUN,
        variants=list(MOE_ARMS),
        seeds=4,
        final_val_batches=16,
        reference="softmax_aux",
    ),
    # Parameterisation check: every cpu dense variant at both FFN inits (model.ffn_init),
    # one shared rate (the middle of the cpu grid), 2 seeds: does the ranking survive
    # unit-variance hidden activations? (~36 runs, ~35 min on the 2-core CPU.)
    "init": dict(
        CPU_RUN,
        variants=CPU_DENSE,
        seeds=2,
        axes="model.ffn_init=default,unit_variance",
    ),
    "gpu": dict(
        size="gpu",
        variants=DENSE + list(MOE_PRESETS),
        seeds=3,
        steps=32000,  # x 64 x 1024 = 2.10B tokens: >= 20 per (active) parameter, 0.21 epoch
        d_model=768,
        n_layers=8,
        n_heads=12,
        seq_len=1024,
        batch_size=64,  # ~46 GiB of activations (ffn_jax.memory): fits an 80 GB H100
        tokenizer="bpe",
        vocab_size=32768,
        data=FINEWEB_EDU,
        train_tokens=FINEWEB_EDU_TRAIN_TOKENS,
        # Three widths (head dim 64) for the loss-vs-compute fit and compute multipliers.
        axes="model.d_model+model.n_heads+model.n_kv_heads=384/6/6,512/8/8,768/12/12",
        lr=6e-4,
        warmup=1000,
        eval_every=1000,
        eval_batches=32,
    ),
    "pod": dict(
        size="gpu",
        variants=DENSE + list(MOE_PRESETS),
        seeds=3,
        steps=14000,  # x 512 x 1024 = 7.34B tokens: >= 20 per (active) parameter, 0.74 epoch
        d_model=1024,
        n_layers=24,
        n_heads=16,
        seq_len=1024,
        batch_size=512,  # 0.5M tokens per step (GPT-3 350M's batch); 8 sequences per device on 64
        tokenizer="bpe",
        vocab_size=32768,
        data=FINEWEB_EDU,
        train_tokens=FINEWEB_EDU_TRAIN_TOKENS,
        lr=3e-4,
        warmup=700,  # ~370M tokens (GPT-3's warmup)
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
    d.vocab_size = p.get("vocab_size", d.vocab_size)
    d.update(p.get("data", {}))  # gpu, pod: the streamed corpus (FINEWEB_EDU)
    t.steps, t.lr, t.warmup_steps = p["steps"], p["lr"], p["warmup"]
    t.eval_every, t.eval_batches = p["eval_every"], p["eval_batches"]
    t.final_val_batches = p.get("final_val_batches", 0)
    t.log_every = min(t.log_every, p["eval_every"])
    t.checkpoint_every = p["steps"] // 2
    if preset == "pod":
        c.mesh.shape.data, c.mesh.shape.fsdp = 1, -1
    if preset in ("cpu", "quick", "init", "moe"):
        # MoE evaluation is dropless; on CPU the scan over expert tiles is 3-5x faster than
        # jax.lax.ragged_dot (measured: 88-117 vs 315-560 ms per eval batch at the cpu shape).
        c.model.moe.dropless_impl = "loop"
        # A python loop over the stacked layers: at this size the scan's per-iteration
        # slicing and stacking cost ~10% of the step (docs/perf.md).
        c.model.scan_layers = False

    s = c.sweep = config_dict.ConfigDict()
    s.variants = ",".join(p["variants"])  # comma-separated; override to run a subset
    s.seeds = p["seeds"]  # seeds 0 .. n-1 (init and data order)
    s.axes = p.get("axes", "")  # grid over any fields, e.g. "train.lr=1e-3,3e-3" (';' between axes)
    s.reference = p.get("reference", "")  # the variant the report's contrasts are against
    # Tuning stage: each variant trains at every value of the grid (tune.seeds seeds);
    # the value of least validation loss is its own for the final stage (sweep.seeds seeds,
    # reusing the tuning runs of its value). field="" turns the stage off.
    s.tune = config_dict.ConfigDict()
    s.tune.field = "train.lr" if p.get("tune") else ""
    s.tune.grid = p.get("tune", "")  # comma-separated values (x2 steps)
    s.tune.factor = 2.0  # step past an edge of the grid when the best value sits on it
    s.tune.max_extend = 2  # at most this many extensions per variant
    s.tune.seeds = 1  # seeds per grid point (seeds 0 .. tune.seeds-1)
    # Named variants beyond the registry: model / model.moe fields (MoE, the 2017 block).
    s.presets = config_dict.ConfigDict(
        {
            **MOE_PRESETS,
            "original": dict(ffn="relu", max_seq_len=p["seq_len"], **base.PRESETS["original"]),
            # The 2017 block with the reference MoE FFN: 8 exact-GELU experts with biases
            # (half width: the dense GELU's active parameters), top-2 renormalised (softmax
            # over the two chosen), a router bias, no drops, the block's dropout in the
            # experts too.
            "original_moe": dict(
                ffn="gelu",
                max_seq_len=p["seq_len"],
                **base.PRESETS["original"],
                num_experts=4,
                granularity=2,
                top_k=1,
                router_bias=True,
                dispatch="dropless",
            ),
            **MOE_ARMS,
        }
    )
    if "train_tokens" in p:  # gpu, pod: the streamed corpus's training split, declared
        s.train_tokens_available = p["train_tokens"]  # (tokens) for the dry run's epochs
    return c
