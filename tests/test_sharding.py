"""Sharded evaluation on 8 simulated CPU devices equals the single-device results."""

import jax
import numpy as np
import pytest

from acdc_jax.methods import Problem
from acdc_jax.methods.eap import gate_gradients
from acdc_jax.sharding import evaluate_configs, gate_gradient, make_mesh, shard_problem

from .planted import planted_model, planted_task

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _problem(ablation):
    return Problem.build(planted_model(), planted_task(n_prompts=8, ablation=ablation), metric="kl")


@pytest.mark.parametrize("ablation", ["corrupt", "zero"])
def test_configuration_sharding_is_bit_identical_to_one_device(ablation):
    """8 devices x 2 configurations run the very computation one device runs in chunks of 2."""
    problem = _problem(ablation)
    gates = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (21, problem.graph.n_gates)))
    sharded = evaluate_configs(problem, gates, make_mesh(configs=8), chunk_per_device=2)
    one_device = evaluate_configs(problem, gates, make_mesh(devices=jax.devices()[:1]), chunk_per_device=2)
    np.testing.assert_array_equal(sharded, one_device)
    # and both agree with a plain loop of single evaluations (a vmap of another width: float tolerance)
    single = np.array([problem.evaluate(g) for g in gates])
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-7)


def test_prompt_and_configuration_sharding_together():
    problem = _problem("corrupt")
    gates = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (10, problem.graph.n_gates)))
    single = np.array([problem.evaluate(g) for g in gates])
    both = evaluate_configs(problem, gates, make_mesh(configs=2, prompts=4))
    np.testing.assert_allclose(both, single, rtol=1e-5, atol=1e-7)
    placed = shard_problem(problem, make_mesh(configs=2, prompts=4))
    assert placed.run.tokens.sharding.spec == jax.sharding.PartitionSpec("prompts")


def test_data_parallel_gradient_equals_single_device():
    problem = _problem("corrupt")
    gates = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (problem.graph.n_gates,)))
    single = np.asarray(jax.jit(jax.grad(lambda g: _problem("corrupt").value(g)))(gates))
    mesh = make_mesh(configs=1, prompts=4, model=2)  # prompts and weights (heads, MLP width) split
    sharded = gate_gradient(problem, gates, mesh)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-7)
    # the gradient methods' vmapped pullback, whose backward XLA mis-partitions unless the head
    # outputs are gathered before the sources buffer
    split = shard_problem(problem, mesh)
    assert split.model.blocks.attn.W_O.sharding.spec == jax.sharding.PartitionSpec(None, "model", None, None)
    np.testing.assert_allclose(gate_gradients(split, gates[None])[0], single, rtol=1e-5, atol=1e-7)


def test_mesh_and_batch_errors_are_clear():
    with pytest.raises(ValueError, match="needs 12 devices, 8 are given"):
        make_mesh(configs=4, prompts=3)
    problem = Problem.build(planted_model(), planted_task(n_prompts=6), metric="kl")
    with pytest.raises(ValueError, match="6 prompts cannot be split evenly over 4 devices"):
        shard_problem(problem, make_mesh(configs=2, prompts=4))
