"""The FFN variant registry, the dense FFN module and the parameter-matching rule.

Every variant is one row of ``VARIANTS`` (data, not an if-chain):

    ungated:  FFN(x) = act(x W1 + b1) W2 + b2
    gated:    FFN(x) = (act(x W1 + b1) * (x W3 + b3)) W2 + b2     (W3 is the linear gate half)

Parameter names follow LLaMA: ``w1`` (d_model -> d_ff), ``w3`` (gate, gated only),
``w2`` (d_ff -> d_model); biases ``b1``/``b3``/``b2`` are optional; kernels are ``(in, out)``.

Parameter matching: an ungated variant gets ``d_ff = multiplier * d_model`` and a gated one
(three matrices instead of two) ``2/3`` of that, both rounded to the nearest multiple of
``multiple_of``, so every variant has (almost) the same parameters and FLOPs per token.
``ffn_cost`` reports both so matched comparisons are checked, not assumed.

Hidden-activation scale (``model.ffn_init``, one row of ``FFN_INITS``): ``"default"`` leaves
``h`` as the formulas above; ``"unit_variance"`` multiplies it by a constant gain
``1 / std(h)`` for independent standard-normal pre-activations, so every variant's hidden
activations start with unit variance (``hidden_gain``). The gain is folded into the activation
(``hidden_activation``), which the dense FFN and the MoE experts both apply.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ffn_jax.sharding import constrain, param

Activation = Callable[[jax.Array], jax.Array]


def _squared_relu(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


def _identity(x: jax.Array) -> jax.Array:
    return x


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One FFN variant: its activation and whether it is gated (has the ``w3`` half)."""

    name: str
    activation: Activation
    gated: bool
    description: str


_ROWS = (
    Variant("relu", jax.nn.relu, False, "ReLU (Vaswani et al. 2017)"),
    Variant("gelu", _gelu_exact, False, "GELU, exact erf form"),
    Variant("gelu_tanh", _gelu_tanh, False, "GELU, tanh approximation (GPT-2/BERT)"),
    Variant("swish", jax.nn.silu, False, "Swish / SiLU, x * sigmoid(x)"),
    Variant("silu", jax.nn.silu, False, "alias of swish"),
    Variant("squared_relu", _squared_relu, False, "relu(x)^2 (Primer, So et al. 2021)"),
    Variant("glu", jax.nn.sigmoid, True, "GLU, sigmoid gate (Dauphin et al. 2017)"),
    Variant("bilinear", _identity, True, "Bilinear, no activation"),
    Variant("reglu", jax.nn.relu, True, "ReGLU, relu gate"),
    Variant("geglu", _gelu_exact, True, "GEGLU, exact GELU gate"),
    Variant("geglu_tanh", _gelu_tanh, True, "GEGLU, tanh-GELU gate"),
    Variant("swiglu", jax.nn.silu, True, "SwiGLU, swish gate (PaLM, LLaMA)"),
)
VARIANTS: dict[str, Variant] = {v.name: v for v in _ROWS}


def get_variant(name: str) -> Variant:
    """The registry row for ``name``; ValueError listing the valid names otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"unknown FFN variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def _normal_moments(act: Activation) -> tuple[float, float]:
    """``(E[act(z)], E[act(z)^2])`` for ``z ~ N(0, 1)``.

    Gauss-Legendre quadrature (24 nodes) on each unit panel of ``[-12, 12]`` against the
    normal density: the panel edges sit on the integers, where piecewise activations have
    their kinks (relu at 0), so every panel's integrand is smooth and the sum is accurate to
    ~1e-7 relative (float32 activation values); beyond 12 sd even ``relu(z)^4`` has < 1e-27.
    """
    nodes, weights = np.polynomial.legendre.leggauss(24)
    edges = np.arange(-12.0, 13.0)
    z = ((edges[:-1, None] + edges[1:, None]) / 2 + nodes / 2).ravel()  # panel half-width 1/2
    w = np.tile(weights / 2, len(edges) - 1) * np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    # In a fresh thread: no enclosing trace (the nnx.vmap that builds stacked layers, a jit)
    # is active there, so the values are concrete wherever the FFN is built.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        a = pool.submit(lambda: np.asarray(act(jnp.asarray(z, jnp.float32)), np.float64)).result()
    return float(w @ a), float(w @ a**2)


@functools.cache
def unit_variance_gain(variant: str) -> float:
    """``1 / std(h)`` of the variant's hidden activation for independent ``N(0, 1)``
    pre-activations: ``h = act(z)`` (ungated) or ``act(z) * z3`` (gated). The gate ``z3``
    has mean 0 and mean square 1, so a gated ``h`` has mean 0 and ``E[h^2] = E[act(z)^2]``."""
    v = get_variant(variant)
    mean, mean_sq = _normal_moments(v.activation)
    factor_mean = 0.0 if v.gated else 1.0  # E of the second factor: z3, or the constant 1
    return 1.0 / math.sqrt(mean_sq - (mean * factor_mean) ** 2)


# ``model.ffn_init``: name -> the gain on the hidden activations of a variant (by name).
FFN_INITS: dict[str, Callable[[str], float]] = {
    "default": lambda variant: 1.0,
    "unit_variance": unit_variance_gain,
}


def hidden_gain(variant: str, ffn_init: str = "default") -> float:
    """The constant the hidden activations of ``variant`` are multiplied by under
    ``ffn_init``; ValueError listing the valid inits otherwise."""
    if ffn_init not in FFN_INITS:
        raise ValueError(f"unknown model.ffn_init {ffn_init!r}; valid: {', '.join(FFN_INITS)}")
    return FFN_INITS[ffn_init](variant)


@dataclasses.dataclass(frozen=True)
class ScaledActivation:
    """``gain * act(x)``: hashable and compared by value, so modules holding it split into
    equal graph definitions and it can be a static argument (``gated_activation``)."""

    act: Activation
    gain: float

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(x) * self.gain  # a weak-typed constant: keeps x's dtype


def hidden_activation(variant: str, ffn_init: str = "default") -> Activation:
    """The activation an FFN of ``variant`` applies under ``ffn_init``: the registry's own
    function when the gain is 1 (``"default"``: bit-identical), else it times the gain. The
    dense FFN and the MoE experts both take their activation from here."""
    act, gain = get_variant(variant).activation, hidden_gain(variant, ffn_init)
    return act if gain == 1.0 else ScaledActivation(act, gain)


def matched_d_ff(variant: str, d_model: int, multiplier: float = 4.0, multiple_of: int = 8) -> int:
    """Hidden width that matches parameters across variants.

    ``multiplier * d_model`` for ungated variants, ``2/3`` of it for gated ones, rounded to
    the nearest multiple of ``multiple_of`` (at least one multiple).
    """
    if multiple_of < 1:
        raise ValueError(f"model.ffn_multiple_of={multiple_of} must be >= 1")
    width = multiplier * d_model * (2.0 / 3.0 if get_variant(variant).gated else 1.0)
    return max(multiple_of, int(round(width / multiple_of)) * multiple_of)


def ffn_cost(variant: str, d_model: int, d_ff: int, use_bias: bool = False) -> dict[str, int]:
    """Parameters and forward FLOPs per token of one FFN.

    FLOPs count the matmuls (2 per multiply-add) plus one FLOP per hidden unit for the
    activation and, for gated variants, one for the gating product. Biases add one FLOP each.
    """
    gated = get_variant(variant).gated
    n_mats = 3 if gated else 2
    params = n_mats * d_model * d_ff
    flops = 2 * params + d_ff * (2 if gated else 1)
    if use_bias:
        n_bias = (2 if gated else 1) * d_ff + d_model
        params += n_bias
        flops += n_bias
    return {"params": params, "flops_per_token": flops}


def token_matmul(x: jax.Array, w: jax.Array, **dot_kwargs) -> jax.Array:
    """``x @ w`` for ``x: (..., k)``, ``w: (k, n)``, computed on the tokens flattened to 2-D.

    With 3-D activations the weight gradient contracts two axes (batch and length), and
    XLA:CPU lowers it through a transposed copy to a slower matmul; on ``(tokens, k)`` it
    is one plain matmul (the gain is in ``docs/perf.md``). The reshapes are free
    (row-major bitcasts).
    ``dot_kwargs`` go to ``jnp.dot`` (e.g. ``preferred_element_type``).
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, **dot_kwargs)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def gated_activation(
    act: Callable[[jax.Array], jax.Array], h: jax.Array, g: jax.Array
) -> jax.Array:
    """``act(h) * g``, keeping only ``h`` and ``g`` for the backward pass.

    Plain autodiff keeps ``act``'s intermediates as well (for SiLU: ``h``, ``sigmoid(h)``,
    ``silu(h)`` and ``g``); the backward here recomputes them from ``h`` in the fused
    elementwise kernel instead, halving the per-layer residual memory traffic.
    """
    return cast(jax.Array, _gated(act, h, g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated(act: Callable[[jax.Array], jax.Array], h: jax.Array, g: jax.Array) -> jax.Array:
    return act(h) * g


def _gated_fwd(act, h, g):
    return act(h) * g, (h, g)


def _gated_bwd(act, residuals, dy):
    h, g = residuals
    a, act_vjp = jax.vjp(act, h)
    (dh,) = act_vjp(dy * g)
    return dh, dy * a


_gated.defvjp(_gated_fwd, _gated_bwd)


# Std of a unit normal truncated to [-2, 2]: dividing by it gives the truncated draw std 1.
TRUNCATED_NORMAL_STD = 0.87962566103423978


def kernel_init(fan_in: int, scale: float = 1.0):
    """Truncated-normal (at 2 std) init with std ``scale / sqrt(fan_in)`` whatever the kernel's
    shape: ``fan_in`` is given, not read off the shape, so multi-axis kernels such as
    ``wq (d, n, h)`` get ``1/sqrt(d)``."""
    return nnx.initializers.truncated_normal(scale / math.sqrt(fan_in) / TRUNCATED_NORMAL_STD)


class FFN(nnx.Module):
    """A dense FFN of any registry variant. ``x: (..., d_model) -> (..., d_model)``."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        variant: str,
        *,
        use_bias: bool = False,
        dropout: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
        out_scale: float = 1.0,
        ffn_init: str = "default",
        rngs: nnx.Rngs,
    ):
        self.variant = get_variant(variant)
        self.activation = hidden_activation(variant, ffn_init)  # the variant's, times the gain
        self.dtype = dtype
        init_in = param(kernel_init(d_model), ("embed", "mlp"))
        init_out = param(kernel_init(d_ff, out_scale), ("mlp", "embed"))
        self.w1 = nnx.Param(init_in(rngs.params(), (d_model, d_ff)))
        self.w3 = nnx.Param(init_in(rngs.params(), (d_model, d_ff))) if self.variant.gated else None
        self.w2 = nnx.Param(init_out(rngs.params(), (d_ff, d_model)))
        zeros_h = param(nnx.initializers.zeros_init(), ("mlp",))
        zeros_d = param(nnx.initializers.zeros_init(), ("embed",))
        self.b1 = nnx.Param(zeros_h(rngs.params(), (d_ff,))) if use_bias else None
        self.b3 = (
            nnx.Param(zeros_h(rngs.params(), (d_ff,))) if use_bias and self.variant.gated else None
        )
        self.b2 = nnx.Param(zeros_d(rngs.params(), (d_model,))) if use_bias else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.capture = False  # True: also return {"capture/hidden": h} (see ``LM.capture``)

    def hidden(self, x: jax.Array) -> jax.Array:
        """The hidden activations ``(..., d_ff)`` (the gated product for gated variants)."""
        x = x.astype(self.dtype)
        if self.w3 is not None:
            # One matmul for both halves (faster on CPU: docs/perf.md), on the halves stacked
            # on a new axis, (d, 2, f): a concatenation along f would cross the shards of a
            # tensor-sharded ``mlp`` axis and cost collective-permutes.
            w13 = jnp.stack([self.w1[...], self.w3[...]], axis=1).astype(self.dtype)
            hg = jnp.einsum("...d,dcf->...cf", x, w13)
            h, g = hg[..., 0, :], hg[..., 1, :]
        else:
            h, g = token_matmul(x, self.w1[...].astype(self.dtype)), None
        if self.b1 is not None:
            h = h + self.b1[...].astype(self.dtype)
        if g is None:
            h = self.activation(h)
        else:
            if self.b3 is not None:
                g = g + self.b3[...].astype(self.dtype)
            h = gated_activation(self.activation, h, g)
        if h.ndim == 3:
            h = constrain(h, ("batch", "length", "act_mlp"))
        return h

    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """``y`` (same shape as ``x``); with ``capture`` on, ``(y, {"capture/hidden": h})``."""
        h = captured = self.hidden(x)
        if self.dropout is not None:
            h = self.dropout(h)
        y = token_matmul(h, self.w2[...].astype(self.dtype))
        if self.b2 is not None:
            y = y + self.b2[...].astype(self.dtype)
        return (y, {"capture/hidden": captured}) if self.capture else y


def build_ffn(
    variant: str,
    d_model: int,
    *,
    d_ff: int | None = None,
    multiplier: float = 4.0,
    multiple_of: int = 8,
    use_bias: bool = False,
    dropout: float = 0.0,
    dtype: jnp.dtype = jnp.float32,
    out_scale: float = 1.0,
    ffn_init: str = "default",
    rngs: nnx.Rngs,
) -> FFN:
    """A dense FFN of ``variant`` by name, ``d_ff`` defaulting to the parameter-matched width
    (the LM builds ``FFN`` with ``ModelSpec.d_ff``, resolved by the same rule)."""
    if d_ff is None:
        d_ff = matched_d_ff(variant, d_model, multiplier, multiple_of)
    return FFN(
        d_model,
        d_ff,
        variant,
        use_bias=use_bias,
        dropout=dropout,
        dtype=dtype,
        out_scale=out_scale,
        ffn_init=ffn_init,
        rngs=rngs,
    )


def cost_table(d_model: int, multiplier: float = 4.0, multiple_of: int = 8) -> list[dict]:
    """One row per variant at matched width: name, gated, d_ff, params, FLOPs/token, ratio."""
    base = ffn_cost("relu", d_model, matched_d_ff("relu", d_model, multiplier, multiple_of))
    rows = []
    for name, v in VARIANTS.items():
        d_ff = matched_d_ff(name, d_model, multiplier, multiple_of)
        c = ffn_cost(name, d_model, d_ff)
        rows.append(
            {
                "variant": name,
                "gated": v.gated,
                "d_ff": d_ff,
                **c,
                "params_vs_relu": c["params"] / base["params"],
            }
        )
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Parameters and FLOPs/token of every FFN variant.")
    ap.add_argument("--d_model", type=int, default=512)
    ap.add_argument("--multiplier", type=float, default=4.0)
    ap.add_argument("--multiple_of", type=int, default=8)
    a = ap.parse_args()
    print("| variant | gated | d_ff | params | FLOPs/token | params vs relu |")
    print("|---|---|---|---|---|---|")
    for r in cost_table(a.d_model, a.multiplier, a.multiple_of):
        print(
            f"| {r['variant']} | {r['gated']} | {r['d_ff']} | {r['params']:,} | "
            f"{r['flops_per_token']:,} | {r['params_vs_relu']:.4f} |"
        )
