"""Gradients through recomputed layers (``remat``) equal the plain backward pass, in float64."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax.methods import Problem
from acdc_jax.methods._gradients import with_auto_remat
from acdc_jax.models import Probes, gated_forward
from acdc_jax.models._transformer import layer_segments
from acdc_jax.patching import backward_forwards, remat_pays

from .test_families import ALL_FEATURES, _all_features_task

# four layers: two loop segments (layer_segments), so the backward crosses a segment boundary
DEEP = dataclasses.replace(ALL_FEATURES, n_layers=4, sliding_window=(4, None, None, 3))


def _problem(config, dtype=jnp.float64):
    model = aj.init_model(config, jax.random.PRNGKey(0), std=0.5).astype(dtype)
    return Problem.build(model, _all_features_task(n_prompts=3))


def test_remat_gradients_equal_the_scan_on_every_input():
    assert len(layer_segments(DEEP.n_layers)) == 2
    with jax.enable_x64(True):
        problem = _problem(DEEP)
        run, graph = problem.run, problem.graph
        n_pos = run.tokens.shape[1]
        key = jax.random.split(jax.random.PRNGKey(1), 3)
        # per-position gates: shared rows need equal rows per layer, so one value per position
        gates = jax.random.uniform(key[0], (n_pos, graph.n_gates), jnp.float64)
        ghost = jnp.zeros((n_pos, graph.n_gates), jnp.float64)
        ghost_deltas = jax.random.normal(key[1], (DEEP.n_sources,) + run.tokens.shape + (DEEP.d_model,), jnp.float64)
        offset = jnp.zeros((DEEP.n_layers, DEEP.n_heads, run.tokens.shape[0], n_pos, n_pos), jnp.float64)

        def loss(gates, ghost, offset, scale, model, remat):
            probes = Probes(ghost=graph.dense(ghost), ghost_deltas=ghost_deltas, pattern_offset=offset,
                            embed_scale=scale, drop_layer=jnp.int32(1))
            logits = gated_forward(model, graph.dense(gates), run.ablation, run.tokens, positions=run.positions,
                                   probes=probes, remat=remat)
            return jnp.sum(jnp.sin(logits))

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=5)
        plain, remat = grad(gates, ghost, offset, 1.0, run.model, False), grad(gates, ghost, offset, 1.0, run.model, True)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * max(1.0, float(jnp.abs(a).max())))
        assert float(jnp.abs(plain[1][0]).max()) > 0 and float(jnp.abs(plain[1][2]).max()) > 0  # gradients do flow


def test_remat_needs_a_static_start_layer():
    problem = _problem(ALL_FEATURES, jnp.float32)
    run = problem.run
    with pytest.raises(ValueError, match="remat needs a Python int start_layer"):
        gated_forward(run.model, run.graph.dense(run.graph.gates()), run.ablation, run.tokens,
                      start_layer=jnp.int32(0), remat=True)


def test_methods_give_the_same_scores_with_remat(monkeypatch):
    from acdc_jax.methods import atp_star as atp_module
    from acdc_jax.methods.eap import gate_gradients
    with jax.enable_x64(True):
        problem = _problem(DEEP)
        # gradients at points that are not uniform: the chunked gated pullback every gradient method shares
        points = np.random.RandomState(0).uniform(size=(2, problem.graph.n_gates))
        plain = gate_gradients(problem.with_remat(False), points, chunk_size=4)
        remat = gate_gradients(problem.with_remat(True), points, chunk_size=4)
        np.testing.assert_allclose(remat, plain, rtol=0, atol=1e-12 * np.abs(plain).max())
        # AtP* on the gated forward: GradDrop's layer is vmapped over points, pattern probes per config
        monkeypatch.setattr(atp_module, "uniform_alphas", lambda graph, points: None)
        plain = atp_module.atp_estimates(problem.with_remat(False), chunk_size=4)
        remat = atp_module.atp_estimates(problem.with_remat(True), chunk_size=4)
        np.testing.assert_allclose(remat, plain, rtol=0, atol=1e-12 * np.abs(plain).max())


def test_the_methods_turn_remat_on_when_memory_binds(monkeypatch):
    deep = dataclasses.replace(DEEP, n_layers=8, sliding_window=None)
    assert remat_pays(8) and not remat_pays(2)
    assert backward_forwards(8, True) < backward_forwards(8, False)
    problem = _problem(deep, jnp.float32)
    assert with_auto_remat(problem, 3).run.remat is False  # everything fits: the plain backward
    assert with_auto_remat(problem.with_remat(True), 3).run.remat is True  # as set
    monkeypatch.setattr("acdc_jax.methods._gradients.device_memory_bytes", lambda: 1)
    assert with_auto_remat(problem, 3).run.remat is True  # chunked: recompute
    assert with_auto_remat(problem, None).run.remat is False  # a fixed chunk: as set (None: off)
    assert with_auto_remat(_problem(ALL_FEATURES, jnp.float32), 3).run.remat is False  # two layers: recomputing keeps more
