"""Side-by-side benchmark: ffn-jax's training against a PyTorch reference LM of the same
architecture and parameter count, at the same shape, printed as one JSON line per
measurement plus a ``ratio`` line per shape, variant and architecture.

    python benchmarks/bench_torch.py                                  # every shape, gelu + swiglu
    python benchmarks/bench_torch.py --shapes=cpu --variants=gelu --rounds=1
    python benchmarks/bench_torch.py --shapes=cpu --variants=gelu --arch=nanogpt
    python benchmarks/bench_torch.py --frameworks=jax --smoke          # no PyTorch needed

The torch rows need PyTorch: ``pip install -e .[bench]``.

Shapes (float32, one device, byte vocabulary padded to 384 unless said):
  cpu    configs/compare.py's ``cpu`` preset: d_model 128, 4 layers, 4 heads, seq 128, batch 16
  quick  configs/compare.py's ``quick`` preset: d_model 64, 2 layers, 4 heads, seq 64, batch 16
  29m    benchmarks/bench_train.py's CPU shape: d_model 512, 8 layers, 8 heads, seq 256,
         BPE vocab 8192, batch 8 (29M parameters with SwiGLU)
The ffn-jax spec is built by the config system (``configs/compare.py`` or ``configs/base.py``
plus overrides, then ``ffn_jax.spec.from_config``). ``--arch=nanogpt`` switches both models to
LayerNorm and learned absolute positions (``model.norm=layer model.positions=learned``);
with ``--variants=gelu`` that is nanoGPT's block in its ``bias=False`` form (LayerNorm keeps
its bias, as in ffn-jax). The default arch is ffn-jax's: pre-norm RMSNorm and rotary.

The PyTorch reference (:func:`build_torch_model`) is the same network written as a PyTorch
user would: scaled embedding (x sqrt(d_model)), pre-norm blocks (``nn.RMSNorm`` /
``nn.LayerNorm``, eps 1e-6 as ffn-jax's), one fused q/k/v projection, rotary (half-split, in
float32) or learned positions, ``F.scaled_dot_product_attention(is_causal=True)``, no biases,
the FFN of the variant at ffn-jax's d_ff (gated: one fused w1|w3 projection), a final norm
and the output head tied to the embedding when ffn-jax ties it; the same initial
distributions; float32. Its parameter count must equal ffn-jax's ``count_params`` (checked when
it is built). Optimiser: ``torch.optim.AdamW(fused=True)`` with ffn-jax's hyperparameters and
decay mask (matrices and embeddings, not norms), ``clip_grad_norm_`` at ``train.grad_clip``,
and a ``LambdaLR`` warmup + cosine / linear / constant schedule as ``ffn_jax/optim.py``.

Two measurements per framework, shape, variant and arch:
  step  the pure training step: median, min and max of ``--steps`` steps timed one by one
        after 3 warm-up steps, on random token ids. ffn-jax: the jitted ``make_train_step``
        on one device, as benchmarks/bench_train.py times it; torch: forward, backward,
        clip, optimiser and schedule step, eager (``torch-eager``) and with the model under
        ``torch.compile`` (``torch-compile``; the optimiser step stays eager).
  loop  a real training loop from a fresh model, as a user sees it: tokens/s = the median
        over log windows, the first (compilation, warm-up) excluded. ffn-jax: ``train.py`` in
        a subprocess (``configs/base.py:<variant>,size=<size>`` plus a ``--config.*`` flag for
        every field the benchmark's config changes, so it trains the same spec, which is
        checked; ``train.eval_every=0``, ``train.final_eval=False``, a temporary workdir),
        ``tokens_per_s`` read from its ``metrics.jsonl``; torch: random windows of the same
        cached training-token shard (``ffn_jax.data.prepare``: Shakespeare under the shape's
        tokenizer, or random ids, said in ``data``, where it cannot be prepared), the mean loss
        fetched with ``.item()`` once per log interval. ``loss`` is the last window's mean in
        both (comparable: same steps, schedule and data). Torch's first step is timed alone
        (``compile_s`` under torch.compile, ``first_step_s`` eager); ffn-jax's compile is
        train.py's own ``compile_s``. The torch step is measured after its loop.

Each framework runs in its own subprocesses (no shared thread pools): per round, ffn-jax's
step (a worker that calls ``prepare_process()`` as train.py does: the XLA:CPU flags and
huge-page malloc) and ``train.py``, and one torch process (eager, then compiled) with
``torch.set_num_threads(os.cpu_count())`` and glibc's default malloc (the huge-page tunable is
ffn-jax's own setting, not inherited). The frameworks alternate for ``--rounds`` rounds (the
first one switching each round); after the rounds a ``summary`` line per framework and
measurement gives the median, min and max over rounds, and the ``ratio`` line gives ffn-jax's
tokens/s over the better torch mode's (``> 1``: ffn-jax is faster): ``step_ratio`` (medians),
``step_ratio_best`` (from the min step times: interference only adds time, so this is the
steadier one), ``loop_ratio`` (medians) and ``loop_ratio_best`` (the best rounds). On a
machine other work shares, torch's OpenMP threads (one per core) lose far more to it than
XLA's pool does (a step's max can be 10x its min): read the ``_best`` ratios there, or rerun.
A failed measurement prints an ``error`` line and the others still run; the exit status is then
1. ``--smoke`` shrinks the shape (d_model 64, 2 layers, seq 32, batch 4, byte vocab) and the
steps, and defaults to ``--shapes=cpu --variants=swiglu --rounds=1 --torch_modes=eager``, so it
runs in well under a minute (for tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if TYPE_CHECKING:
    import torch
    from ml_collections import ConfigDict

    from ffn_jax.spec import RunSpec

SHAPES: dict[str, dict[str, Any]] = {
    "cpu": dict(preset="cpu"),  # configs/compare.py presets, as they are
    "quick": dict(preset="quick"),
    # benchmarks/bench_train.py's CPU shape, over configs/base.py's tiny size (as there)
    "29m": dict(size="tiny", d_model=512, n_layers=8, n_heads=8, seq_len=256, vocab=8192, batch=8),
}
SMOKE = dict(d_model=64, n_layers=2, n_heads=4, seq_len=32, batch=4)  # byte vocabulary
# Timed steps (step), training steps of the loop, and its log interval (windows: loop / log).
TIMING: dict[str, dict[str, int]] = {
    "cpu": dict(steps=10, loop_steps=100, log_every=20),
    "quick": dict(steps=20, loop_steps=200, log_every=40),
    "29m": dict(steps=5, loop_steps=24, log_every=4),
    "smoke": dict(steps=3, loop_steps=8, log_every=2),
}
ARCHS: dict[str, dict[str, Any]] = {
    "default": {},  # ffn-jax's block: pre-norm RMSNorm, rotary
    "nanogpt": dict(norm="layer", positions="learned"),  # LayerNorm, learned positions
}
WARMUP = 3  # untimed steps before the timed ones
TORCH_MODES = ("eager", "compile")
NORM_EPS = 1e-6  # ffn_jax.model.Norm's default, which every block uses
TRUNCATED_NORMAL_STD = 0.87962566103423978  # as ffn_jax.ffn: std of N(0, 1) cut at +-2
TORCH_MISSING = (
    "error: the torch rows need PyTorch, which is not installed: pip install -e .[bench] "
    "(or measure ffn-jax alone with --frameworks=jax)"
)


# ---- the ffn-jax side: config, spec, parameter count ---------------------------------------


def make_config(shape: str, variant: str, arch: str = "default", smoke: bool = False) -> ConfigDict:
    """The ffn-jax config of ``shape`` (a :data:`SHAPES` key) with FFN ``variant`` and block
    ``arch`` (an :data:`ARCHS` key); ``smoke`` shrinks it to :data:`SMOKE` (byte vocabulary)."""
    from configs import base, compare

    s = SHAPES[shape]
    c: Any  # a ConfigDict (its fields are untyped)
    if "preset" in s:
        c = compare.get_config(s["preset"])
    else:
        c = base.get_config(f"swiglu,size={s['size']}")
        m = c.model
        m.d_model, m.n_layers, m.n_heads = s["d_model"], s["n_layers"], s["n_heads"]
        m.n_kv_heads = s["n_heads"]
        c.data.seq_len, c.data.batch_size = s["seq_len"], s["batch"]
        c.data.tokenizer, c.data.vocab_size = "bpe", s["vocab"]
    if smoke:
        m = c.model
        m.d_model, m.n_layers = SMOKE["d_model"], SMOKE["n_layers"]
        m.n_heads = m.n_kv_heads = SMOKE["n_heads"]
        c.data.seq_len, c.data.batch_size, c.data.tokenizer = (
            SMOKE["seq_len"],
            SMOKE["batch"],
            "byte",
        )
    c.model.ffn = variant
    c.model.dtype = "float32"
    c.model.update(ARCHS[arch])
    if c.model.positions == "learned":
        c.model.max_seq_len = c.data.seq_len
    c.mesh.shape.data = 1  # one device
    return c


def base_arg(shape: str, variant: str) -> str:
    """The ``configs/base.py`` argument that :func:`make_config`'s config starts from."""
    s = SHAPES[shape]
    size = s["size"] if "size" in s else _compare_size(s["preset"])
    return f"{variant},size={size}"


def _compare_size(preset: str) -> str:
    from configs import compare

    return compare.PRESETS[preset]["size"]


def loop_config(config: ConfigDict, steps: int, log_every: int) -> ConfigDict:
    """``config`` set up for the whole-loop measurement: ``steps`` steps logged every
    ``log_every``, no evaluation but the end's (one batch), one checkpoint (at the end)."""
    c: Any = config.copy_and_resolve_references()
    t = c.train
    t.steps, t.log_every = steps, log_every
    t.warmup_steps = min(t.warmup_steps, steps // 4)
    t.eval_every, t.final_eval, t.eval_batches = 0, False, 1
    t.checkpoint_every, t.keep_checkpoints = steps, 1
    return c


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_overrides(config: ConfigDict, base_config: ConfigDict) -> list[str]:
    """The ``--config.<field>=<value>`` flags that turn ``base_config`` into ``config`` (the
    run name and fields ``base_config`` lacks, such as a sweep block, left out)."""
    new, old = _flatten(config.to_dict()), _flatten(base_config.to_dict())
    flags = []
    for key, value in new.items():
        if key == "name" or key not in old or old[key] == value:
            continue
        if isinstance(value, list | tuple | dict) or value is None:
            raise ValueError(f"{key}={value!r} cannot be given as a --config flag")
        flags.append(f"--config.{key}={value}")
    return flags


def jax_param_count(spec: RunSpec) -> int:
    """ffn-jax's ``count_params`` of the model of ``spec`` (built abstractly: no memory)."""
    from flax import nnx

    from ffn_jax.model import LM, count_params

    return int(count_params(nnx.eval_shape(lambda: LM(spec.model, rngs=nnx.Rngs(0)))))


def reference_arch(spec: RunSpec) -> dict[str, Any]:
    """Everything the PyTorch reference needs from ``spec`` (plain JSON), with ffn-jax's
    parameter count as ``jax_params``; ValueError for what the reference does not build."""
    from ffn_jax.ffn import get_variant, hidden_gain

    m, t, d = spec.model, spec.train, spec.data
    unsupported = [
        f"{name}={value!r}"
        for name, value, ok in (
            ("model.norm_position", m.norm_position, m.norm_position == "pre"),
            ("model.dropout", m.dropout, m.dropout == 0),
            ("model.moe", m.moe, m.moe is None),
            ("train.grad_accum", t.grad_accum, t.grad_accum == 1),
            ("train.logits_z_loss", t.logits_z_loss, t.logits_z_loss == 0),
        )
        if not ok
    ]
    if unsupported:
        raise ValueError(f"the PyTorch reference does not build {', '.join(unsupported)}")
    return dict(
        d_model=m.d_model,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        ffn=m.ffn,
        gated=get_variant(m.ffn).gated,
        hidden_gain=hidden_gain(m.ffn, m.ffn_init),
        d_ff=m.d_ff,
        ffn_bias=m.ffn_bias,
        norm=m.norm,
        norm_eps=NORM_EPS,
        positions=m.positions,
        max_seq_len=m.max_seq_len,
        rope_theta=m.rope_theta,
        tie_embeddings=m.tie_embeddings,
        vocab_size=m.vocab_size,
        tokenizer_vocab=m.tokenizer_vocab,
        seq_len=d.seq_len,
        batch=d.batch_size,
        lr=t.lr,
        b1=t.b1,
        b2=t.b2,
        eps=t.eps,
        weight_decay=t.weight_decay,
        decay_norms=t.decay_norms,
        decay_biases=t.decay_biases,
        decay_embeddings=t.decay_embeddings,
        grad_clip=t.grad_clip,
        schedule=t.schedule,
        warmup_steps=t.warmup_steps,
        steps=t.steps,
        min_lr_ratio=t.min_lr_ratio,
        seed=spec.seed,
        jax_params=jax_param_count(spec),
    )


def train_tokens(spec: RunSpec) -> tuple[dict[str, Any] | None, str]:
    """The cached training-token shard of ``spec``'s data (prepared if need be: the train.py
    runs then find it cached), as ``({path, dtype, n_tokens}, its name)``; ``(None, why)`` if
    it cannot be prepared (the torch loop then trains on random ids)."""
    try:
        from ffn_jax import data as data_lib

        shard = data_lib.prepare(spec.data).splits["train"]
    except Exception as e:  # noqa: BLE001 - e.g. no corpus offline: said in the rows
        return None, f"random ids (the corpus could not be prepared: {type(e).__name__}: {e})"
    where = dict(path=str(shard.path), dtype=shard.dtype.name, n_tokens=shard.n_tokens)
    return where, f"{shard.path.name} ({shard.n_tokens:,} training tokens)"


# ---- the PyTorch reference -----------------------------------------------------------------


def build_torch_model(arch: dict[str, Any]) -> torch.nn.Module:
    """The PyTorch reference LM of ``arch`` (:func:`reference_arch`). ``model(tokens (b, t+1)
    int64)`` returns the mean next-token cross-entropy. Raises ValueError unless its
    parameter count equals ffn-jax's (``arch["jax_params"]``)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    d, n, kv, hd = arch["d_model"], arch["n_heads"], arch["n_kv_heads"], arch["head_dim"]
    n_layers, d_ff, vocab = arch["n_layers"], arch["d_ff"], arch["vocab_size"]
    gated, gain, bias = arch["gated"], arch["hidden_gain"], arch["ffn_bias"]
    act = {
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "swish": F.silu,
        "silu": F.silu,
        "squared_relu": lambda x: F.relu(x).square(),
        "glu": torch.sigmoid,
        "bilinear": lambda x: x,
        "reglu": F.relu,
        "geglu": F.gelu,
        "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "swiglu": F.silu,
    }[arch["ffn"]]
    out_scale = 1.0 / math.sqrt(2 * n_layers)  # residual-branch outputs, as ffn-jax

    def norm() -> nn.Module:
        kind = nn.RMSNorm if arch["norm"] == "rms" else nn.LayerNorm
        return kind(d, eps=arch["norm_eps"])

    def linear(fan_in: int, fan_out: int, scale: float = 1.0, with_bias: bool = False):
        lin = nn.Linear(fan_in, fan_out, bias=with_bias)  # ffn_jax.ffn.kernel_init:
        std = scale / math.sqrt(fan_in) / TRUNCATED_NORMAL_STD  # std scale/sqrt(fan_in)
        nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
        return lin

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)  # rotary, half-split (ffn_jax.model.rotary)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = norm(), norm()
            self.qkv = linear(d, (n + 2 * kv) * hd)
            self.wo = linear(n * hd, d, out_scale)
            self.w13 = linear(d, d_ff * (2 if gated else 1), with_bias=bias)
            self.w2 = linear(d_ff, d, out_scale, with_bias=bias)

        def forward(self, x, rope):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).split([n * hd, kv * hd, kv * hd], dim=-1)
            q, k, v = (z.view(b, t, -1, hd).transpose(1, 2) for z in (q, k, v))
            if rope is not None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            if kv < n:  # grouped-query heads: query head i reads kv head i // (n / kv)
                k, v = k.repeat_interleave(n // kv, dim=1), v.repeat_interleave(n // kv, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.wo(o.transpose(1, 2).reshape(b, t, n * hd))
            h = self.w13(self.norm2(x))
            if gated:
                h, g = h.chunk(2, dim=-1)
                h = act(h) * g
            else:
                h = act(h)
            return x + self.w2(h * gain if gain != 1.0 else h)

    class LM(nn.Module):
        cos: torch.Tensor  # rotary tables (t, head_dim / 2), buffers
        sin: torch.Tensor

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(d))
            self.pos = None
            if arch["positions"] == "learned":
                self.pos = nn.Embedding(arch["max_seq_len"], d)
                nn.init.normal_(self.pos.weight, std=1.0 / math.sqrt(2))
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.final_norm = norm()
            self.head = None if arch["tie_embeddings"] else linear(d, vocab)
            self.rope = arch["positions"] == "rope"
            if self.rope:
                i = torch.arange(0, hd // 2, dtype=torch.float32)
                inv_freq = arch["rope_theta"] ** (-i * 2.0 / hd)
                angle = torch.arange(arch["seq_len"], dtype=torch.float32)[:, None] * inv_freq
                self.register_buffer("cos", angle.cos(), persistent=False)
                self.register_buffer("sin", angle.sin(), persistent=False)

        def forward(self, tokens):
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            t = inputs.shape[1]
            x = self.embed(inputs) * math.sqrt(d)
            if self.pos is not None:
                x = x + self.pos.weight[:t]
            rope = (self.cos[:t], self.sin[:t]) if self.rope else None
            for block in self.blocks:
                x = block(x, rope)
            w = self.embed.weight if self.head is None else self.head.weight
            logits = F.linear(self.final_norm(x), w)
            return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    model = LM()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != arch["jax_params"]:
        raise ValueError(
            f"the PyTorch reference has {n_params:,} parameters, ffn-jax's model "
            f"{arch['jax_params']:,}: the architectures differ"
        )
    return model


def lr_factor(arch: dict[str, Any], step: int) -> float:
    """``ffn_jax.optim.relative_schedule`` at ``step``: linear warmup from 0, then the decay."""
    warmup = arch["warmup_steps"]
    if step < warmup:
        return step / max(1, warmup)
    decay = max(1, arch["steps"] - warmup)
    frac, floor = min(step - warmup, decay) / decay, arch["min_lr_ratio"]
    if arch["schedule"] == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    if arch["schedule"] == "linear":
        return 1 + (floor - 1) * frac
    return 1.0


def make_torch_optimizer(model: torch.nn.Module, arch: dict[str, Any]):
    """AdamW (fused) with ffn-jax's hyperparameters and decay mask, and its schedule."""
    import torch
    from torch import nn

    norms = {
        id(p)
        for mod in model.modules()
        if isinstance(mod, nn.RMSNorm | nn.LayerNorm)
        for p in mod.parameters()
    }
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) in norms:
            wd = arch["decay_norms"]
        elif name.endswith("bias"):
            wd = arch["decay_biases"]
        elif name.split(".")[0] in ("embed", "pos", "head"):
            wd = arch["decay_embeddings"]
        else:
            wd = True
        (decay if wd else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": arch["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups, lr=arch["lr"], betas=(arch["b1"], arch["b2"]), eps=arch["eps"], fused=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(arch, step))
    return opt, sched


# ---- the workers (one framework per process) ------------------------------------------------


def _emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def _step_stats(times: list[float], tokens_per_step: int) -> dict[str, Any]:
    step_s = statistics.median(times)
    return {
        "step_s": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "steps_timed": len(times),
        "tokens_per_s": tokens_per_step / step_s,
        "tokens_per_s_best": tokens_per_step / min(times),
    }


def jax_step_worker(shape: str, variant: str, arch: str, smoke: bool, steps: int) -> int:
    """Time ffn-jax's compiled train step (one device) and print its ``step`` line."""
    from ffn_jax.host import prepare_process

    prepare_process()  # XLA:CPU flags, then huge-page malloc (ffn_jax/host.py), as train.py

    import jax
    import jax.numpy as jnp

    from ffn_jax import sharding
    from ffn_jax.run import build_run_state
    from ffn_jax.spec import from_config
    from ffn_jax.trainer import make_train_step

    spec = from_config(make_config(shape, variant, arch, smoke), num_devices=1)
    mesh = sharding.single_device_mesh()
    rs = build_run_state(spec, mesh)
    b, t = spec.data.batch_size, spec.data.seq_len
    with jax.set_mesh(mesh), sharding.axis_rules(rs.rules):
        jitted = jax.jit(
            make_train_step(rs.graphdef, spec.train),
            in_shardings=(rs.state_shardings, rs.batch_sharding),
            out_shardings=(rs.state_shardings, None),
            donate_argnums=0,
        )
        batch = jax.device_put(
            jax.random.randint(jax.random.key(0), (b, t + 1), 0, spec.model.vocab_size, jnp.int32),
            rs.batch_sharding,
        )
        t0 = time.perf_counter()
        compiled = jitted.lower(rs.state, batch).compile()
        compile_s = time.perf_counter() - t0
        state = rs.state
        for _ in range(WARMUP):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):  # each step timed alone: the median resists a noisy neighbour
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
    _emit(
        {
            "measurement": "step",
            "framework": "ffn-jax",
            **_step_stats(times, b * t),
            "compile_s": compile_s,
            "params": rs.n_params,
            "loss": float(metrics["loss"]),
            "jax": jax.__version__,
            "devices": 1,
            "data": "random ids",
        }
    )
    return 0


def torch_worker(
    arch: dict[str, Any],
    modes: list[str],
    steps: int,
    loop_steps: int,
    log_every: int,
    data: dict[str, Any] | None,
) -> int:
    """Measure the PyTorch reference (step and loop, per mode); print one line each."""
    try:
        import torch
    except ImportError:
        print(TORCH_MISSING, file=sys.stderr)
        return 3
    import numpy as np

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    b, t = arch["batch"], arch["seq_len"]
    rng = np.random.default_rng(arch["seed"])
    tokens = None
    if data is not None:
        tokens = np.memmap(
            data["path"], np.dtype(data["dtype"]), mode="r", shape=(data["n_tokens"],)
        )

    def real_batch() -> torch.Tensor:
        if tokens is None:
            return torch.randint(0, arch["tokenizer_vocab"], (b, t + 1))
        starts = rng.integers(0, len(tokens) - t, size=b)  # windows of t + 1 tokens
        return torch.from_numpy(np.stack([tokens[s : s + t + 1] for s in starts]).astype(np.int64))

    about = {"torch": torch.__version__, "torch_threads": threads, "params": arch["jax_params"]}
    for mode in modes:
        torch.manual_seed(arch["seed"])
        model = build_torch_model(arch)
        opt, sched = make_torch_optimizer(model, arch)
        run = torch.compile(model) if mode == "compile" else model
        params = list(model.parameters())

        def step(batch: torch.Tensor, run=run, opt=opt, sched=sched, params=params):
            loss = run(batch)
            loss.backward()
            if arch["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(params, arch["grad_clip"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            return loss

        framework = f"torch-{mode}"
        # The loop first, from the fresh model (its losses compare with train.py's): the
        # first step (where torch.compile compiles) is timed alone and its window not counted.
        windows, window_loss, loss_value, first_s = [], torch.zeros(()), float("nan"), 0.0
        t_window = time.perf_counter()
        for i in range(1, loop_steps + 1):
            loss = step(real_batch())
            if i == 1:
                first_s = time.perf_counter() - t_window
            window_loss = window_loss + loss.detach()
            if i % log_every == 0:
                loss_value = window_loss.item() / log_every  # the host sync of a user's log
                window_loss = torch.zeros(())
                now = time.perf_counter()
                windows.append(b * t * log_every / (now - t_window))
                t_window = now
        _emit(
            {
                "measurement": "loop",
                "framework": framework,
                **_loop_stats(windows),
                "loop_steps": loop_steps,
                "log_every": log_every,
                "loss": loss_value,
                "compile_s" if mode == "compile" else "first_step_s": first_s,
                **about,
                "data": data["name"] if data is not None else "random ids",
            }
        )
        batch = torch.randint(0, arch["vocab_size"], (b, t + 1))
        for _ in range(WARMUP):
            step(batch)
        times = []
        for _ in range(steps):  # CPU ops run synchronously: the step is done when it returns
            t0 = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - t0)
        _emit(
            {
                "measurement": "step",
                "framework": framework,
                **_step_stats(times, b * t),
                **about,
                "data": "random ids",
            }
        )
    return 0


def _loop_stats(windows: list[float]) -> dict[str, Any]:
    """Tokens/s of a loop: the median of its log windows, the first (warm-up) excluded."""
    counted = windows[1:] if len(windows) > 1 else windows
    return {
        "tokens_per_s": statistics.median(counted),
        "windows": len(counted),
        "tokens_per_s_windows": windows,
    }


# ---- the orchestrator ----------------------------------------------------------------------


def _child_env(framework: str) -> dict[str, str]:
    """The environment of a worker: one XLA device (a simulated device count, as the tests
    set, removed); torch without ffn-jax's huge-page malloc tunable."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    if framework == "torch" and "GLIBC_TUNABLES" in env:
        kept = [x for x in env["GLIBC_TUNABLES"].split(":") if "hugetlb" not in x]
        env["GLIBC_TUNABLES"] = ":".join(kept)
    return env


def _run(cmd: list[str], framework: str, timeout: float) -> tuple[list[dict], str | None, float]:
    """Run a worker; its JSON lines, an error line (None if it succeeded) and its wall time."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=_child_env(framework),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0:
        return rows, None, wall
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    return rows, f"exit {proc.returncode}: {(lines or [''])[-1][:500]}", wall


def run_jax_loop(
    shape: str, variant: str, config: ConfigDict, spec: RunSpec, timeout: float
) -> tuple[list[dict], str | None]:
    """ffn-jax's whole loop: train.py on ``config`` in a temporary workdir; its ``loop`` line
    from ``metrics.jsonl``."""
    from configs import base
    from ffn_jax.spec import from_config

    arg = base_arg(shape, variant)
    flags = config_overrides(config, base.get_config(arg))
    with tempfile.TemporaryDirectory(prefix="bench_torch_") as tmp:
        workdir = os.path.join(tmp, "run")
        cmd = [
            sys.executable,
            "train.py",
            f"--config=configs/base.py:{arg}",
            f"--workdir={workdir}",
        ]
        rows, error, wall = _run(cmd + flags, "jax", timeout)
        if error:
            return [], f"train.py {error}"
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            logged = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(workdir, "config.json")) as f:
            ran = from_config(json.load(f), num_devices=1)
    if ran.model != spec.model or ran.data != spec.data:
        return [], "train.py resolved another model or data than the benchmark's spec"
    start = next(r for r in logged if r.get("event") == "start")
    logs = [r for r in logged if "tokens_per_s" in r]
    windows = [r["tokens_per_s"] for r in logs]
    counted = logs[1:] if len(logs) > 1 else logs
    row = {
        "measurement": "loop",
        "framework": "ffn-jax",
        **_loop_stats(windows),
        "loop_steps": spec.train.steps,
        "log_every": spec.train.log_every,
        "loss": logs[-1]["loss"],
        # train.py's own split of a step (medians over the counted windows): the whole step
        # and the host time spent getting its batch (grain, then onto the device).
        "step_time_s": statistics.median(r["step_time_s"] for r in counted),
        "data_time_s": statistics.median(r["data_time_s"] for r in counted),
        "compile_s": start["compile_s"],
        "params": start["n_params"],
        "wall_s": wall,
        "command": " ".join(["python", *cmd[1:3], *flags]),
    }
    return [row], None


def summarise(rows: list[dict], tokens_per_step: int) -> list[dict]:
    """``summary`` lines (per framework and measurement, over rounds) and the ``ratio`` line."""
    out, best = [], {}
    frameworks = list(dict.fromkeys(r["framework"] for r in rows))
    for measurement in ("step", "loop"):
        for fw in frameworks:
            mine = [r for r in rows if r["framework"] == fw and r["measurement"] == measurement]
            if not mine:
                continue
            s: dict[str, Any] = {"measurement": "summary", "of": measurement, "framework": fw}
            s["rounds"] = len(mine)
            if measurement == "step":
                med = statistics.median(r["step_s"] for r in mine)
                low = min(r["step_s_min"] for r in mine)
                s.update(step_s_median=med, step_s_min=low)
                s.update(
                    tokens_per_s=tokens_per_step / med, tokens_per_s_best=tokens_per_step / low
                )
            else:
                tps = [r["tokens_per_s"] for r in mine]
                s.update(tokens_per_s=statistics.median(tps), tokens_per_s_best=max(tps))
                s.update(tokens_per_s_min=min(tps))
            best[(measurement, fw)] = s
            out.append(s)
    ratio: dict[str, Any] = {"measurement": "ratio"}
    for measurement in ("step", "loop"):
        jax_row = best.get((measurement, "ffn-jax"))
        torch_rows = [s for (m, fw), s in best.items() if m == measurement and fw != "ffn-jax"]
        if jax_row is None or not torch_rows:
            continue
        top = max(torch_rows, key=lambda s: s["tokens_per_s"])
        top_best = max(torch_rows, key=lambda s: s["tokens_per_s_best"])
        ratio[f"{measurement}_ratio"] = jax_row["tokens_per_s"] / top["tokens_per_s"]
        ratio[f"{measurement}_ratio_best"] = (
            jax_row["tokens_per_s_best"] / top_best["tokens_per_s_best"]
        )
        ratio[f"{measurement}_torch"] = top["framework"]
        ratio[f"{measurement}_tokens_per_s"] = {
            "ffn-jax": jax_row["tokens_per_s"],
            top["framework"]: top["tokens_per_s"],
        }
    if len(ratio) > 1:
        out.append(ratio)
    return out


def _torch_available() -> bool:
    """Whether ``import torch`` works in a worker (checked in a subprocess: the orchestrator
    never imports torch)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import torch"], env=_child_env("torch"), capture_output=True
    )
    return proc.returncode == 0


def _jax_round(args: argparse.Namespace, case: dict[str, Any]) -> list[dict]:
    """One round of ffn-jax: the step worker, then train.py; error lines for what failed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker=jax", f"--shapes={case['shape']}"]
    cmd += [f"--variants={case['variant']}", f"--arch={case['arch']}"]
    cmd += [f"--steps={case['timing']['steps']}", *(["--smoke"] if args.smoke else [])]
    step_rows, error, _ = _run(cmd, "jax", args.timeout)
    if error:
        step_rows = [{"framework": "ffn-jax", "error": f"step: {error}"}]
    loop_rows, error = run_jax_loop(
        case["shape"], case["variant"], case["config"], case["spec"], args.timeout
    )
    if error:
        loop_rows = [{"framework": "ffn-jax", "error": f"loop: {error}"}]
    return step_rows + loop_rows


def _torch_round(args: argparse.Namespace, case: dict[str, Any]) -> list[dict]:
    """One round of the PyTorch reference: one worker, every mode in turn."""
    payload = dict(
        arch=case["reference"],
        modes=args.torch_modes.split(","),
        steps=case["timing"]["steps"],
        loop_steps=case["timing"]["loop_steps"],
        log_every=case["timing"]["log_every"],
        data=case["data"],
    )
    cmd = [sys.executable, os.path.abspath(__file__), "--worker=torch"]
    rows, error, _ = _run([*cmd, f"--payload={json.dumps(payload)}"], "torch", args.timeout)
    return rows + ([{"framework": "torch", "error": error}] if error else [])


def measure_case(args: argparse.Namespace, shape: str, variant: str, arch: str) -> int:
    """The rounds of one shape, variant and arch, their lines, the summaries and the ratio;
    returns the number of error lines."""
    from ffn_jax.spec import from_config

    timing = {**TIMING["smoke" if args.smoke else shape]}
    timing.update({k: v for k in timing if (v := getattr(args, k)) is not None})
    timing["loop_steps"] = -(-timing["loop_steps"] // timing["log_every"]) * timing["log_every"]
    config = make_config(shape, variant, arch, args.smoke)
    config = loop_config(config, timing["loop_steps"], timing["log_every"])
    spec = from_config(config, num_devices=1)
    m = spec.model
    about = {
        "shape": shape + ("-smoke" if args.smoke else ""),
        "variant": variant,
        "arch": arch,
        **{k: getattr(m, k) for k in ("d_model", "n_layers", "n_heads", "d_ff")},
        "seq_len": spec.data.seq_len,
        "batch": spec.data.batch_size,
        "vocab": m.vocab_size,
        **{k: getattr(m, k) for k in ("norm", "positions", "tie_embeddings", "dtype")},
    }
    data, data_name = train_tokens(spec)
    case: dict[str, Any] = dict(shape=shape, variant=variant, arch=arch, timing=timing)
    case.update(config=config, spec=spec)
    case["reference"] = reference_arch(spec)
    case["data"] = None if data is None else {**data, "name": data_name}
    frameworks = args.frameworks.split(",")
    rows: list[dict] = []
    for r in range(args.rounds):  # the first framework switches each round
        for fw in frameworks if r % 2 == 0 else frameworks[::-1]:
            for row in (_jax_round if fw == "jax" else _torch_round)(args, case):
                row = {"round": r, **about, **row}
                if row.get("measurement") == "loop":
                    row.setdefault("data", data_name)
                rows.append(row)
                _emit(row)
    good = [r for r in rows if "error" not in r]
    for row in summarise(good, spec.data.batch_size * spec.data.seq_len):
        _emit({**about, **row})
    return len(rows) - len(good)


def orchestrate(args: argparse.Namespace) -> int:
    """Every shape x arch x variant in turn (see the module docstring); exit status 1 if a
    measurement failed."""
    if "torch" in args.frameworks.split(",") and not _torch_available():
        print(TORCH_MISSING, file=sys.stderr)
        return 2
    failed = 0
    for shape in args.shapes.split(","):
        for arch in args.arch.split(","):
            for variant in args.variants.split(","):
                failed += measure_case(args, shape, variant, arch)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--shapes", default=None, help=f"comma-separated, of {list(SHAPES)}")
    ap.add_argument("--variants", default=None, help="comma-separated dense FFN variants")
    ap.add_argument("--arch", default="default", help=f"comma-separated, of {list(ARCHS)}")
    ap.add_argument("--frameworks", default="jax,torch", help="jax, torch or both (in order)")
    ap.add_argument("--torch_modes", default=None, help="eager, compile or both")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default per shape)")
    ap.add_argument("--loop_steps", type=int, default=None, help="training steps of a loop")
    ap.add_argument("--log_every", type=int, default=None, help="a loop's log interval")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    ap.add_argument("--smoke", action="store_true", help="tiny shape and steps (tests)")
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    args = ap.parse_args()
    smoke = args.smoke
    args.shapes = args.shapes or ("cpu" if smoke else ",".join(SHAPES))
    args.variants = args.variants or ("swiglu" if smoke else "gelu,swiglu")
    args.torch_modes = args.torch_modes or ("eager" if smoke else ",".join(TORCH_MODES))
    args.rounds = args.rounds or (1 if smoke else 3)
    if args.worker == "jax":
        return jax_step_worker(args.shapes, args.variants, args.arch, smoke, args.steps)
    if args.worker == "torch":
        p = json.loads(args.payload or "{}")
        return torch_worker(
            p["arch"], p["modes"], p["steps"], p["loop_steps"], p["log_every"], p["data"]
        )
    from ffn_jax.ffn import VARIANTS

    for flag, values, known in (
        ("shapes", args.shapes, list(SHAPES)),
        ("variants", args.variants, list(VARIANTS)),
        ("arch", args.arch, list(ARCHS)),
        ("frameworks", args.frameworks, ["jax", "torch"]),
        ("torch_modes", args.torch_modes, list(TORCH_MODES)),
    ):
        if unknown := [v for v in values.split(",") if v not in known]:
            ap.error(f"--{flag}: unknown {unknown}; use names from {known}")
    for flag in ("rounds", "steps", "loop_steps", "log_every"):
        if (value := getattr(args, flag)) is not None and value < 1:
            ap.error(f"--{flag}={value} must be >= 1")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
