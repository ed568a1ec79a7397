"""The dropless token exchange over the expert axis (``ffn_jax/moe/exchange.py``): the CPU
emulation of ``ragged_all_to_all`` against the collective's definition, the ragged exchange
round trip, and which exchange each backend gets. (The sharded MoE layer with
``exchange="ragged"`` equals the unsharded one in ``test_moe.py``.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ffn_jax.moe.exchange import emulated_ragged_all_to_all, ragged_exchange, uses_ragged

N = 4  # shards of the axis


def _mesh() -> jax.sharding.Mesh:
    auto = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((N,), ("x",), axis_types=auto, devices=jax.devices()[:N])


def _per_shard(fn, *args):
    """``fn`` on every shard of a 4-way axis ``"x"``; args and result stacked by shard."""
    mapped = jax.shard_map(
        lambda *a: fn(*(b[0] for b in a))[None], mesh=_mesh(), in_specs=P("x"), out_specs=P("x")
    )
    with jax.set_mesh(_mesh()):
        return np.asarray(jax.jit(mapped)(*args))


def test_emulated_ragged_all_to_all_matches_the_definition():
    rng = np.random.default_rng(0)
    rows, out_rows = 10, 24
    send = rng.integers(0, 4, size=(N, N)).astype(np.int32)  # send[s, j]: rows s -> j
    in_off = np.zeros((N, N), np.int32)
    for s in range(N):  # sender s's segments, with gaps between them
        in_off[s] = np.cumsum(np.r_[0, send[s, :-1]]) + np.arange(N) // 2
    # Receiver j stacks its senders' segments in sender order, from offset 1.
    out_off = 1 + np.cumsum(np.vstack([np.zeros((1, N), np.int32), send[:-1]]), axis=0)
    recv = send.T.copy()  # recv[j, s] = send[s, j]
    operand = rng.normal(size=(N, rows, 3)).astype(np.float32)
    output = np.full((N, out_rows, 3), -1.0, np.float32)
    got = _per_shard(
        functools.partial(emulated_ragged_all_to_all, axis_name="x"),
        *map(jnp.asarray, (operand, output, in_off, send, out_off, recv)),
    )
    want = output.copy()
    for s in range(N):
        for j in range(N):
            o, i, c = out_off[s, j], in_off[s, j], send[s, j]
            want[j, o : o + c] = operand[s, i : i + c]
    np.testing.assert_array_equal(got, want)


def test_ragged_exchange_sends_rows_to_their_experts_and_back():
    """Each row reaches the shard holding its expert with its local expert id, and its
    result comes back to its own place."""
    rng = np.random.default_rng(1)
    rows, d, num_local = 12, 3, 2
    expert = np.sort(rng.integers(0, N * num_local, size=(N, rows)), axis=1).astype(np.int32)
    x = rng.normal(size=(N, rows, d)).astype(np.float32)

    def compute(recv_x, recv_e):  # a result that names the shard and the local expert
        tag = 1 + recv_e + 10 * jax.lax.axis_index("x")
        return jnp.where((recv_e < num_local)[:, None], recv_x * tag[:, None], 0.0)

    def fn(x_nd, expert_n):
        return ragged_exchange(x_nd, expert_n, num_local, "x", N, compute)

    got = _per_shard(fn, jnp.asarray(x), jnp.asarray(expert))
    shard, local = np.divmod(expert, num_local)
    np.testing.assert_allclose(got, x * (1 + local + 10 * shard)[..., None], rtol=1e-6)


@pytest.mark.parametrize(
    "exchange,platform,ragged",
    [
        ("auto", "cpu", False),
        ("auto", "gpu", True),
        ("auto", "tpu", True),
        ("padded", "gpu", False),
        ("ragged", "cpu", True),  # the emulation: for tests on CPU
    ],
)
def test_which_exchange_each_backend_gets(exchange, platform, ragged):
    assert uses_ragged(exchange, platform) is ragged
