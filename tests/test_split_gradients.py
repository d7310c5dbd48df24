"""Gate gradients at uniform points from one residual stream (``models.split_pullback``) equal the
gated forward's own gradients (the dense read, every input its own gate row), on every graph kind."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax.methods import Problem
from acdc_jax.methods._gradients import gate_point_logits, pullback, uniform_alphas, uniform_gate_gradients

from .conftest import TINY_CONFIGS
from .test_families import ALL_FEATURES, _all_features_task

# four layers: two loop segments; sequential (not parallel) attention and MLP, the other families' switches on
DEEP = dataclasses.replace(ALL_FEATURES, n_layers=4, sliding_window=(4, None, None, 3), parallel=False)


def _problem(config, dtype, **graph):
    model = aj.init_model(config, jax.random.PRNGKey(0), std=0.5).astype(dtype)
    task = _all_features_task(n_prompts=3)
    task = dataclasses.replace(task, clean=task.clean % config.d_vocab, corrupt=task.corrupt % config.d_vocab,
                               answers=task.answers % config.d_vocab, wrong_answers=task.wrong_answers % config.d_vocab)
    return Problem.build(model, task, **graph)


def _dense_gradient(problem, points):
    aux = {"gates": points, "shared_rows": False}
    return np.asarray(pullback(problem, gate_point_logits, n_points=1, weights=np.ones(1), aux=aux,
                               shared=jnp.zeros_like(points))[1][0])


# each case is one compiled pair of programs (about 5-15 s); the combinations are spread over the graph kinds
# (alpha, per_position, chunk_size): gates 1, a point inside (0, 1) with chunking, 0 per position
@pytest.mark.parametrize("config, graph, alpha, per_position, chunk", [
    (DEEP, {}, 0.4, False, 2), (DEEP, {"qkv_split": False}, 1.0, True, None),
    (DEEP, {"kv_groups": True}, 0.7, False, None), (DEEP, {"level": "node"}, 0.0, True, 2),
    (ALL_FEATURES, {"internal_edges": True}, 1.0, True, 2),
])
def test_uniform_points_equal_the_gated_gradient(config, graph, alpha, per_position, chunk):
    with jax.enable_x64(True):
        problem = _problem(config, jnp.float64, **graph)
        n_gates, n_pos = problem.graph.n_gates, problem.run.tokens.shape[1]
        points = jnp.full((1, n_pos, n_gates) if per_position else (1, n_gates), alpha, jnp.float64)
        alphas = uniform_alphas(problem.graph, points)
        assert alphas is not None and alphas[0] == alpha
        expected = _dense_gradient(problem, points)
        got = uniform_gate_gradients(problem, alphas, per_position=per_position, chunk_size=chunk)[0]
        assert np.abs(expected).max() > 1e-3  # the gradients are not trivially zero
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
        if graph.get("internal_edges"):  # internal gates multiply (alpha^2 on a path): only 0 and 1 are uniform
            assert uniform_alphas(problem.graph, jnp.full_like(points, 0.5)) is None


def test_float32_and_what_eap_computes():
    config = dataclasses.replace(TINY_CONFIGS["gpt2-like"], n_layers=3, d_model=48, d_head=16, d_mlp=96)
    problem = _problem(config, jnp.float32)
    ones = problem.graph.gates(1.0, jnp.float32)[None]
    expected = _dense_gradient(problem, ones)
    scores = aj.eap(problem).scores  # the uniform path: -gradient at all gates 1
    np.testing.assert_allclose(scores, -expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_points_that_are_not_uniform_keep_the_gated_forward():
    problem = _problem(DEEP, jnp.float32)
    gates = np.ones((1, problem.graph.n_gates), np.float32)
    gates[0, 5] = 0.0
    assert uniform_alphas(problem.graph, gates) is None
    assert uniform_alphas(problem.graph, np.stack([gates[0] * 0 + 1, gates[0] * 0 + 0.5])) is not None


@pytest.mark.parametrize("kind", ["layer", "rms", "gemma_rms", "none"])
def test_the_shared_norm_vjp_is_the_norms_vjp(kind):
    from acdc_jax.models._split import shared_norm_vjp
    from acdc_jax.models._transformer import LayerNorm, _norm
    rng = np.random.RandomState(0)
    config = dataclasses.replace(TINY_CONFIGS["gpt2-like"], normalization="gemma_rms" if kind == "gemma_rms" else "ln")
    d = config.d_model
    with jax.enable_x64(True):
        ln = None if kind == "none" else LayerNorm(w=jnp.asarray(1 + 0.3 * rng.randn(d)),
                                                   b=jnp.asarray(rng.randn(d)) if kind == "layer" else None)
        x, cts = jnp.asarray(2 + 3 * rng.randn(2, 3, d)), jnp.asarray(rng.randn(5, 2, 3, d))
        _, vjp = jax.vjp(lambda r: _norm(config, ln, r), x)
        expected = np.stack([vjp(c)[0] for c in cts])
        np.testing.assert_allclose(shared_norm_vjp(config, ln, x, cts), expected, rtol=1e-12, atol=1e-12)


def test_atp_star_from_the_split_path_equals_the_gated_probes(monkeypatch):
    """AtP* with GradDrop and the QK fix: the one-residual pullbacks (one per dropped layer, pattern
    probes) give the gated forward's estimates."""
    from acdc_jax.methods import atp_star as atp_module
    with jax.enable_x64(True):
        problem = _problem(ALL_FEATURES, jnp.float64)
        split = atp_module.atp_estimates(problem, chunk_size=2)
        monkeypatch.setattr(atp_module, "uniform_alphas", lambda graph, points: None)  # force the gated forward
        gated = atp_module.atp_estimates(problem, chunk_size=2)
    assert split.shape == (1 + ALL_FEATURES.n_layers, problem.graph.n_gates) and np.abs(gated).max() > 1e-3
    np.testing.assert_allclose(split, gated, rtol=0, atol=1e-12 * np.abs(gated).max())


def test_per_prompt_gradients_from_the_split_path_equal_the_gated_ones(monkeypatch):
    """HISP's per-prompt shares (``per_row``), chunked, on the model with every switch on: the split
    path gives what the gated forward's per-configuration pullback gives."""
    from acdc_jax.methods import hisp as hisp_module
    with jax.enable_x64(True):
        problem = _problem(DEEP, jnp.float64)
        ones = problem.graph.gates(1.0, jnp.float64)
        split = hisp_module.per_prompt_gate_gradients(problem, ones, chunk_size=2)
        monkeypatch.setattr(hisp_module, "uniform_alphas", lambda graph, points: None)  # force the gated forward
        gated = hisp_module.per_prompt_gate_gradients(problem, ones, chunk_size=2)
    assert split.shape == (problem.run.tokens.shape[0], problem.graph.n_gates) and np.abs(gated).max() > 1e-3
    assert np.abs(gated[0] - gated[1]).max() > 1e-3  # the prompts' shares differ
    np.testing.assert_allclose(split, gated, rtol=0, atol=1e-12 * np.abs(gated).max())
