"""Base config: one decoder-only LM with one FFN variant, trained on Shakespeare.

The argument picks the FFN variant, a size preset and optionally a block preset,
comma-separated, e.g.::

    python train.py --config=configs/base.py --workdir=runs/base
    python train.py --config=configs/base.py:swiglu,size=small --workdir=runs/swiglu
    python train.py --config=configs/base.py:gelu,size=tiny --workdir=/tmp/tiny
    python train.py --config=configs/base.py:original,size=tiny --workdir=/tmp/original
    python train.py --config=configs/base.py:gelu,preset=original --workdir=runs/bert

Sizes: ``tiny`` (tests, seconds), ``small`` (default; minutes on a 2-core CPU),
``medium`` (~20M parameters), ``gpu`` (~125M, GPT-2 small shape, bf16).

Block presets: ``original`` is the 2017 Transformer / BERT block: post-norm LayerNorm,
FFN biases, dropout 0.1, learned absolute positions (no rotary), ReLU unless a variant is
given (``gelu,preset=original``); a bare ``original`` means ``relu,preset=original``.
Without a preset the block is the modern one (pre-norm RMSNorm, rotary, no biases).
"""

from __future__ import annotations

from ml_collections import config_dict

SIZES = {
    # d_model, n_layers, n_heads, n_kv_heads, seq_len, batch_size, steps, tokenizer, vocab
    "tiny": dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        seq_len=64,
        batch_size=16,
        steps=150,
        warmup=10,
        lr=3e-3,
        tokenizer="byte",
        vocab_size=256,
    ),
    "small": dict(
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        seq_len=128,
        batch_size=32,
        steps=1000,
        warmup=50,
        lr=2e-3,
        tokenizer="bpe",
        vocab_size=2048,
    ),
    "medium": dict(
        d_model=384,
        n_layers=6,
        n_heads=6,
        n_kv_heads=6,
        seq_len=256,
        batch_size=32,
        steps=3000,
        warmup=200,
        lr=1e-3,
        tokenizer="bpe",
        vocab_size=8192,
    ),
    "gpu": dict(
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        seq_len=1024,
        batch_size=64,
        steps=10000,
        warmup=500,
        lr=6e-4,
        tokenizer="bpe",
        vocab_size=32768,
    ),
}


# Block presets: ``config.model`` fields they set (see the module docstring).
PRESETS = {
    "original": dict(
        norm_position="post", norm="layer", positions="learned", ffn_bias=True, dropout=0.1
    ),
}
PRESET_DEFAULT_VARIANT = {"original": "relu"}


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"swiglu,size=small"`` -> ``{"variant": "swiglu", "size": "small"}``; a bare preset
    name (``"original"``) -> ``{"preset": "original"}``."""
    out: dict[str, str] = {}
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
        elif key.strip() in PRESETS:
            out["preset"] = key.strip()
        else:
            out["variant"] = key.strip()
    return out


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    """The full config for ``arg`` (see the module docstring)."""
    args = parse_arg(arg)
    size = args.pop("size", "small")
    preset = args.pop("preset", None)
    variant = args.pop("variant", PRESET_DEFAULT_VARIANT.get(preset, "swiglu"))
    if size not in SIZES:
        raise ValueError(f"config arg size={size!r} is not a size preset; use one of {list(SIZES)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(
            f"config arg preset={preset!r} is not a block preset; use one of {list(PRESETS)}"
        )
    if args:
        raise ValueError(f"config arg: unknown keys {sorted(args)}; known: variant, size, preset")
    s = SIZES[size]

    c = config_dict.ConfigDict()
    c.name = f"{preset}-{variant}-{size}" if preset else f"{variant}-{size}"  # run name
    c.seed = 0  # seeds parameter init, dropout and the data order

    # ---- model ------------------------------------------------------------------------
    m = c.model = config_dict.ConfigDict()
    m.vocab_size = config_dict.placeholder(int)  # set from the tokenizer at train time
    m.vocab_multiple_of = 128  # vocab padded up to a multiple (unused ids; shardable, faster)
    m.d_model = s["d_model"]  # residual stream width
    m.n_layers = s["n_layers"]  # transformer blocks
    m.n_heads = s["n_heads"]  # query heads; d_model must be divisible by it
    m.n_kv_heads = s["n_kv_heads"]  # key/value heads (< n_heads = grouped-query attention)
    m.ffn = variant  # FFN variant from ffn_jax.ffn.VARIANTS
    m.d_ff = config_dict.placeholder(int)  # hidden width; None = parameter-matched rule
    m.ffn_multiplier = 4.0  # ungated d_ff = multiplier * d_model; gated gets 2/3 of it
    m.ffn_multiple_of = 8  # d_ff is rounded to the nearest multiple of this
    m.ffn_bias = False  # biases b1/b3/b2 in the FFN
    m.ffn_init = "default"  # "unit_variance": hidden activations x 1/std at init, every variant
    m.dropout = 0.0  # dropout on FFN hidden, attention output and residual branches
    m.norm = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm)
    m.norm_position = "pre"  # "pre": x + f(norm(x)), final norm; "post": norm(x + f(x)), none
    m.positions = "rope"  # "rope" (rotary in attention) or "learned" (absolute, added to input)
    m.max_seq_len = s["seq_len"]  # rows of the learned position table; >= data.seq_len
    m.tie_embeddings = True  # output projection = input embedding transposed
    m.rope_theta = 10000.0  # rotary embedding base
    m.dtype = "float32" if size != "gpu" else "bfloat16"  # compute dtype; params stay float32
    m.scan_layers = True  # apply the stacked layers with nnx.scan (False: a python loop)
    m.remat = "none"  # "none", "full", "dots" (save matmul outputs) or "dots_no_batch"
    m.attention = "auto"  # "auto" (model.attention_impl), "xla", "einsum", "cudnn" or "splash"
    moe = m.moe = config_dict.ConfigDict()
    moe.num_experts = 0  # 0 = dense FFN in every layer
    moe.every = 1  # MoE in every N-th layer (the last of each group of N), dense elsewhere
    # "topk" (token choice, softmax; top_k=1 is Switch), "sigmoid_topk" (token choice,
    # sigmoid scores normalised over the chosen, DeepSeek-V3) or "expert_choice"
    moe.router = "topk"
    moe.top_k = 2  # experts per token (token choice)
    moe.renormalize = True  # top_k >= 2: renormalise the selected weights to sum to 1
    moe.dispatch = "capacity"  # "capacity" (drop over capacity) or "dropless"
    moe.dropless_impl = "ragged"  # dropless grouped matmul: "ragged" (ragged_dot) or "loop"
    # Dropless token exchange over the expert axis: "ragged" (ragged_all_to_all: exact bytes;
    # GPU/TPU, emulated elsewhere), "padded" (worst-case buffers), "auto" (ragged on GPU/TPU)
    moe.exchange = "auto"
    moe.capacity_factor = 1.25  # training capacity = factor * k * tokens / experts
    # Evaluation: 0 = dropless (no token's score depends on other sequences; expert choice,
    # which has no dropless path, then uses capacity_factor), > 0 = that capacity factor.
    moe.eval_capacity_factor = 0.0
    moe.granularity = 1  # fine-grained experts: width / g, experts * g, top_k * g
    moe.num_shared = 0  # always-on shared experts (DeepSeekMoE)
    moe.jitter = 0.0  # multiplicative router input noise in training, e.g. 0.01
    moe.router_bias = False  # a learned per-expert bias on the router logits
    # Load balancing: "aux" (the Switch loss below), "loss_free" (DeepSeek-V3: a per-expert
    # bias on the scores for the top-k choice only, moved by balance_rate * sign(mean load -
    # load) after every training forward pass (each micro-batch), outside the optimiser;
    # token-choice routers) or "none" (no balancing: lb_loss_coef is unused)
    moe.balance = "aux"
    moe.balance_rate = 1e-3  # loss_free: bias step per update (scores are in [0, 1])
    # Switch load-balancing loss coefficient, used only when balance="aux". The loss is
    # averaged over MoE layers, so this is Switch's per-layer alpha (0.01 in the paper).
    moe.lb_loss_coef = 0.01
    moe.aux_scope = "batch"  # lb loss f_i, P_i over the "batch" or per "sequence" (averaged)
    moe.z_loss_coef = 1e-3  # ST-MoE router z-loss coefficient (every balance mode)
    # Which experts a token takes: "learned" (the router's scores) or, for benchmarking the
    # dispatch, "balanced" (token i -> experts i*k .. i*k+k-1 mod E: perfectly even loads)
    # or "random" (k distinct experts uniformly at random per token and step); the forced
    # choices are still weighted by the router's scores. Token-choice routers only.
    moe.routing = "learned"

    # ---- data -------------------------------------------------------------------------
    d = c.data = config_dict.ConfigDict()
    d.corpus = "shakespeare"  # "shakespeare" (built in), "text" (local files) or "hf"
    d.paths = ""  # text corpus: comma-separated files, directories or globs
    d.hf_name = ""  # hf corpus: dataset name or a load_from_disk directory
    d.hf_config = ""  # hf corpus: dataset config name
    d.hf_split = "train"  # hf corpus: split to read documents from
    d.hf_text_field = "text"  # hf corpus: field holding the text
    d.hf_streaming = False  # hf corpus: stream instead of downloading everything
    d.hf_max_docs = 0  # hf corpus: read at most this many documents (0 = all)
    d.heldout_fraction = 0.05  # text/hf: fraction of documents each for validation and test
    d.tokenizer = s["tokenizer"]  # "byte", "bpe" (trained on the train split) or a .json path
    d.vocab_size = s["vocab_size"]  # BPE vocabulary size (ignored for byte)
    d.seq_len = s["seq_len"]  # tokens per training window
    d.batch_size = s["batch_size"]  # global batch (sequences per step, all processes)
    d.cache_dir = ""  # token cache; "" = $FFN_JAX_CACHE or ~/.cache/ffn_jax
    d.num_workers = 0  # grain worker processes for the training loader

    # ---- training ---------------------------------------------------------------------
    t = c.train = config_dict.ConfigDict()
    t.steps = s["steps"]  # optimiser steps
    t.lr = s["lr"]  # peak learning rate
    t.schedule = "cosine"  # "cosine", "linear" (decay to min) or "constant" (after warmup)
    t.warmup_steps = s["warmup"]  # linear warmup from 0
    t.min_lr_ratio = 0.1  # final lr = ratio * peak (cosine / linear)
    t.b1 = 0.9  # AdamW beta1
    t.b2 = 0.95  # AdamW beta2
    t.eps = 1e-8  # AdamW epsilon
    t.weight_decay = 0.1  # decoupled weight decay
    t.decay_norms = False  # apply weight decay to norm scales
    t.decay_biases = False  # apply weight decay to biases
    t.decay_embeddings = True  # apply weight decay to the embedding
    t.grad_clip = 1.0  # global-norm clipping (0 = off)
    t.grad_accum = 1  # micro-batches per optimiser step
    t.logits_z_loss = 0.0  # coefficient of mean(logsumexp(logits)^2), e.g. 1e-4
    t.log_every = 25  # steps between metric logs (the only host syncs)
    t.eval_every = 250  # steps between validation evaluations (0 = only at the end)
    t.eval_batches = 16  # validation batches during training (0 = the whole split)
    t.final_eval = True  # at the end, score every token of eval_splits and write eval.json
    t.eval_splits = "validation,test"  # splits the final evaluation scores
    # Validation batches the final evaluation scores, evenly spaced over the split (0 = every
    # token; the test split is always scored in full): a sweep's selection needs fewer.
    t.final_val_batches = 0
    t.checkpoint_every = 250  # steps between checkpoints
    t.keep_checkpoints = 2  # checkpoints kept
    t.resume = True  # resume from the workdir's checkpoint; False refuses an existing run
    t.profile_steps = ""  # "start:stop" writes a jax.profiler trace of those steps
    # MoE: warn (and log moe/collapse = 1) when a layer's most loaded expert takes over half
    # of its tokens for this many log windows in a row (0 = no alarm; ffn_jax/moe/health.py)
    t.collapse_windows = 3

    # ---- mesh -------------------------------------------------------------------------
    mesh = c.mesh = config_dict.ConfigDict()
    # total axis sizes (one may be -1 = the rest); in a multi-slice job each slice holds a
    # shape / dcn_shape block
    mesh.shape = config_dict.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
    # TPU slices along each axis (multi-slice over DCN; product = slice count; all 1 = one slice)
    mesh.dcn_shape = config_dict.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))
    # let a mesh axis take part of a physical TPU torus axis (e.g. 8 of a 4x4x4 torus)
    mesh.allow_split_physical_axes = False
    mesh.rules = [list(r) if isinstance(r, tuple) else r for r in _default_rules()]

    # ---- multi-host (docs/scaling.md) -------------------------------------------------
    dist = c.distributed = config_dict.ConfigDict()
    dist.initialize = "auto"  # jax.distributed.initialize: "auto" (on a cluster), "always", "never"
    dist.coordinator_address = ""  # host:port of process 0, the same on every process; "" = detect
    dist.num_processes = 0  # processes in the job; 0 = detect
    dist.process_id = -1  # this process's index in [0, num_processes); -1 = detect
    dist.timeout_s = 300  # seconds to wait for the coordinator and every process, then exit

    if size == "tiny":
        t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every = 10, 50, 4, 50
    for field, value in PRESETS.get(preset, {}).items():
        m[field] = value
    return c


def _default_rules():
    from ffn_jax.sharding import DEFAULT_RULES

    return [(name, list(t) if isinstance(t, tuple) else t) for name, t in DEFAULT_RULES]
