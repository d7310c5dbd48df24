"""Learned masks: recovery of the planted circuit, determinism, the target-sparsity constraint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax import evaluate as ev
from acdc_jax.methods import get_method
from acdc_jax.methods.learned_mask import (
    BETA,
    GAMMA,
    ZETA,
    learned_mask,
    _train_step,
    hard_concrete_deterministic,
    hard_concrete_sample,
    prob_nonzero,
)

from .planted import PLANTED_EDGES, PLANTED_NODES, planted_problem, planted_task


@pytest.fixture(scope="module")
def problem():
    return planted_problem()  # zero ablation, KL to the clean model


@pytest.fixture(scope="module")
def default_run(problem):
    return learned_mask(problem, seed=0)


def test_hard_concrete_distribution():
    log_alpha = jnp.array([-2.0, 0.0, 1.5])
    u = jax.random.uniform(jax.random.PRNGKey(0), (200_000, 3), minval=1e-6, maxval=1 - 1e-6)
    z = jax.vmap(lambda row: hard_concrete_sample(log_alpha, row))(u)
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0  # stretched and clipped: exact 0s and 1s occur
    # P(z > 0) = P(s > -gamma / (zeta - gamma)), s the binary concrete: sigmoid(log_alpha - beta log(-gamma/zeta))
    np.testing.assert_allclose((z > 0).mean(0), prob_nonzero(log_alpha), atol=4e-3)
    expected = 1 / (1 + np.exp(-(np.asarray(log_alpha) - BETA * np.log(-GAMMA / ZETA))))
    np.testing.assert_allclose(prob_nonzero(log_alpha), expected, rtol=1e-6)
    # sigmoid(log_alpha) * (zeta - gamma) + gamma, clipped: 1/2 at log_alpha = 0
    np.testing.assert_allclose(hard_concrete_deterministic(jnp.array([-5.0, 0.0, 5.0])), [0.0, 0.5, 1.0], atol=1e-6)


def test_recovers_the_planted_circuit(problem, default_run):
    circuit = default_run
    assert set(circuit.kept) == set(PLANTED_EDGES)
    assert circuit.metric_value == pytest.approx(0.0, abs=1e-6)  # the circuit is exact under zero ablation
    assert ev.roc_curve(circuit, planted_task()).auc == 1.0
    assert (circuit.scores > 0).sum() == len(PLANTED_EDGES)  # scores are the logits; threshold at 0
    # the expected density ended near the planted fraction (7 of 46 edges)
    assert circuit.extra["expected_density"] == pytest.approx(7 / problem.graph.n_gates, abs=0.01)


def test_deterministic_given_the_seed(problem, default_run):
    again = learned_mask(problem, seed=0)
    np.testing.assert_array_equal(again.scores, default_run.scores)
    assert again.kept == default_run.kept
    other = learned_mask(problem, seed=1)
    assert not np.array_equal(other.scores, default_run.scores)  # the seed drives the hard-concrete noise
    assert set(other.kept) == set(PLANTED_EDGES)


def test_training_step_compiles_once(problem, default_run):
    size = _train_step._cached._cache_size()
    learned_mask(problem, steps=20, seed=3, lr=0.05, l0_weight=0.3)
    learned_mask(problem, steps=20, target_sparsity=0.5, warmup=0.2, lagrangian_lr=0.1)
    assert _train_step._cached._cache_size() == size  # other numbers, same compiled step


def test_target_sparsity_lands_on_target(problem):
    """With no fixed penalty the Lagrangian holds the density at the target: 70% of edges removed
    (more than the junk edges alone would need, so the constraint, not the KL, sets the count)."""
    circuit = learned_mask(problem, target_sparsity=0.7, l0_weight=0.0, discretize="expected_l0", seed=0)
    n = problem.graph.n_gates
    assert circuit.extra["expected_density"] == pytest.approx(0.3, abs=0.01)
    assert abs(circuit.n_kept - round(0.3 * n)) <= 1
    assert set(PLANTED_EDGES) <= set(circuit.kept)
    history = circuit.extra["history"]
    assert history[-1]["target_density"] == pytest.approx(0.3)


def test_node_level_recovers_the_planted_nodes():
    circuit = get_method("learned-mask-nodes").fn(planted_problem(level="node"), seed=0)
    assert set(circuit.kept) == set(PLANTED_NODES)
    assert circuit.metric_value == pytest.approx(0.0, abs=1e-6)


def test_sigmoid_masks_rank_the_planted_edges_first(problem):
    """Continuous sigmoid gates find the circuit in their ranking (AUC 1), but the discretised
    set can lose edges whose gate the model tolerates partly open."""
    circuit = learned_mask(problem, parametrization="sigmoid", seed=0)
    assert ev.roc_curve(circuit, planted_task()).auc == 1.0
    assert set(circuit.kept) <= set(PLANTED_EDGES)


def test_rejects_bad_settings(problem):
    with pytest.raises(ValueError, match="fraction of units removed"):
        learned_mask(problem, target_sparsity=1.5)
    with pytest.raises(ValueError, match="parametrization"):
        learned_mask(problem, parametrization="gumbel")


def test_discover_runs_it_by_name_and_scores_it(default_run):
    from acdc_jax.methods import discover

    from .planted import planted_model

    circuit = discover(planted_model(), planted_task(), "learned-mask", seed=0)
    assert circuit.method == "learned-mask"
    np.testing.assert_array_equal(circuit.scores, default_run.scores)  # same problem, same seed
    assert circuit.extra["auc"] == 1.0 and circuit.extra["precision"] == 1.0 and circuit.extra["recall"] == 1.0
