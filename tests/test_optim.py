"""The optimiser and the schedule registry against values computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.base import get_config
from ffn_jax import optim
from tests.helpers import run_spec, set_fields


def train_spec(**overrides):
    c = set_fields(get_config("swiglu,size=tiny"), {f"train.{k}": v for k, v in overrides.items()})
    return run_spec(c, num_devices=8).train


@pytest.mark.parametrize("name", list(optim.SCHEDULES))
def test_every_schedule_warms_up_then_ends_where_it_says(name):
    t = train_spec(schedule=name, lr=1e-2, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    s = optim.make_schedule(t)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(5e-3)
    assert float(s(10)) == pytest.approx(1e-2)
    end = {"cosine": 1e-3, "linear": 1e-3, "constant": 1e-2}[name]
    assert float(s(110)) == pytest.approx(end, rel=1e-5)
    mid = float(s(60))  # halfway through the decay
    want = {"cosine": 1e-3 + 0.5 * 9e-3, "linear": 5.5e-3, "constant": 1e-2}[name]
    assert mid == pytest.approx(want, rel=1e-5)


def test_unknown_schedule_is_a_config_problem():
    from ffn_jax.spec import problems

    c = set_fields(get_config("swiglu,size=tiny"), {"train.schedule": "step"})
    (p,) = problems(c, num_devices=8)
    assert p.startswith("train.schedule='step' is unknown; use one of ('cosine', 'linear'")


def test_clipping_and_decay():
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    grads = {"w": jnp.full((2, 2), 100.0), "scale": jnp.zeros(2)}
    t = train_spec(lr=1.0, warmup_steps=0, schedule="constant", grad_clip=1.0, weight_decay=0.5)
    tx = optim.make_optimizer(t)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is lr * sign(g) for any scale, so clipping shows in the moments only;
    # decay applies to the matrix (0.5 * 1) and not to the norm scale.
    np.testing.assert_allclose(updates["w"], -(1.0 + 0.5), rtol=1e-4)
    np.testing.assert_allclose(updates["scale"], 0.0)
    assert isinstance(tx, optax.GradientTransformation)
    unclipped = optim.make_optimizer(train_spec(grad_clip=0.0))
    inner = tx.init(params).inner_state
    assert len(inner) == 2 and len(unclipped.init(params).inner_state) != 2  # chain vs adamw


def test_the_learning_rate_is_state_so_an_lr_sweep_shares_one_program():
    params = {"w": jnp.ones((4, 4))}
    grads = {"w": jnp.arange(16.0).reshape(4, 4) - 7.5}

    def step(tx, state):
        return tx.update(grads, state, params)[0]["w"]

    hlo = {}
    updates = {}
    for lr in (1e-3, 4e-3):
        t = train_spec(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0)
        tx = optim.make_optimizer(t)
        state = tx.init(params)
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(lr)
        hlo[lr] = jax.jit(lambda s, tx=tx: step(tx, s)).lower(state).as_text()
        updates[lr] = step(tx, state)
    assert hlo[1e-3] == hlo[4e-3]  # lr is an input, not a constant of the program
    np.testing.assert_allclose(updates[4e-3], 4 * updates[1e-3], rtol=1e-6)
