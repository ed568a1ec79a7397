"""FLOPs per token against the formula written out by hand."""

import pytest

from configs.base import get_config
from ffn_jax.flops import flops_per_token
from tests.helpers import run_spec, set_fields


def model(**overrides):
    c = set_fields(get_config("swiglu,size=tiny"), {f"model.{k}": v for k, v in overrides.items()})
    return run_spec(c, num_devices=8).model


def test_dense_flops_by_hand():
    m = model()  # d 64, 2 layers, 4 heads, 2 kv heads, swiglu d_ff 168, vocab 384
    d, L, n, k, h, f, v, t = 64, 2, 4, 2, 16, 168, 384, 64
    attn = 2 * d * h * (2 * n + 2 * k) + 4 * t * n * h
    ffn = 2 * 3 * d * f + 2 * f  # three matmuls, activation + gate product
    out = flops_per_token(m, t)
    assert out["attention_forward"] == L * attn
    assert out["ffn_forward"] == L * ffn
    assert out["forward"] == L * (attn + ffn) + 2 * d * v
    assert out["train"] == 3 * out["forward"]


def test_moe_layers_count_active_flops_only():
    dense = flops_per_token(model(n_layers=4), 64)
    moe = flops_per_token(
        model(n_layers=4, **{"moe.num_experts": 8, "moe.top_k": 1, "moe.every": 2}), 64
    )
    expert = 2 * 3 * 64 * 168 + 2 * 168
    router = 2 * 64 * 8
    # Two MoE layers of top-1 over full-width experts: the dense FFN's FLOPs plus the router.
    assert moe["ffn_forward"] == pytest.approx(dense["ffn_forward"] + 2 * router)
    assert moe["ffn_forward"] == 4 * expert + 2 * router
