"""The compiled train step at the ``cpu`` comparison preset's shape holds the ops it should
and no more: a guard for the small-shape speed work (docs/perf.md), not a timed test.

It inspects the optimised HLO of the step the sweep runs (one device): the layer loop is
unrolled (no ``while``), nothing crosses to the host inside the step, the matmuls are
exactly the architecture's (three per forward matmul: forward, input gradient, weight
gradient), and the fusion count stays within a few percent of what it was when the step
was last made faster.
"""

import collections
import re

import pytest

from configs import compare
from ffn_jax import sharding, sweep
from ffn_jax.run import build_run_state
from ffn_jax.spec import from_config
from ffn_jax.trainer import _compile_train_step

# Fusions in the gelu step's entry computation, jax 0.10.2 (XLA:CPU): 348 when the layer
# loop was unrolled, 312 with the einsum attention (2026-11-29); a 5% margin for harmless
# differences in XLA's choices.
FUSIONS_MEASURED = 312
HOST_OPS = ("infeed", "outfeed", "send", "recv", "send-done", "recv-done")


def _opcodes(hlo: str, entry_only: bool) -> collections.Counter:
    text = hlo[hlo.index("\nENTRY") :] if entry_only else hlo
    ops = collections.Counter()
    for line in text.splitlines()[1:] if entry_only else text.splitlines():
        if entry_only and line.startswith("}"):
            break
        m = re.match(r"\s+(?:ROOT )?%\S+ = .*? ([a-z][a-z\-]*)\(", line)
        if m:
            ops[m.group(1)] += 1
    return ops


@pytest.fixture(scope="module")
def cpu_step_hlo():
    config = compare.get_config("cpu")
    runs = dict(sweep.run_configs(config))
    spec = from_config(next(c for name, c in runs.items() if name.startswith("gelu-")), 1)
    rs = build_run_state(spec, sharding.single_device_mesh())
    return spec, _compile_train_step(spec, rs, rs.state).as_text()


def test_cpu_preset_step_unrolls_the_layers_and_stays_on_the_device(cpu_step_hlo):
    _, hlo = cpu_step_hlo
    ops = _opcodes(hlo, entry_only=False)
    assert ops["while"] == 0, "the cpu preset's layer loop should be unrolled (scan_layers)"
    assert not any(ops[o] for o in HOST_OPS), {o: ops[o] for o in HOST_OPS}
    assert "callback" not in hlo  # no host callbacks (debug prints, io_callback)


def test_cpu_preset_step_has_exactly_the_architectures_matmuls(cpu_step_hlo):
    spec, hlo = cpu_step_hlo
    # Forward per layer: q, k, v, scores, scores @ v, output, w1, w2; then the unembedding.
    forward = 8 * spec.model.n_layers + 1
    assert _opcodes(hlo, entry_only=False)["dot"] == 3 * forward


def test_cpu_preset_step_gains_no_fusions(cpu_step_hlo):
    _, hlo = cpu_step_hlo
    fusions = _opcodes(hlo, entry_only=True)["fusion"]
    assert fusions <= FUSIONS_MEASURED * 1.05, (fusions, FUSIONS_MEASURED)
