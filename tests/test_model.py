"""The decoder LM: causality, scan vs loop, remat, bf16, sharded == single device."""

import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from configs.base import get_config
from ffn_jax import data, sharding
from ffn_jax.einsum_attention import einsum_attention
from ffn_jax.model import LM, Block, attention_impl, count_params
from ffn_jax.optim import decay_mask, make_optimizer
from ffn_jax.spec import ConfigError, model_spec
from ffn_jax.splash import splash_attention
from tests.helpers import run_spec, tiny_model, tiny_model_cfg


def tokens(b=2, t=16, vocab=97, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def loss_and_grads(model, toks):
    def loss(m):
        logits, _ = m(toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    return nnx.value_and_grad(loss)(model)


def test_output_shape_dtype_and_param_count():
    cfg = tiny_model()
    m = LM(cfg, rngs=nnx.Rngs(0))
    logits, aux = m(tokens())
    assert logits.shape == (2, 16, 97) and logits.dtype == jnp.float32 and aux == {}
    d, f, L, v = cfg.d_model, 168, cfg.n_layers, 97
    h = d // cfg.n_heads
    attn = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    assert count_params(m) == v * d + L * (attn + 3 * d * f + 2 * d) + d


@pytest.mark.parametrize("variant", ["relu", "swiglu"])
def test_causal(variant):
    m = LM(tiny_model(ffn=variant, n_kv_heads=1), rngs=nnx.Rngs(0))
    a = tokens(1, 16)
    b = a.at[0, 9:].set((a[0, 9:] + 5) % 97)
    la, _ = m(a)
    lb, _ = m(b)
    np.testing.assert_allclose(la[0, :9], lb[0, :9], atol=1e-6)
    assert not np.allclose(la[0, 9:], lb[0, 9:])


def test_scan_equals_loop():
    scanned = LM(tiny_model(n_layers=3), rngs=nnx.Rngs(0))
    looped = LM(tiny_model(n_layers=3, scan_layers=False), rngs=nnx.Rngs(0))
    toks = tokens()
    (l1, g1), (l2, g2) = loss_and_grads(scanned, toks), loss_and_grads(looped, toks)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_equals_no_remat(policy):
    base = LM(tiny_model(), rngs=nnx.Rngs(0))
    remat = LM(tiny_model(remat=policy), rngs=nnx.Rngs(0))
    toks = tokens()
    (l1, g1), (l2, g2) = loss_and_grads(base, toks), loss_and_grads(remat, toks)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_close_to_float32():
    f32 = LM(tiny_model(), rngs=nnx.Rngs(0))
    bf16 = LM(tiny_model(dtype="bfloat16"), rngs=nnx.Rngs(0))
    toks = tokens()
    l32, _ = f32(toks)
    l16, _ = bf16(toks)
    assert l16.dtype == jnp.float32  # logits stay float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    p32, p16 = jax.nn.softmax(l32), jax.nn.softmax(l16)
    assert float(jnp.abs(p32 - p16).max()) < 0.02
    assert float(jnp.abs(l32 - l16).mean()) < 0.05


def test_layernorm_and_untied_options():
    m = LM(tiny_model(norm="layer", tie_embeddings=False), rngs=nnx.Rngs(0))
    params = nnx.state(m, nnx.Param).to_pure_dict()
    assert params["unembed"].shape == (64, 97)
    assert "bias" in params["final_norm"]
    assert m(tokens())[0].shape == (2, 16, 97)


@pytest.mark.parametrize("shape", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_equals_single_device(shape):
    cfg = tiny_model(n_heads=4, n_kv_heads=2, vocab_size=96)
    rules = sharding.DEFAULT_RULES
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **shape})
    toks = tokens(8, 16, vocab=96)

    ref = LM(cfg, rngs=nnx.Rngs(0))
    l_ref, g_ref = loss_and_grads(ref, toks)

    with sharding.axis_rules(rules):
        model = sharding.create_sharded(lambda: LM(cfg, rngs=nnx.Rngs(0)), mesh, rules)
        graphdef, state = nnx.split(model)
        wq = state["layers"]["blocks"][0]["attn"]["wq"].get_value()
        assert wq.sharding.spec == sharding.logical_to_spec(("layers", "embed", "heads", "kv"))
        assert len(wq.sharding.device_set) == 8

        @jax.jit
        def f(state, toks):
            return loss_and_grads(nnx.merge(graphdef, state), toks)

        with jax.set_mesh(mesh):
            batch = jax.device_put(
                toks, jax.NamedSharding(mesh, sharding.logical_to_spec(("batch", None)))
            )
            loss, grads = f(state, batch)
    np.testing.assert_allclose(loss, l_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ffn="swishglu"), r"model.ffn='swishglu' is unknown; valid variants: relu"),
        (dict(d_model=65), r"model.d_model=65 is not divisible by model.n_heads=4"),
        (dict(dtype="float16"), r"model.dtype='float16' is not supported"),
        (dict(n_kv_heads=3), r"model.n_heads=4 is not divisible by model.n_kv_heads=3"),
        (dict(remat="some"), r"model.remat='some' is not supported"),
        (dict(norm_position="middle"), r"model.norm_position='middle' is not supported"),
        (dict(positions="alibi"), r"model.positions='alibi' is not supported"),
        (dict(positions="learned", max_seq_len=0), r"model.max_seq_len=0 must be positive"),
        (dict(attention="cudnn"), r"model.attention='cudnn' needs an NVIDIA GPU"),  # on CPU
    ],
)
def test_bad_model_config(overrides, message):
    with pytest.raises(ConfigError) as e:
        model_spec(tiny_model_cfg(**overrides))
    problems = e.value.problems
    assert len(problems) == 1 and re.search(message, problems[0]), problems


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_post_norm_block_ends_in_its_norm(norm):
    """Post-norm: every output row of a block is normalised (LayerNorm at init: mean 0,
    variance 1; RMSNorm: mean square 1). Pre-norm passes the residual stream through."""
    x = 3.0 * jax.random.normal(jax.random.key(1), (2, 16, 64)) + 1.0
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    post = Block(tiny_model(norm=norm, norm_position="post"), moe=False, rngs=nnx.Rngs(0))
    pre = Block(tiny_model(norm=norm), moe=False, rngs=nnx.Rngs(0))
    y_post, _ = post(x, positions)
    y_pre, _ = pre(x, positions)
    ms_post = jnp.mean(
        jnp.square(y_post - (y_post.mean(-1, keepdims=True) if norm == "layer" else 0)), -1
    )
    np.testing.assert_allclose(ms_post, 1.0, rtol=1e-4)
    if norm == "layer":
        np.testing.assert_allclose(y_post.mean(-1), 0.0, atol=1e-5)
    assert float(jnp.abs(y_pre.var(-1) - 1.0).min()) > 1.0  # ~ the input's variance, 9


def test_original_preset_model():
    cfg = get_config("original,size=tiny").model
    cfg.vocab_size, cfg.vocab_multiple_of = 97, 1
    m = LM(model_spec(cfg), rngs=nnx.Rngs(0))
    params = nnx.state(m, nnx.Param).to_pure_dict()
    assert "final_norm" not in params and params["pos_embed"].shape == (64, 64)
    assert m.pos_embed.get_metadata()["out_sharding"] == (None, "embed")
    ffn = params["layers"]["blocks"][0]["ffn"]
    assert set(ffn) == {"w1", "b1", "w2", "b2"} and "bias" in params["layers"]["blocks"][0]["norm1"]
    with pytest.raises(ValueError, match=r"longer than model.max_seq_len=64"):
        m(tokens(1, 65))


def test_init_std_is_one_over_sqrt_fan_in():
    """Every projection's std is 1/sqrt(fan_in), whatever the kernel's rank (wq is
    (d, n, h): its fan-in is d, not n * d); output projections are scaled for depth."""
    cfg = tiny_model(d_model=256, n_heads=4, n_kv_heads=4, n_layers=2)
    attn = LM(cfg, rngs=nnx.Rngs(0)).layers.blocks[0].attn
    for name in ("wq", "wk", "wv"):
        assert float(jnp.std(getattr(attn, name)[...])) == pytest.approx(256**-0.5, rel=0.05)
    assert float(jnp.std(attn.wo[...])) == pytest.approx(256**-0.5 / 2, rel=0.05)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask_follows_the_config(decay_embeddings):
    """Matrices decay; norms and biases do not (by default); every embedding table, the
    learned positions included, follows ``train.decay_embeddings``."""
    c = get_config("original,size=tiny")
    c.train.decay_embeddings = decay_embeddings
    spec = run_spec(c)
    params = nnx.state(LM(spec.model, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    mask = decay_mask(spec.train, params)
    block = mask["layers"]["blocks"][0]
    assert mask["embed"] is mask["pos_embed"] is decay_embeddings
    assert block["attn"]["wq"] and block["ffn"]["w1"] and block["ffn"]["w2"]
    assert not block["ffn"]["b1"] and not block["norm1"]["scale"] and not block["norm1"]["bias"]


def test_legacy_config_without_new_fields_is_pre_norm_rope():
    """A config.json written before norm_position/positions/max_seq_len existed."""
    old = tiny_model_cfg().to_dict()
    for field in ("norm_position", "positions", "max_seq_len"):
        del old[field]
    legacy = LM(model_spec(ConfigDict(old)), rngs=nnx.Rngs(0))
    current = LM(tiny_model(), rngs=nnx.Rngs(0))
    toks = tokens()
    np.testing.assert_array_equal(legacy(toks)[0], current(toks)[0])


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("original", dict(name="original-relu-small", ffn="relu")),
        ("gelu,preset=original,size=tiny", dict(name="original-gelu-tiny", ffn="gelu")),
    ],
)
def test_original_preset_config(arg, expected):
    c = get_config(arg)
    m = c.model
    assert (c.name, m.ffn) == (expected["name"], expected["ffn"])
    assert (m.norm_position, m.norm, m.positions, m.ffn_bias, m.dropout) == (
        "post",
        "layer",
        "learned",
        True,
        0.1,
    )
    assert m.max_seq_len == c.data.seq_len and m.tie_embeddings
    default = get_config("swiglu,size=tiny").model
    assert (default.norm_position, default.positions) == ("pre", "rope")
    with pytest.raises(ValueError, match=r"preset='modern' is not a block preset"):
        get_config("preset=modern")


def test_original_preset_trains_with_dropout():
    """The 2017 block, dropout 0.1 on, learns Shakespeare bytes: the loss falls."""
    c = get_config("original,size=tiny")
    c.train.warmup_steps = 5
    spec = run_spec(c)
    train = np.asarray(data.prepare(spec.data).splits["train"].tokens[: 64 * 65 * 8], np.int32)
    batches = train.reshape(8, 64, 65)
    model = LM(spec.model, rngs=nnx.Rngs(params=0, dropout=1))
    opt = nnx.Optimizer(model, make_optimizer(spec.train), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, toks):
        def loss_fn(m):
            logits, _ = m(toks[:, :-1])
            nll = (
                jax.nn.logsumexp(logits, -1)
                - jnp.take_along_axis(logits, toks[:, 1:, None], -1)[..., 0]
            )
            return nll.mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    model.train()
    losses = [float(step(model, opt, jnp.asarray(batches[i % 8]))) for i in range(40)]
    assert np.mean(losses[-5:]) < losses[0] - 2.0, losses
    model.eval()
    a = jnp.asarray(batches[0, :2, :-1])
    b = a.at[:, 40:].set(0)
    np.testing.assert_allclose(model(a)[0][:, :40], model(b)[0][:, :40], atol=1e-5)  # causal


GPUS = {
    "h100": SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3"),
    "amd": SimpleNamespace(platform="gpu", device_kind="AMD Instinct MI300X"),
    "tpu": SimpleNamespace(platform="tpu", device_kind="TPU v5 lite"),
    "cpu": SimpleNamespace(platform="cpu", device_kind="cpu"),
}


@pytest.mark.parametrize(
    "gpu, dtype, head_dim, expected",
    [
        ("h100", jnp.bfloat16, 64, "cudnn"),
        ("h100", jnp.float16, 128, "cudnn"),
        ("h100", jnp.float32, 64, "einsum"),  # cuDNN's fused attention is bf16/fp16 only
        ("h100", jnp.bfloat16, 12, "einsum"),  # head dim not a multiple of 8
        ("h100", jnp.bfloat16, 192, "einsum"),  # above 128
        ("amd", jnp.bfloat16, 64, "einsum"),  # no cuDNN
        ("tpu", jnp.bfloat16, 64, "splash"),  # Pallas splash attention on TPU
        ("tpu", jnp.float32, 12, "splash"),
        ("cpu", jnp.float32, 32, "einsum"),  # scores materialised, backward by hand
        ("cpu", jnp.bfloat16, 64, "einsum"),
    ],
)
def test_auto_attention_is_fused_only_where_cudnn_applies(
    monkeypatch, gpu, dtype, head_dim, expected
):
    monkeypatch.setattr(jax, "devices", lambda *a: [GPUS[gpu]])
    assert attention_impl("auto", dtype, head_dim) == expected
    assert attention_impl("xla", dtype, head_dim) == "xla"  # a named one is kept as asked
    assert attention_impl("cudnn", jnp.float32, head_dim) == "cudnn"


def test_splash_attention_needs_blocks_of_128():
    q = jnp.zeros((1, 96, 2, 8))
    with pytest.raises(ValueError, match="needs data.seq_len a multiple of 128, got .* 96"):
        splash_attention(q, q, q)


def assert_attention_equals_xla(impl: str, seq_len: int, mesh_shape: dict | None) -> None:
    """An LM with attention ``impl`` has the XLA-attention LM's loss and gradients, on one
    device (``mesh_shape=None``) or sharded on a mesh of ``mesh_shape``."""
    cfg = dict(n_heads=4, n_kv_heads=2, vocab_size=96)
    toks = tokens(4, seq_len, vocab=96)
    l_ref, g_ref = loss_and_grads(LM(tiny_model(**cfg, attention="xla"), rngs=nnx.Rngs(0)), toks)
    spec = tiny_model(**cfg, attention=impl)
    assert spec.attention_impl == impl
    if mesh_shape is None:
        loss, grads = loss_and_grads(LM(spec, rngs=nnx.Rngs(0)), toks)
    else:
        rules = sharding.DEFAULT_RULES
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh_shape})
        with sharding.axis_rules(rules):
            model = sharding.create_sharded(lambda: LM(spec, rngs=nnx.Rngs(0)), mesh, rules)
            graphdef, state = nnx.split(model)
            f = jax.jit(lambda state, toks: loss_and_grads(nnx.merge(graphdef, state), toks))
            with jax.set_mesh(mesh):
                batch = jax.NamedSharding(mesh, sharding.logical_to_spec(("batch", None)))
                loss, grads = f(state, jax.device_put(toks, batch))
    np.testing.assert_allclose(loss, l_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [None, dict(data=2, fsdp=2, tensor=2)])
def test_splash_attention_equals_xla(shape):
    """The splash kernel (interpreted on CPU) gives XLA's loss and gradients, on one device
    and in its shard_map over batch and head shards."""
    assert_attention_equals_xla("splash", 128, shape)  # the kernel's blocks: multiples of 128


def test_default_attention_is_auto_and_einsum_on_cpu():
    cfg = get_config("swiglu,size=gpu").model  # bf16: would be cuDNN on an NVIDIA GPU
    assert cfg.attention == "auto"
    assert attention_impl(cfg.attention, jnp.bfloat16, cfg.d_model // cfg.n_heads) == "einsum"


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_attention_equals_xla(kv_heads, dtype):
    """The einsum attention and its hand-written backward give XLA's outputs and input
    gradients (the backward against autodiff of jax.nn.dot_product_attention)."""
    b, t, n, h = 2, 12, 4, 8
    key_q, key_k, key_v, key_w = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(key_q, (b, t, n, h)).astype(dtype)
    k = jax.random.normal(key_k, (b, t, kv_heads, h)).astype(dtype)
    v = jax.random.normal(key_v, (b, t, kv_heads, h)).astype(dtype)
    w = jax.random.normal(key_w, (b, t, n, h))  # a cotangent that is not all ones

    def xla(q, k, v):
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        return jnp.sum(o.astype(jnp.float32) * w)

    def einsum(q, k, v):
        return jnp.sum(einsum_attention(q, k, v).astype(jnp.float32) * w)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=5e-2)
    out, ref = einsum_attention(q, k, v), jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == dtype and out.shape == (b, t, n, h)
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), **tol)
    grads = jax.grad(einsum, (0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, jax.grad(xla, (0, 1, 2))(q, k, v), strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g.astype(jnp.float32), g_ref.astype(jnp.float32), **tol)


@pytest.mark.parametrize("shape", [None, dict(data=2, fsdp=2, tensor=2)])
def test_einsum_attention_lm_equals_xla(shape):
    """An LM with the einsum attention has the XLA-attention LM's loss and gradients, on one
    device and sharded over batch and heads."""
    assert_attention_equals_xla("einsum", 16, shape)
