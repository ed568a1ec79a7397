"""MoE balancing (issue 18, second part): loss-free balancing, the sigmoid router, the
sequence-level aux loss and the router health metrics, against written-out references."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ffn_jax import sharding
from ffn_jax import spec as spec_lib
from ffn_jax.checkpoint import Checkpointer
from ffn_jax.ffn import get_variant
from ffn_jax.model import LM, count_params, lm_loss
from ffn_jax.moe import BalanceBias, MoEFFN, moe_aux_loss
from ffn_jax.moe.settings import MoESettings
from ffn_jax.run import build_run_state
from ffn_jax.trainer import make_train_step
from tests.helpers import moe_settings, tiny, tiny_model_cfg
from tests.test_moe import D_FF, D, _mesh, moe_cfg, moe_problems, tokens

SLOW = pytest.mark.slow  # in CI (-m "not slow" skips it locally)
# A zero-mean bias of the size of the scores (softmax ~1/8, sigmoid ~1/2): it moves choices.
BIAS8 = np.array([0.3, -0.2, 0.1, 0.0, -0.1, 0.25, -0.3, -0.05], np.float32)
TOKENS = P(("data", "fsdp", "expert"))


# ---- written-out references --------------------------------------------------------------


def rule(bias: np.ndarray, load: np.ndarray, rate: float) -> np.ndarray:
    """The loss-free update written out (rows = layers): ``b + rate * sign(mean load -
    load)``, then minus its mean."""
    moved = bias + rate * np.sign(load.mean(-1, keepdims=True) - load)
    return moved - moved.mean(-1, keepdims=True)


@dataclasses.dataclass
class Ref:
    """A written-out token-choice layer without drops: output, loads and aux values."""

    y: np.ndarray  # (b, l, d)
    choice: np.ndarray  # (t, k)
    weight: np.ndarray  # (t, k)
    count: np.ndarray  # (E,)
    aux: dict[str, float | np.ndarray]


def reference(layer: MoEFFN, x_btd, bias: np.ndarray | None = None) -> Ref:
    """Per-token routing of ``x`` by ``layer``'s router: softmax or sigmoid scores, the
    ``k`` best on the logits (or on scores + ``bias``), weights = the chosen scores
    normalised over the chosen, output = the weighted experts."""
    s = layer.settings
    w = {k: np.asarray(v, np.float64) for k, v in layer.expert_weights().items()}
    act = get_variant(layer.variant.name).activation
    x = np.asarray(x_btd, np.float64).reshape(-1, D)
    logits = x @ np.asarray(layer.router[...], np.float64)
    if s.router == "sigmoid_topk":
        scores = 1.0 / (1.0 + np.exp(-logits))
        probs = scores / scores.sum(-1, keepdims=True)
    else:
        scores = probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    select = logits if bias is None else scores + bias
    choice = np.argsort(-select, axis=-1, kind="stable")[:, : s.top_k]
    weight = np.take_along_axis(scores, choice, -1)
    if s.renormalize and s.top_k > 1:
        weight = weight / weight.sum(-1, keepdims=True)

    def expert(e: int, x_d: np.ndarray) -> np.ndarray:
        h = np.asarray(act(x_d @ w["w1"][e]))
        if "w3" in w:
            h = h * (x_d @ w["w3"][e])
        return h @ w["w2"][e]

    y = np.stack(
        [
            sum(wi * expert(e, x_d) for wi, e in zip(wt, ct, strict=True))
            for x_d, wt, ct in zip(x, weight, choice, strict=True)
        ]
    )
    count = np.bincount(choice.ravel(), minlength=s.num_experts).astype(np.float64)
    f = count / count.sum()
    aux = {
        "expert_fraction": f,
        "lb_loss": s.num_experts * np.sum(f * probs.mean(0)),
        "max_violation": count.max() / count.mean() - 1.0,
        "router_logit_rms": np.sqrt(np.mean(logits**2)),
    }
    return Ref(y.reshape(np.shape(x_btd)), choice, weight, count, aux)


def balance_layer(router="topk", balance="loss_free", dispatch="capacity", bias=None, **cfg):
    """An 8-expert top-2 swiglu layer (no drops: capacity factor 100) with bias ``bias``."""
    cfg = moe_cfg(
        router=router,
        balance=balance,
        balance_rate=0.01,
        dispatch=dispatch,
        dropless_impl="loop",
        capacity_factor=100.0,
        **cfg,
    )
    layer = MoEFFN(D, moe_settings(cfg, D_FF), variant="swiglu", rngs=nnx.Rngs(0))
    if bias is not None:
        layer.balance_bias[...] = jnp.asarray(bias)
    return layer


@nnx.jit
def apply(layer: MoEFFN, x: jax.Array):
    return layer(x)


def bias_of(layer: MoEFFN) -> np.ndarray:
    assert layer.balance_bias is not None
    return np.asarray(layer.balance_bias[...])


def check_against(layer: MoEFFN, x, y, aux, ref: Ref, bias_before=None) -> None:
    np.testing.assert_allclose(y, ref.y, atol=2e-5, rtol=1e-4)
    for key, want in ref.aux.items():
        np.testing.assert_allclose(aux[key], want, rtol=2e-5, atol=1e-6, err_msg=key)
    assert float(aux["dropped_fraction"]) == 0.0
    if bias_before is not None:
        want = rule(bias_before, ref.count, layer.settings.balance_rate)
        np.testing.assert_allclose(bias_of(layer), want, rtol=0, atol=1e-7)


# ---- (c) the bias picks, the scores weigh ------------------------------------------------


@pytest.mark.parametrize(
    "router,dispatch",
    [
        ("topk", "capacity"),
        ("sigmoid_topk", "dropless"),
        pytest.param("topk", "dropless", marks=SLOW),
        pytest.param("sigmoid_topk", "capacity", marks=SLOW),
    ],
)
def test_bias_changes_selection_not_combine_weights(router, dispatch):
    """4 one-hot tokens, 4 experts, top-2, logits set by hand: the bias moves choices (the
    output is the reference with scores + bias selection and bias-free weights, and differs
    from bias-weighted or bias-free routing), and the step updates it by the rule."""
    logits = np.array(
        [[2.0, 1.5, 0.0, -1.0], [0.2, 0.1, 0.0, 0.3], [-1.0, 0.0, 1.0, 0.9], [0.5, 0.4, 0.6, 0.0]]
    )
    bias = np.array([-0.6, 0.1, 0.2, 0.3], np.float32)
    layer = balance_layer(router, dispatch=dispatch, bias=bias, num_experts=4)
    layer.router[...] = jnp.zeros((D, 4)).at[:4].set(jnp.asarray(logits, jnp.float32))
    x = jnp.zeros((1, 4, D)).at[0, :, :4].set(jnp.eye(4))
    y, aux = apply(layer, x)
    ref, unbiased = reference(layer, x, bias), reference(layer, x)
    assert not np.array_equal(np.sort(ref.choice), np.sort(unbiased.choice))  # choices moved
    check_against(layer, x, y, aux, ref, bias_before=bias)
    # The weights are the chosen scores alone: a bias in the weights would give others.
    if router == "sigmoid_topk":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    biased_w = np.take_along_axis(scores + bias, ref.choice, -1)
    biased_w = biased_w / biased_w.sum(-1, keepdims=True)
    assert not np.allclose(biased_w, ref.weight, atol=1e-3)
    assert not np.allclose(np.asarray(y), unbiased.y, atol=1e-3)


# ---- (d) the sigmoid router and the balancing modes vs references, sharded or not ----------

MODES = [  # (router, balance, dispatch)
    ("sigmoid_topk", "aux", "capacity"),
    ("sigmoid_topk", "loss_free", "dropless"),
    ("topk", "loss_free", "capacity"),
    ("sigmoid_topk", "none", "dropless"),
    ("sigmoid_topk", "loss_free", "capacity"),
    ("topk", "loss_free", "dropless"),
]
MESHES = {"unsharded": None, "1x8": (1, 8), "2x4": (2, 4)}
# The fast set: the sigmoid router on every mesh, each loss-free path on one mesh; all in CI.
FAST = {(0, "unsharded"), (0, "1x8"), (0, "2x4"), (1, "2x4"), (2, "1x8"), (2, "unsharded")}
MODE_CASES = [
    pytest.param(*MODES[i], MESHES[m], id=f"{'-'.join(MODES[i])}-{m}", marks=marks)
    for i in range(len(MODES))
    for m in MESHES
    for marks in [() if (i, m) in FAST else SLOW]
]


def run_on(mesh_shape, build, x):
    """Build the layer (sharded on ``mesh_shape`` when given) and apply it once (training)."""
    if mesh_shape is None:
        layer = build()
        return layer, *apply(layer, x)
    mesh = _mesh(*mesh_shape)
    with sharding.axis_rules(sharding.DEFAULT_RULES), jax.set_mesh(mesh):
        layer = sharding.create_sharded(build, mesh, sharding.DEFAULT_RULES)
        y, aux = apply(layer, jax.device_put(x, NamedSharding(mesh, TOKENS)))
    return layer, y, aux


@pytest.mark.parametrize("router,balance,dispatch,mesh_shape", MODE_CASES)
def test_router_and_balance_match_reference(router, balance, dispatch, mesh_shape):
    bias = BIAS8 if balance == "loss_free" else None
    x = tokens(batch=8, length=4)
    layer, y, aux = run_on(mesh_shape, lambda: balance_layer(router, balance, dispatch, bias), x)
    ref = reference(layer, x, bias)
    check_against(layer, x, y, aux, ref, bias_before=bias)
    if balance == "loss_free":  # one bias, replicated: every shard computed the same update
        assert layer.balance_bias is not None
        assert layer.balance_bias[...].sharding.is_fully_replicated
    else:
        assert layer.balance_bias is None


def test_sigmoid_top1_keeps_the_raw_score():
    """At k=1 the weight is the chosen sigmoid score (normalising would make it 1 and leave
    the router no task gradient)."""
    layer = balance_layer("sigmoid_topk", "none", top_k=1)
    x = tokens()
    y, _ = apply(layer, x)
    ref = reference(layer, x)
    assert np.all(ref.weight < 1.0)
    np.testing.assert_allclose(y, ref.y, atol=2e-5, rtol=1e-4)


# ---- aux scope and health metrics --------------------------------------------------------


@pytest.mark.parametrize("mesh_shape", [None, (2, 4)], ids=["unsharded", "2x4"])
def test_sequence_scope_lb_loss_matches_reference(mesh_shape):
    """``aux_scope="sequence"``: f_i and P_i within each sequence, the losses averaged
    (DeepSeek-V3's sequence-wise loss), for the sigmoid router's normalised scores."""
    x = tokens(batch=8, length=4)
    build = lambda: balance_layer("sigmoid_topk", "aux", aux_scope="sequence")
    layer, _, aux = run_on(mesh_shape, build, x)
    ref = reference(layer, x)
    logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(layer.router[...], np.float64)
    sig = 1 / (1 + np.exp(-logits))
    probs = (sig / sig.sum(-1, keepdims=True)).reshape(8, 4, 8)
    choice = ref.choice.reshape(8, 4 * 2)
    per_seq = [
        8 * np.sum(np.bincount(choice[b], minlength=8) / choice.shape[1] * probs[b].mean(0))
        for b in range(8)
    ]
    np.testing.assert_allclose(aux["lb_loss"], np.mean(per_seq), rtol=2e-5)
    assert not np.isclose(np.mean(per_seq), ref.aux["lb_loss"], rtol=1e-3)  # not the batch one


def test_health_metrics_by_hand():
    """4 one-hot tokens, top-1 choices 0, 1, 0, 2: loads [2, 1, 1, 0], MaxVio = 2/1 - 1."""
    layer = MoEFFN(
        4,
        moe_settings(moe_cfg(num_experts=4, top_k=1, capacity_factor=0.5), 8),
        variant="relu",
        rngs=nnx.Rngs(0),
    )
    logits = np.array([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [3.0, 0, 0, 1], [0, 0, 0.5, 0]])
    layer.router[...] = jnp.asarray(logits)
    _, aux = apply(layer, jnp.eye(4)[None])
    np.testing.assert_allclose(aux["max_violation"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["router_logit_rms"], np.sqrt(np.mean(logits**2)), rtol=1e-6)
    layer.router[...] = jnp.eye(4)  # one token per expert
    _, aux = apply(layer, jnp.eye(4)[None])
    assert float(aux["max_violation"]) == 0.0


def test_aux_loss_is_added_only_under_aux_balance():
    aux = {"lb_loss": jnp.asarray([2.0, 4.0]), "z_loss": jnp.asarray([1.0, 3.0])}
    base = moe_settings(moe_cfg(lb_loss_coef=0.5, z_loss_coef=0.1), D_FF)
    for balance, want in (("aux", 0.5 * 3 + 0.1 * 2), ("loss_free", 0.2), ("none", 0.2)):
        s = dataclasses.replace(base, balance=balance)
        np.testing.assert_allclose(moe_aux_loss(aux, s), want, rtol=1e-6, err_msg=balance)


# ---- (b) evaluation never moves the bias -------------------------------------------------


@pytest.mark.parametrize("router", ["topk", "sigmoid_topk"])
def test_eval_mode_never_changes_the_bias(router):
    layer = balance_layer(router, bias=BIAS8)
    x = tokens()
    layer.eval()
    for _ in range(2):
        apply(layer, x)
        np.testing.assert_array_equal(bias_of(layer), BIAS8)
    layer.train()
    apply(layer, x)
    assert not np.array_equal(bias_of(layer), BIAS8)


# ---- the LM: scanned layers, the python loop and remat agree -----------------------------


def _lm_spec(scan: bool = True, remat: str = "none", balance: str = "loss_free"):
    cfg = tiny_model_cfg(scan_layers=scan, remat=remat)
    cfg.moe.update(num_experts=4, top_k=2, balance=balance, balance_rate=0.01)
    return spec_lib.model_spec(cfg)


@nnx.jit
def _lm_loss(model: LM, tok: jax.Array):
    return lm_loss(model, tok)


def _lm_bias(model: LM) -> np.ndarray:
    ((_, v),) = list(nnx.to_flat_state(nnx.state(model, BalanceBias)))
    return np.asarray(v[...])


def test_lm_scan_loop_and_remat_update_the_bias_alike():
    """One training forward of the 2-layer LM: every MoE layer's bias moves by the rule from
    its own loads, identically with nnx.scan, the python loop and scan + remat; the bias is not a
    parameter."""
    tok = jax.random.randint(jax.random.key(5), (4, 17), 0, 97)
    out = {}
    for scan, remat in ((True, "none"), (False, "none"), (True, "full")):
        model = LM(_lm_spec(scan, remat), rngs=nnx.Rngs(0))
        assert _lm_bias(model).shape == (2, 4) and not _lm_bias(model).any()
        _, metrics = _lm_loss(model, tok)
        load = np.rint(np.asarray(metrics["moe/expert_fraction"]) * 4 * 16 * 2)  # (layers, E)
        np.testing.assert_allclose(_lm_bias(model), rule(np.zeros((2, 4)), load, 0.01), atol=1e-7)
        assert np.asarray(metrics["moe/max_violation"]).shape == (2,)
        assert np.asarray(metrics["moe/router_logit_rms"]).shape == (2,)
        out[(scan, remat)] = _lm_bias(model)
    np.testing.assert_allclose(out[(True, "none")], out[(False, "none")], atol=1e-7)
    np.testing.assert_allclose(out[(True, "none")], out[(True, "full")], atol=1e-7)
    counts = [
        count_params(nnx.eval_shape(lambda b=b: LM(_lm_spec(balance=b), rngs=nnx.Rngs(0))))
        for b in ("loss_free", "aux")
    ]
    assert counts[0] == counts[1]  # the bias is not a parameter


# ---- (a), (e) the trainer: AdamW never sees the bias; checkpoints keep it bit-exactly -----

B, T, K, RATE = 8, 32, 2, 0.01


@pytest.fixture(scope="module")
def trained():
    """The tiny LM (4 experts, top-2, loss-free) on a (data 2, expert 4) mesh, stepped twice
    by the trainer's step on random tokens: ``(spec, rs, step, states, metrics, batches)``."""
    c = tiny(
        **{
            "model.moe.num_experts": 4,
            "model.moe.top_k": K,
            "model.moe.balance": "loss_free",
            "model.moe.balance_rate": RATE,
            "data.seq_len": T,
            "data.batch_size": B,
            "mesh.shape.data": 2,
            "mesh.shape.expert": 4,
        }
    )
    spec = spec_lib.from_config(c, num_devices=8)
    rs = build_run_state(spec)
    with jax.set_mesh(rs.mesh), sharding.axis_rules(rs.rules):
        step = jax.jit(
            make_train_step(rs.graphdef, spec.train),
            in_shardings=(rs.state_shardings, rs.batch_sharding),
            out_shardings=(rs.state_shardings, None),
        )
        batches = [
            jax.device_put(
                jax.random.randint(jax.random.key(i), (B, T + 1), 0, 257), rs.batch_sharding
            )
            for i in range(3)
        ]
        states, metrics = [rs.state], []
        for tok in batches[:2]:
            state, m = step(states[-1], tok)
            states.append(state)
            metrics.append(m)
    return spec, rs, step, states, metrics, batches


def state_bias(rs, state) -> np.ndarray:
    model, _ = nnx.merge(rs.graphdef, state)
    return _lm_bias(model)


def test_adamw_has_no_state_for_the_bias_and_a_step_applies_the_rule(trained):
    _, rs, _, states, metrics, _ = trained
    model, opt = nnx.merge(rs.graphdef, states[0])
    opt_paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(opt))]
    assert any("router" in p for p in opt_paths)  # the moments of the router are there ...
    assert not any("balance_bias" in p for p in opt_paths)  # ... and none of the bias
    param_paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert param_paths and not any(p[-1] == "balance_bias" for p in param_paths)
    bias = state_bias(rs, states[0])
    assert bias.shape == (2, 4) and not bias.any()
    for i, m in enumerate(metrics):
        load = np.rint(np.asarray(m["moe/expert_fraction"]) * B * T * K)  # (layers, E)
        assert load.sum() == 2 * B * T * K
        want = rule(bias, load, RATE)
        got = state_bias(rs, states[i + 1])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7, err_msg=f"step {i + 1}")
        assert not np.array_equal(got, bias)
        bias = got


def _leaves(state) -> dict:
    out = {}
    for path, v in nnx.to_flat_state(state):
        a = v[...]
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        out[path] = np.asarray(a)
    return out


def test_checkpoint_restores_the_bias_bit_exactly(trained, tmp_path):
    spec, rs, step, states, _, batches = trained
    saved = states[-1]
    ckpt = Checkpointer(str(tmp_path), every=1, keep=1)
    try:
        ckpt.save(2, saved, {"step": 2}, force=True)
        ckpt.wait()
        fresh = build_run_state(spec).state
        assert not state_bias(rs, fresh).any()
        restored, meta, at = ckpt.restore(fresh)
    finally:
        ckpt.close()
    assert at == 2 and meta["step"] == 2
    want, got = _leaves(saved), _leaves(restored)
    assert sorted(want, key=str) == sorted(got, key=str)
    bias_paths = [p for p in want if p[-1] == "balance_bias"]
    assert len(bias_paths) == 1
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    assert state_bias(rs, restored).any()
    # Training on from the restored state is the same step as from the saved one.
    with jax.set_mesh(rs.mesh), sharding.axis_rules(rs.rules):
        a, ma = step(saved, batches[2])
        b, mb = step(restored, batches[2])
    np.testing.assert_array_equal(state_bias(rs, a), state_bias(rs, b))
    assert float(ma["loss"]) == float(mb["loss"])


# ---- (f) loss-free balancing undoes a collapse that balance=none keeps -------------------


def _collapse_run(balance: str, router: str, updates: int = 100) -> list[float]:
    """A top-1 layer whose router favours expert 0 along input dimension 0, fed fresh
    batches offset along that dimension: MaxVio of every training call."""
    cfg = moe_cfg(
        router=router,
        num_experts=4,
        top_k=1,
        balance=balance,
        balance_rate=0.01,
        dispatch="dropless",
        dropless_impl="loop",
    )
    layer = MoEFFN(D, moe_settings(cfg, D_FF), variant="relu", rngs=nnx.Rngs(0))
    layer.router[...] = layer.router[...].at[0, 0].add(2.0)
    vio = []
    for i in range(updates):
        x = tokens(batch=8, length=16, seed=100 + i).at[..., 0].add(1.5)
        _, aux = apply(layer, x)
        vio.append(float(aux["max_violation"]))
    return vio


@pytest.mark.parametrize("router", ["topk", "sigmoid_topk"])
def test_loss_free_brings_max_violation_down_where_none_collapses(router):
    none, free = _collapse_run("none", router), _collapse_run("loss_free", router)
    assert none[0] == free[0] > 1.8  # the same collapsed start (MaxVio E-1 = 3 at total)
    late_none, late_free = np.mean(none[-10:]), np.mean(free[-10:])
    assert late_none > 1.8, none
    assert late_free < 0.5 * late_none and late_free < 1.0, free


# ---- (g) config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(balance="sometimes"), "model.moe.balance='sometimes' is not supported"),
        (dict(balance_rate=-0.1), "model.moe.balance_rate=-0.1 must be >= 0"),
        (dict(aux_scope="token"), "model.moe.aux_scope='token' is not supported"),
        (
            dict(router="expert_choice", balance="loss_free"),
            "model.moe.balance='loss_free' does not apply to router='expert_choice'",
        ),
        (dict(router="sigmoid"), "model.moe.router='sigmoid' is not supported"),
    ],
)
def test_bad_balance_config_is_one_clear_line(overrides, field):
    (problem,) = moe_problems(**overrides)
    assert problem.startswith(field) and "\n" not in problem


def test_good_balance_configs_and_legacy_defaults():
    for overrides in (
        dict(router="sigmoid_topk", dispatch="dropless", balance="loss_free"),
        dict(router="sigmoid_topk", aux_scope="sequence"),
        dict(router="expert_choice", balance="none"),
        dict(balance="none", lb_loss_coef=0.5),  # the coefficient is simply unused
    ):
        assert moe_problems(**overrides) == [], overrides
    legacy = spec_lib.LEGACY_DEFAULTS
    assert legacy["model.moe.balance"] == "aux" and legacy["model.moe.aux_scope"] == "batch"
    assert legacy["model.moe.balance_rate"] == 1e-3
    old = tiny(**{"model.moe.num_experts": 4}).to_dict()
    for field in ("balance", "balance_rate", "aux_scope"):
        del old["model"]["moe"][field]
    s = spec_lib.from_config(old, num_devices=8).model.moe
    assert s is not None
    assert (s.balance, s.balance_rate, s.aux_scope) == ("aux", 1e-3, "batch")
    default = MoESettings.from_block({**tiny().model.moe.to_dict(), "num_experts": 4}, 64)
    assert (default.balance, default.balance_rate, default.aux_scope) == ("aux", 1e-3, "batch")
