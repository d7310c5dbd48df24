"""bf16 activations: the gated run and ACDC work on ``model.astype(jnp.bfloat16)`` with float32 metrics.

How much bf16 changes metrics and circuits is measured by ``benchmarks/precision.py``; here we check
the plumbing: metrics stay float32 (ACDC compares float32 losses, not bf16-rounded ones), no silent
downcasts, and on the trained induction model the bf16 circuit equals the fp32 one.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax import acdc
from acdc_jax.methods import Problem


@pytest.fixture(scope="module")
def induction():
    return aj.load_model("induction"), aj.get_task("induction")


def test_bf16_gated_run_keeps_metrics_in_float32(induction):
    model, task = induction
    fp32 = Problem.build(model, task)
    bf16 = Problem.build(model.astype(jnp.bfloat16), task)
    assert bf16.model.dtype == jnp.bfloat16
    ones = bf16.graph.gates(1.0)
    value = bf16.value(ones)
    assert value.dtype == jnp.float32
    logits = bf16.run.logits(ones)
    # bf16 has an 8-bit mantissa: relative rounding 2^-8 per operation
    np.testing.assert_allclose(np.asarray(logits, np.float32), fp32.run.logits(ones), atol=0.5, rtol=0)
    assert abs(float(value) - float(fp32.value(ones))) < 0.05 * abs(float(fp32.value(ones))) + 0.01


@pytest.mark.filterwarnings("error::FutureWarning")
def test_bf16_acdc_compares_float32_losses_and_finds_the_fp32_circuit(induction):
    model, task = induction
    threshold = 0.05
    fp32 = acdc(Problem.build(model, task, metric="kl"), threshold=threshold)
    bf16 = acdc(Problem.build(model.astype(jnp.bfloat16), task, metric="kl"), threshold=threshold)
    # scores are differences of float32 losses; bf16-rounded losses would make every score a bf16 number
    as_bf16 = np.asarray(jnp.asarray(bf16.scores, jnp.bfloat16), np.float64)
    assert np.any(as_bf16 != bf16.scores)
    assert set(bf16.kept) == set(fp32.kept)
