"""Gradient methods (EAP, EAP-IG, AtP*, HISP, wrong-answer gradients) against exact numbers.

Float64 where precision is the question. Problems are built once (cached) and float64 ones are
only used inside ``enable_x64``; tests share problems so that they share compilations (a gate
gradient of even a tiny model takes seconds to compile on a CPU).
"""

import functools
import warnings

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax.evaluate import roc_auc
from acdc_jax.methods import Problem, discover, get_method, method_names, rank_agreement, split_half_stability
from acdc_jax.methods._gradients import computation, exact_unit_effects, gate_point_logits, pullback, run_probed
from acdc_jax.methods.atp_star import atp_estimates, graddrop_scores
from acdc_jax.methods.eap import eap, gate_gradients
from acdc_jax.methods.eap_ig import eap_ig, input_path_gradients, quadrature
from acdc_jax.methods.hisp import hisp, per_prompt_gate_gradients
from acdc_jax.methods.wrong_answer import node_weight_scores, weight_gradients
from acdc_jax.metrics import MetricInputs, get_metric, wrong_answer_loss
from acdc_jax.models import Ablation, build_model, expected_shapes, forward
from acdc_jax.tasks import Task, get_task

from .conftest import TINY_CONFIGS
from .planted import PLANTED_EDGES, planted_model, planted_task

GRADIENT_METHODS = ("eap", "eap-nodes", "eap-ig", "eap-ig-inputs", "atp-star", "hisp", "wrong-answer", "exact-patching")


def _toy_task(model, metric="nll", n_prompts=4, seed=0):
    cfg = model.config
    rng = np.random.RandomState(seed)
    n_pos = cfg.n_ctx - 1
    answers = rng.randint(0, cfg.d_vocab_out, (n_prompts, 1))
    return Task(
        name="toy",
        clean=rng.randint(0, cfg.d_vocab, (n_prompts, n_pos)),
        corrupt=rng.randint(0, cfg.d_vocab, (n_prompts, n_pos)),
        positions=np.full((n_prompts, 1), n_pos - 1),
        metric=metric,
        answers=answers,
        wrong_answers=(answers + 1 + rng.randint(0, cfg.d_vocab_out - 1, (n_prompts, 1))) % cfg.d_vocab_out,
    )


def _random_model(cfg, seed, std):
    """Normal(0, std) weights, LayerNorm scales near 1, drawn with numpy (``init_model`` compiles a
    random kernel per shape and dtype, which costs seconds), in float64."""
    rng = np.random.RandomState(seed)
    arrays = {
        name: 1.0 + 0.1 * rng.randn(*shape) if name.endswith(("ln1.w", "ln2.w", "ln_final.w")) else std * rng.randn(*shape)
        for name, shape in expected_shapes(cfg).items()
    }
    return build_model(cfg, arrays, dtype=jnp.float64)


@functools.lru_cache(maxsize=None)
def _toy_problem():
    """The gpt2-like tiny model (LayerNorm, GELU MLPs), float64, nll: nonlinear in every gate."""
    model = _random_model(TINY_CONFIGS["gpt2-like"], 0, 0.3)
    return Problem.build(model, _toy_task(model), metric="nll", ablation="corrupt")


def _attention_only(n_layers, frozen_patterns=False, silent_layer=None):
    """Attention only, no LayerNorm. ``frozen_patterns``: W_Q = W_K = 0 (uniform attention);
    ``silent_layer``: that layer's heads write nothing (W_O = 0)."""
    cfg = aj.TransformerConfig(
        n_layers=n_layers, n_heads=2, d_model=8, d_head=4, d_vocab=11, n_ctx=6, normalization=None, tied_unembed=False,
    )
    model = _random_model(cfg, 1, 1.0)
    attn = model.blocks.attn
    if frozen_patterns:
        model = eqx.tree_at(lambda m: (m.blocks.attn.W_Q, m.blocks.attn.W_K), model,
                            (jnp.zeros_like(attn.W_Q), jnp.zeros_like(attn.W_K)))
    if silent_layer is not None:
        model = eqx.tree_at(lambda m: m.blocks.attn.W_O, model, attn.W_O.at[silent_layer].set(0.0))
    return model


@functools.lru_cache(maxsize=None)
def _linear_problem(n_layers=1, frozen_patterns=False, silent_layer=None, level="edge"):
    """Float64, logit_diff, corrupted inputs: with no LayerNorm the metric is affine in the gates into
    ``logits`` (the others held), and with one layer also in those into ``v`` inputs."""
    model = _attention_only(n_layers, frozen_patterns, silent_layer)
    return Problem.build(model, _toy_task(model, "logit_diff", seed=1), metric="logit_diff", ablation="corrupt", level=level)


@functools.lru_cache(maxsize=None)
def _planted_problem():
    return Problem.build(planted_model(), planted_task(ablation="zero", metric="logit_diff"), metric="logit_diff")


def _loss(problem, gates) -> float:
    """``Metric.loss`` of one gating, jitted (labels stripped, so problems differing only in them share it)."""
    value = computation(problem).evaluate(gates)
    return -value if problem.metric.higher_is_better else value


def _into(graph, suffixes):
    return np.array([aj.Graph.split_edge(e)[1].endswith(suffixes) for e in graph.edges])


# --------------------------------------------------------------------------------------------
# EAP


def test_eap_equals_central_differences_edge_by_edge():
    """EAP (through the methods' probed forward) against central differences of the gated metric
    (through ``gated_forward``); with no probes the two forwards agree at any gates."""
    with jax.enable_x64(True):
        problem = _toy_problem()
        gates = jnp.asarray(np.random.RandomState(0).uniform(size=problem.graph.n_gates))
        np.testing.assert_allclose(jax.jit(run_probed)(problem.run, gates), problem.run(gates), rtol=1e-12, atol=1e-12)
        scores = eap(problem).scores
        eps = 1e-5
        up = exact_unit_effects(problem, value=1.0 + eps)  # loss(g_i = 1 + eps) - loss(all 1)
        down = exact_unit_effects(problem, value=1.0 - eps)
    # score = -(d loss / d g): removing the edge (g: 1 -> 0) raises the loss by about -d loss / d g
    np.testing.assert_allclose(scores, -(up - down) / (2 * eps), rtol=1e-6, atol=1e-9)
    assert np.abs(scores).max() > 1e-2


def test_shared_row_read_gives_the_dense_reads_gradients():
    """At all gates 1 the probed forward reads one residual per layer (``shared_rows``); its gate
    gradients equal the dense read's, where every input sums its sources on its own (edge and node
    graphs; GQA, rotary, parallel blocks), at every point where the rows are shared, and the check
    refuses points where they are not. (EAP's float64 finite-difference test above runs the shared
    path on the LayerNorm model.)"""
    from acdc_jax.methods._gradients import shares_rows
    from acdc_jax.models import gated_forward
    from acdc_jax.patching import graph_reads

    cfg = aj.TransformerConfig(n_layers=2, n_heads=4, n_kv_heads=2, d_model=16, d_head=4, d_mlp=24, d_vocab=29, n_ctx=9,
                               normalization="rms", positional="rotary", gated_mlp=True, act_fn="silu", parallel=True,
                               tied_unembed=False)
    with jax.enable_x64(True):
        model = _random_model(cfg, 2, 0.3)
        task = _toy_task(model, "logit_diff", seed=3)
        problem = Problem.build(model, task, metric="logit_diff", ablation="corrupt")
        graph = problem.graph
        ones = graph.gates(1.0, jnp.float64)
        points = jnp.stack([ones, 0.5 * ones])
        assert shares_rows(graph, points)
        grads = []
        for flag in (False, True):
            aux = {"gates": points, "shared_rows": flag}
            grads.append(np.asarray(pullback(problem, gate_point_logits, n_points=2, weights=jnp.ones(2), aux=aux,
                                             shared=jnp.zeros_like(points))[1]))
        np.testing.assert_allclose(grads[1], grads[0], rtol=1e-12, atol=1e-14 * np.abs(grads[0]).max())
        assert np.abs(grads[0]).max() > 1e-2
        # some inputs of a layer lose an edge the others keep: the rows differ, the dense read is used
        some = np.ones(graph.n_gates)
        some[graph.index("embed->a0.0.q")] = 0.0
        assert not shares_rows(graph, some)

        # node gates, any values: every row of a layer is the same, and reading one residual per layer
        # (one LayerNorm, wide projections) gives the dense read's logits and node-gate gradients
        nodes = Problem.build(model, task, metric="logit_diff", ablation="corrupt", level="node")
        run = nodes.run
        gates = jnp.asarray(np.random.RandomState(4).uniform(size=(nodes.graph.n_gates,)))
        assert shares_rows(nodes.graph, gates) and graph_reads(nodes.graph) == "single"

        def loss(g, reads):
            logits = gated_forward(run.model, nodes.graph.dense(g), run.ablation, run.tokens, positions=run.positions,
                                   reads=reads)
            return (logits ** 2).sum(), logits

        (_, dense), g_dense = jax.value_and_grad(loss, has_aux=True)(gates, "dense")
        (_, single), g_single = jax.value_and_grad(loss, has_aux=True)(gates, "single")
        np.testing.assert_allclose(single, dense, rtol=1e-12, atol=1e-12 * np.abs(dense).max())
        np.testing.assert_allclose(g_single, g_dense, rtol=1e-11, atol=1e-12 * np.abs(g_dense).max())


def test_eap_is_exact_where_the_model_is_linear_in_the_gates():
    with jax.enable_x64(True):
        problem = _linear_problem()
        graph = problem.graph
        exact = exact_unit_effects(problem)
        scores = eap(problem).scores
        into_logits = _into(graph, ("logits",))
        # integrating only the gates into logits (the others held at 1): the gradient is constant on the path
        along_logits = -gate_gradients(problem, np.where(into_logits, 0.5, 1.0)[None])[0]
    linear = _into(graph, ("logits", ".v"))
    np.testing.assert_allclose(scores[linear], exact[linear], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(along_logits[into_logits], scores[into_logits], rtol=1e-12, atol=1e-12)
    assert np.abs(exact[linear]).max() > 0.1
    assert np.abs(scores[~linear] - exact[~linear]).max() > 0.1  # through the softmax it is not linear


def test_eap_warns_where_the_gradient_vanishes():
    with jax.enable_x64(True):
        problem = _linear_problem().with_metric(get_metric("kl"))
        with pytest.warns(UserWarning, match="minimum"):
            circuit = eap(problem)
    assert np.abs(circuit.scores).max() < 1e-12  # KL is at its minimum: zero up to float64 rounding


# --------------------------------------------------------------------------------------------
# EAP-IG


def test_eap_ig_one_midpoint_step_is_the_gradient_at_one_half():
    """``eap_ig(steps=1)`` is -(d loss / d g) at all gates 1/2, exactly. Where the loss is quadratic
    along the gate path (frozen attention patterns, no LayerNorm, logit_diff: every residual term
    is a gate times a source that is linear in its own input gates) the midpoint rule is exact, so
    one step already satisfies completeness."""
    with jax.enable_x64(True):
        problem = _toy_problem()
        one_step = eap_ig(problem, steps=1)
        half = -gate_gradients(problem, problem.graph.gates(0.5, jnp.float64)[None])[0]
        frozen = eap_ig(_linear_problem(frozen_patterns=True), steps=1).extra["completeness"]
    np.testing.assert_allclose(one_step.scores, half, rtol=1e-12, atol=1e-14)
    assert abs(one_step.extra["completeness"]["error"]) > 1e-3  # LayerNorm and GELU: not quadratic
    assert abs(frozen["expected"]) > 0.1
    np.testing.assert_allclose(frozen["score_sum"], frozen["expected"], rtol=1e-10)


STEP_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def _midpoint_union():
    """The midpoint nodes of every step count, evaluated in one batch of gradients."""
    nodes = [quadrature(m, "midpoint") for m in STEP_COUNTS]
    return np.concatenate([a for a, _ in nodes]), nodes


def test_eap_ig_completeness_error_shrinks_with_steps():
    """Gates path: the scores sum to loss(all gates 0) - loss(all gates 1) up to the quadrature error.
    Inputs path: the edges out of ``embed`` sum to loss(ablated embedding) - loss(clean), which with
    corrupted-input ablation is the same number. The error must fall as the midpoint rule's does: it
    is second order, so two doublings of the steps divide it by about 16 once the steps resolve the
    integrand (a first-order rule would manage 4); how close a given number of steps gets depends on
    the model's curvature, so the error at 64 steps is printed, not held to a level."""
    with jax.enable_x64(True):
        problem = _linear_problem()
        graph = problem.graph
        alphas, nodes = _midpoint_union()
        target = _loss(problem, graph.gates(0.0, jnp.float64)) - _loss(problem, graph.gates(1.0, jnp.float64))
        grads = gate_gradients(problem, alphas[:, None] * np.ones((1, graph.n_gates)))
        input_grads = input_path_gradients(problem, alphas)
    from_embed = np.array([e.startswith("embed->") for e in graph.edges])
    offsets = np.cumsum([0] + [len(a) for a, _ in nodes])
    gate_errors, input_errors = [], []
    for (_, weights), lo, hi in zip(nodes, offsets[:-1], offsets[1:]):
        gate_errors.append(abs(-(weights @ grads[lo:hi]).sum() - target))
        input_errors.append(abs(-(weights @ input_grads[lo:hi])[from_embed].sum() - target))
    print(f"\ncompleteness |error| by midpoint steps (target {target:.4f}): gates "
          + ", ".join(f"{m}: {e:.1e}" for m, e in zip(STEP_COUNTS, gate_errors))
          + "; inputs " + ", ".join(f"{m}: {e:.1e}" for m, e in zip(STEP_COUNTS, input_errors)))
    assert abs(target) > 0.1
    for errors in (gate_errors, input_errors):
        assert all(b < a for a, b in zip(errors[2:], errors[3:]))  # shrinking, from 4 steps on
        assert errors[-1] < errors[-3] / 8  # 16 -> 64 steps: better than first order


def test_quadrature_rules():
    for rule in ("midpoint", "left", "trapezoid"):
        for m in (1, 3, 8):
            alphas, weights = quadrature(m, rule)
            assert np.isclose(weights.sum(), 1.0) and alphas.min() >= 0 and alphas.max() <= 1
            # midpoint and trapezoid integrate linear integrands exactly; the left sum is off by 1/(2m)
            assert np.isclose(weights @ alphas, 0.5 - (0.5 / m if rule == "left" else 0.0))
    np.testing.assert_allclose(quadrature(1)[0], [0.5])
    np.testing.assert_allclose(quadrature(4, "left")[0], [0, 0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="quadrature rule"):
        quadrature(4, "simpson")


# --------------------------------------------------------------------------------------------
# Chunking and tracing


def test_chunked_equals_unchunked():
    """Chunks of (point, prompt) configurations, the last one padded, pulled back separately."""
    with jax.enable_x64(True):
        problem = _linear_problem()
        alphas, _ = _midpoint_union()
        points = alphas[:, None] * np.ones((1, problem.graph.n_gates))
        whole = gate_gradients(problem, points)
        chunked = gate_gradients(problem, points, chunk_size=200)  # 508 configurations: 200 + 200 + 108 padded
        # per-configuration probes (attention patterns) and the QK fix's chunked sum over prompts
        atp_whole = atp_estimates(problem)
        atp_chunked = atp_estimates(problem, chunk_size=3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(atp_chunked, atp_whole, rtol=1e-10, atol=1e-12)


def test_changing_gate_values_does_not_retrace(monkeypatch):
    with jax.enable_x64(True):
        problem = _linear_problem()
        chex.clear_trace_counter()
        counted = chex.assert_max_traces(gate_point_logits, n=1)
        for value in (1.0, 0.5, 0.0):
            gates = problem.graph.gates(value, jnp.float64)[None]
            aux = {"gates": gates, "shared_rows": True}  # uniform gates: every input of a layer reads the same row
            pullback(problem, counted, n_points=1, weights=jnp.ones(1), aux=aux, shared=jnp.zeros_like(gates))
        # EAP at either end and one-step EAP-IG reuse that compilation
        monkeypatch.setattr(aj.methods.eap, "gate_point_logits", counted)
        eap(problem)
        eap(problem, point="corrupted")
        eap_ig(problem, steps=1)


# --------------------------------------------------------------------------------------------
# AtP*


def test_atp_star_is_exact_where_the_model_is_linear_after_the_softmax():
    """One attention layer, no LayerNorm, logit_diff: the metric is linear in every head's pattern,
    so the QK fix (exact softmax, linear after it) gives the exact effect of every q/k edge."""
    with jax.enable_x64(True):
        problem = _linear_problem()
        exact = exact_unit_effects(problem)
        atp = atp_estimates(problem)[0]
        plain = eap(problem).extra["signed"]
    qk = _into(problem.graph, (".q", ".k"))
    print(f"\n1-layer linear-after-softmax model, q/k edges: mean |EAP - exact| {np.abs(plain - exact)[qk].mean():.3f}, "
          f"mean |AtP* - exact| {np.abs(atp - exact)[qk].mean():.1e}")
    np.testing.assert_allclose(atp, exact, rtol=1e-9, atol=1e-9)
    assert np.abs(plain - exact)[qk].mean() > 0.1


def test_atp_star_recovers_saturated_heads_that_eap_misses():
    """The planted heads attend with a saturated softmax: EAP's gradient through the induction head's
    q/k inputs is ~0 although ablating them changes the answer. The QK fix computes the pattern
    change exactly (and logit_diff is linear after it): exact for those edges, never worse than EAP.
    The previous-token head's q/k edges act only through the saturated induction head, which no
    gradient sees: both estimate 0 there."""
    problem = _planted_problem()
    layer1_qk = problem.graph.indices(["embed->a1.0.q", "a0.0->a1.0.k"])
    exact = exact_unit_effects(problem)
    atp = atp_estimates(problem)[0]
    plain = eap(problem).extra["signed"]
    qk = _into(problem.graph, (".q", ".k"))
    print(f"\nplanted (zero ablation, logit_diff), q/k edges: mean |EAP - exact| {np.abs(plain - exact)[qk].mean():.3f}, "
          f"mean |AtP* - exact| {np.abs(atp - exact)[qk].mean():.3f}; induction head q/k: exact {exact[layer1_qk]}, "
          f"EAP {plain[layer1_qk]}, AtP* {atp[layer1_qk]}")
    assert np.all(exact[layer1_qk] > 1.0) and np.all(np.abs(plain[layer1_qk]) < 1e-3)
    np.testing.assert_allclose(atp[layer1_qk], exact[layer1_qk], rtol=1e-5)
    assert np.all(np.abs(atp - exact)[qk] <= np.abs(plain - exact)[qk] + 1e-5)


def test_qk_fix_pattern_effects_equal_one_edge_at_a_time_over_several_layer_segments():
    """The QK fix's table ``<A'(edge) - A, d loss / d A>`` on a 4-layer model with MLPs and LayerNorm
    (two layer segments, each projecting only the sources before its last layer) equals a plain
    float64 loop over every (prompt, layer, head, q|k, earlier source or internal edge) that builds
    the changed input, its queries or keys, and the new pattern one case at a time; the slots of
    later sources (no edges) are 0."""
    from acdc_jax.methods.atp_star import _jit_qk_fix
    from acdc_jax.models import attention_pattern, queries_keys
    from acdc_jax.models._transformer import _block_at, layer_segments
    from acdc_jax.patching import source_values

    cfg = aj.TransformerConfig(n_layers=4, n_heads=2, d_model=8, d_head=4, d_mlp=16, d_vocab=13, n_ctx=6)
    assert len(layer_segments(cfg.n_layers)) == 2
    with jax.enable_x64(True):
        model = _random_model(cfg, 3, 0.6)
        problem = Problem.build(model, _toy_task(model, "logit_diff", n_prompts=2, seed=2), metric="logit_diff",
                                ablation="corrupt")
        n_rows, n_pos = problem.run.tokens.shape
        d_pattern = jnp.asarray(np.random.RandomState(0).randn(1, n_rows, cfg.n_layers, cfg.n_heads, n_pos, n_pos))
        table = np.asarray(_jit_qk_fix(computation(problem), d_pattern, 1))[0]  # [L, H, 2, S + 1]
        clean = source_values(model, problem.run.tokens)
        ablated = problem.run.ablation
        inputs = Ablation.from_values(model, clean).base_attn  # [L, rows, pos, d]
        deltas = clean - ablated.values
        expected = np.zeros(table.shape)
        for layer in range(cfg.n_layers):
            block = _block_at(model, layer)
            n_earlier = 1 + layer * (cfg.n_heads + 1)
            for row in range(n_rows):
                x = inputs[layer, row][None]
                q, k = queries_keys(cfg, block, x, x, None, model.precision)
                pattern = attention_pattern(cfg, layer, q, k, model.precision)[:, 0]  # [H, q, k]
                changed = [x - deltas[s, row][None] for s in range(n_earlier)]
                slots = list(range(n_earlier)) + [cfg.n_sources]
                for slot, new_in in zip(slots, changed + [ablated.base_attn[layer, row][None]]):
                    q_new, k_new = queries_keys(cfg, block, new_in, new_in, None, model.precision)
                    for which, (qq, kk) in enumerate([(q_new, k), (q, k_new)]):
                        new = attention_pattern(cfg, layer, qq, kk, model.precision)[:, 0]
                        expected[layer, :, which, slot] += np.einsum(
                            "hqk,hqk->h", np.asarray(new - pattern), np.asarray(d_pattern[0, row, layer]))
    for layer in range(cfg.n_layers):
        n_earlier = 1 + layer * (cfg.n_heads + 1)
        assert np.abs(expected[layer, :, :, :n_earlier]).max() > 1e-3
    np.testing.assert_allclose(table, expected, rtol=1e-10, atol=1e-12)


def test_graddrop_drops_exactly_the_paths_through_a_layer():
    """Dropping layer 1's gradient equals attributing on the model whose layer 1 writes nothing:
    with no LayerNorm and a linear metric, the gradient elsewhere does not depend on layer 1's values."""
    with jax.enable_x64(True):
        problem = _linear_problem(n_layers=2)
        estimates = atp_estimates(problem)  # rows: plain, layer 0 dropped, layer 1 dropped
        reference = atp_estimates(_linear_problem(n_layers=2, silent_layer=1))[0]
    graph = problem.graph
    ends = [aj.Graph.split_edge(e) for e in graph.edges]
    untouched = np.array([not (src.startswith("a1.") or dst.startswith("a1.")) for src, dst in ends])
    into_0 = np.array([dst.startswith("a0.") for _, dst in ends])
    into_1 = np.array([dst.startswith("a1.") for _, dst in ends])
    np.testing.assert_allclose(estimates[2][untouched], reference[untouched], rtol=1e-9, atol=1e-10)
    assert np.abs(estimates[2] - estimates[0])[untouched].max() > 1e-2  # layer 1 did carry gradient
    np.testing.assert_array_equal(estimates[2][into_1], 0.0)
    # no path of an edge into layer 1 or logits runs through layer 0: dropping it changes nothing there
    downstream = into_1 | _into(graph, ("logits",))
    np.testing.assert_allclose(estimates[1][downstream], estimates[0][downstream], rtol=1e-12, atol=1e-14)
    # GradDrop scores average |estimate| over the layers other than the destination's
    scores = graddrop_scores(problem, estimates)
    np.testing.assert_allclose(scores[into_0], np.abs(estimates[2][into_0]), rtol=1e-12)
    np.testing.assert_allclose(scores[into_1], np.abs(estimates[1][into_1]), rtol=1e-12)
    np.testing.assert_allclose(scores[~into_0 & ~into_1], np.abs(estimates[0][~into_0 & ~into_1]), rtol=1e-12)


def test_internal_edges():
    """ACDC's graph, with ``a.h.q|k|v -> a.h`` edges: ablating one ablates that whole input. AtP*'s QK
    fix recomputes the pattern with the input fully ablated (exact here, as above); EAP-IG over
    inputs gives an internal edge the sum of its input's residual edges (it gates their sum)."""
    with jax.enable_x64(True):
        model = _attention_only(1)
        problem = Problem.build(model, _toy_task(model, "logit_diff", seed=1), metric="logit_diff", internal_edges=True)
        exact = exact_unit_effects(problem)
        atp = atp_estimates(problem, graddrop=False)[0]
        inputs = eap_ig(problem, steps=1, variant="inputs").scores
    graph = problem.graph
    internal = graph.indices(graph.internal_edge_names)
    np.testing.assert_allclose(atp, exact, rtol=1e-9, atol=1e-9)
    assert np.abs(exact[internal]).max() > 0.1
    for name in graph.internal_edge_names:
        dst, _ = graph.split_edge(name)
        residual = graph.indices([f"{src}->{dst}" for src in graph.sources_of(dst)])
        np.testing.assert_allclose(inputs[graph.index(name)], inputs[residual].sum(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# HISP


def test_hisp_is_the_mean_absolute_per_prompt_gradient():
    with jax.enable_x64(True):
        problem = _linear_problem(level="node")
        n = problem.run.tokens.shape[0]
        ones = problem.graph.gates(1.0, jnp.float64)
        shares = per_prompt_gate_gradients(problem, ones)
        alone = np.asarray(jax.jit(jax.vmap(lambda i: jax.grad(problem.subset(i[None]).loss)(ones)))(jnp.arange(n)))
        circuit = hisp(problem)
    # logit_diff is a mean over prompts: each prompt's share of the batch gradient is 1/n of its own
    np.testing.assert_allclose(shares, alone / n, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(circuit.scores, np.abs(alone).mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(circuit.extra["signed"], -alone.mean(0), rtol=1e-9, atol=1e-12)
    assert np.any(np.abs(circuit.extra["signed"]) < circuit.scores - 1e-6)  # signs differ between prompts


# --------------------------------------------------------------------------------------------
# Wrong-answer gradients


def test_wrong_answer_losses_follow_their_definitions():
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(4, 2, 5), jnp.float32)
    clean = jnp.asarray(rng.randn(4, 2, 5), jnp.float32)
    answers = np.array([[1], [3], [0], [2]])
    wrong = np.array([[3], [1], [2], [0]])  # rows (0, 1) and (2, 3) are swapped pairs
    inputs = MetricInputs(clean_logits=clean, answers=jnp.asarray(answers), wrong_answers=jnp.asarray(wrong))
    last, last_clean = np.asarray(logits, np.float64)[:, -1], np.asarray(clean, np.float64)[:, -1]
    rows = np.arange(4)
    a, w = last[rows, answers[:, 0]], last[rows, wrong[:, 0]]
    ld_clean = last_clean[rows, answers[:, 0]] - last_clean[rows, wrong[:, 0]]
    # the proposal: per pair, the squared difference of the two names' logits, summed over both prompts
    pair_sums = [(last[0, 1] - last[0, 3]) ** 2 + (last[1, 1] - last[1, 3]) ** 2,
                 (last[2, 0] - last[2, 2]) ** 2 + (last[3, 0] - last[3, 2]) ** 2]
    np.testing.assert_allclose(wrong_answer_loss("mse")(logits, inputs), np.mean(pair_sums) / 2, rtol=1e-5)
    logp = last - np.log(np.exp(last).sum(-1, keepdims=True))
    np.testing.assert_allclose(wrong_answer_loss("ce")(logits, inputs), -logp[rows, wrong[:, 0]].mean(), rtol=1e-5)
    np.testing.assert_allclose(wrong_answer_loss("flip")(logits, inputs), ((a - w + ld_clean) ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(wrong_answer_loss("logit_diff")(logits, inputs), (a - w).mean(), rtol=1e-5)
    for name in ("mse", "ce", "flip", "logit_diff"):
        assert wrong_answer_loss(name).higher_is_better  # lower = more wrong; Metric.loss is its negative
    with pytest.raises(ValueError, match="unknown wrong-answer loss"):
        wrong_answer_loss("mse2")


def test_wrong_answer_weight_gradients_match_a_direct_gradient():
    with jax.enable_x64(True):
        problem = _toy_problem()
        model, run = problem.model, problem.run
        direct = eqx.filter_jit(eqx.filter_grad(
            lambda m: problem.metric.loss(forward(m, run.tokens, positions=run.positions), problem.inputs)
        ))(model)
        engine = weight_gradients(problem)
        direct = jax.tree.map(np.asarray, eqx.filter(direct, eqx.is_inexact_array))
        engine = jax.tree.map(np.asarray, engine)
    for a, b in zip(jax.tree.leaves(engine), jax.tree.leaves(direct)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    scores = node_weight_scores(problem, engine)
    attn = direct.blocks.attn
    head = [attn.W_Q[1, 2], attn.W_K[1, 2], attn.W_V[1, 2], attn.b_Q[1, 2], attn.b_K[1, 2], attn.b_V[1, 2], attn.W_O[1, 2]]
    np.testing.assert_allclose(scores["grad_norm"]["a1.2"], np.sqrt(sum((g**2).sum() for g in head)), rtol=1e-9)
    mlp = [direct.blocks.mlp.W_in[0], direct.blocks.mlp.b_in[0], direct.blocks.mlp.W_out[0], direct.blocks.mlp.b_out[0]]
    theta = [problem.model.blocks.mlp.W_in[0], problem.model.blocks.mlp.b_in[0], problem.model.blocks.mlp.W_out[0],
             problem.model.blocks.mlp.b_out[0]]
    np.testing.assert_allclose(scores["saliency"]["mlp0"], sum((np.asarray(t) * g).sum() for t, g in zip(theta, mlp)), rtol=1e-9)
    assert set(scores["grad_norm"]) == set(problem.graph.nodes)


def _swapped_pairs_task():
    """Planted prompts in swapped pairs: row 2i+1 is row 2i with its answer token (both copies)
    replaced by the one token the prompt lacks, so each row's answer is the other's wrong answer."""
    base = planted_task(n_prompts=6, ablation="zero", metric="logit_diff")
    clean, corrupt, answers, wrong = [], [], [], []
    for row, corrupted in zip(base.clean, base.corrupt):
        missing = (set(range(5)) - set(row[1:5].tolist())).pop()
        other = row.copy()
        other[[4, 8]] = missing
        clean += [row, other]
        corrupt += [corrupted, corrupted]
        answers += [[row[8]], [missing]]
        wrong += [[missing], [row[8]]]
    return Task(
        name="planted-pairs", clean=np.array(clean), corrupt=np.array(corrupt), positions=np.tile(base.positions[:1], (12, 1)),
        metric="logit_diff", answers=np.array(answers), wrong_answers=np.array(wrong), canonical=base.canonical,
        ablation="zero",
    )


def test_wrong_answer_method_on_swapped_pairs():
    task = _swapped_pairs_task()
    circuit = discover(planted_model(), task, method="wrong-answer", pairs=True, top_n=7)
    assert circuit.settings["paired"] and circuit.metric == "logit_diff" and circuit.settings["loss"] == "mse"
    assert {"embed->a1.0.v", "a1.0->logits"} <= set(circuit.kept)  # the unsaturated direct path
    print(f"\nplanted swapped pairs, wrong-answer (mse): AUC {circuit.extra['auc']:.3f}")
    with pytest.raises(ValueError, match="swapped prompt pairs"):
        get_method("wrong-answer").fn(_planted_problem(), pairs=True)


# --------------------------------------------------------------------------------------------
# Rank stability


def test_rank_agreement():
    a = np.arange(10.0)
    same = rank_agreement(a, 2 * a + 1, top_k=3)
    assert same["spearman"] == pytest.approx(1.0) and same["kendall"] == pytest.approx(1.0) and same["top_k_overlap"] == 1.0
    flipped = rank_agreement(a, -a, top_k=3)
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["kendall"] == pytest.approx(-1.0)
    assert flipped["top_k_overlap"] == 0.0
    assert rank_agreement(a, np.r_[a[:7], 9.0, 8.0, 7.0], top_k=3)["top_k_overlap"] == 1.0


def test_split_half_stability_keeps_groups_together():
    with jax.enable_x64(True):
        problem = _linear_problem()  # 4 prompts: two groups of 2, one per half
        seen, circuits = [], []

        def recording(half, **options):
            seen.append(np.asarray(half.run.tokens))
            circuits.append(eap(half, **options))
            return circuits[-1]

        result = split_half_stability(problem, recording, seeds=(0, 1), top_k=5, group_size=2)
    tokens = np.asarray(problem.run.tokens)
    halves = [{i for i in range(4) if any((t == tokens[i]).all() for t in half)} for half in seen]
    assert len(halves) == 4 and all(h in ({0, 1}, {2, 3}) for h in halves)
    assert halves[0] != halves[1] and halves[2] != halves[3]
    assert len(result["spearman"]) == 2 and len(result["kendall"]) == 2
    from scipy import stats  # the agreement of each seed's two halves, computed here independently

    for i in range(2):
        a, b = circuits[2 * i].scores, circuits[2 * i + 1].scores
        assert not np.isnan(a).any() and not np.isnan(b).any() and np.ptp(a) > 0 and np.ptp(b) > 0
        assert result["kendall"][i] == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
        assert result["spearman"][i] == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    print("\nsplit-half stability of EAP on the 4-prompt linear model:", result["mean"])


# --------------------------------------------------------------------------------------------
# discover, the planted circuit, tracr


# Under zero ablation only the 7 planted edges (3 nodes) change the output. The integrated and
# exact methods rank them first; the methods that take the gradient at the clean point (EAP, AtP*'s
# non-attention part, the wrong-answer gradient with logit_diff, which is EAP) miss the saturated
# ones (zero gradient there: see test_eap_ig_ranks_the_planted_edges_on_top), so their AUC is < 1.
PLANTED_AUC_ONE = {"eap-ig", "eap-ig-inputs", "hisp", "exact-patching"}


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_discover_runs_every_gradient_method(method):
    """``discover`` by name equals the method's function on the problem it should build (level,
    metric, options), keeps the top-n scores, and its AUC is the one computed here from the scores."""
    assert method in method_names()
    spec = get_method(method)
    level = spec.level
    top_n = 7 if level == "edge" else 3
    task = planted_task(ablation="zero", metric="logit_diff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logit_diff has no minimum at the clean model: no warning
        circuit = discover(planted_model(), task, method=method, top_n=top_n)
    direct = spec.fn(Problem.build(planted_model(), task, level=level, metric="logit_diff"), top_n=top_n)
    assert circuit.method == method and circuit.graph.level == level and circuit.graph == direct.graph
    np.testing.assert_array_equal(circuit.scores, direct.scores)
    assert circuit.kept == direct.kept and circuit.metric_value == pytest.approx(direct.metric_value, abs=1e-6)
    order = np.argsort(-circuit.scores, kind="stable")
    assert set(circuit.kept) == {circuit.graph.gate_names[i] for i in order[:top_n]}
    labels = task.canonical.labels(circuit.graph)
    assert circuit.extra["auc"] == roc_auc(circuit.scores, labels)
    assert (circuit.extra["auc"] == 1.0) == (method in PLANTED_AUC_ONE), circuit.extra["auc"]
    print(f"\nplanted (zero ablation, logit_diff) {method}: AUC {circuit.extra['auc']:.3f}, "
          f"recall of the top {circuit.n_kept}: {circuit.extra['recall']:.2f}")


def test_eap_ig_ranks_the_planted_edges_on_top():
    """Under zero ablation only the 7 planted edges can change the output; every other edge's gate
    gradient is 0 all along the path (junk writes only into a block nothing reads), and each planted
    edge's integral is nonzero, so EAP-IG ranks exactly them first (EAP misses the saturated ones)."""
    problem = _planted_problem()
    circuit = eap_ig(problem, top_n=7)
    assert set(circuit.kept) == set(PLANTED_EDGES)
    others = np.array([e not in PLANTED_EDGES for e in problem.graph.edges])
    assert np.abs(circuit.scores[others]).max() < 1e-5 * np.abs(circuit.scores).max()
    print("\nplanted EAP-IG (16 midpoint steps) completeness:", circuit.extra["completeness"])
    labels = planted_task().canonical.labels(problem.graph)
    assert roc_auc(circuit.scores, labels) == 1.0
    plain = eap(problem).scores
    saturated = problem.graph.indices(["embed->a0.0.q", "embed->a0.0.k", "embed->a1.0.q", "a0.0->a1.0.k"])
    print(f"EAP on the saturated planted edges: {plain[saturated]} (EAP-IG: {circuit.scores[saturated]})")


@pytest.mark.parametrize("name", ["tracr-reverse", "tracr-xproportion"])
def test_tracr_aucs(name):
    """AUC of each method against the ground truth (an ACDC run with zero ablation and metric l2),
    under zero ablation and corrupted-input patching.

    What can be promised: l2 is 0 at the clean model and positive elsewhere, so exact single-edge
    scores are >= 0, and under zero ablation (where every ground-truth edge matters on its own and
    no other edge does) exact patching ranks the ground truth first: AUC 1. Every method that takes
    the gradient at the clean model (EAP, AtP*, HISP) gets zero there, l2's minimum: their scores
    are float dust and their AUC means nothing; we assert the zero for EAP (AtP*'s estimates are
    made of the same zero gradient) and print EAP at the corrupted point instead. EAP-IG obeys
    completeness up to its quadrature error. No gradient method is promised an AUC, so they are
    printed, not asserted. Under corrupted-input patching some ground-truth edges have no effect at
    all (see the tracr task docstring), so not even exact patching need reach 1.
    """
    model, task = aj.load_model(name), get_task(name)
    corrupt = Problem.build(model, task, ablation="corrupt")
    # zero ablation broadcast to the batch shape: the same runs as make_ablation's, and the same
    # shapes as the corrupted problem, so both share every compilation
    zeros = jnp.zeros(corrupt.run.ablation.values.shape, model.dtype)
    zero = Problem(eqx.tree_at(lambda r: r.ablation, corrupt.run, Ablation.from_values(model, zeros)),
                   corrupt.inputs, corrupt.metric, corrupt.task_name, "zero")
    graph = corrupt.graph
    labels = task.canonical.labels(graph)
    alphas, weights = quadrature(16)
    ones = np.ones((1, graph.n_gates))
    for ablation, problem in (("zero", zero), ("corrupt", corrupt)):
        grads = gate_gradients(problem, np.concatenate([ones, 0 * ones, alphas[:, None] * ones]))
        eap_clean, eap_corrupted, ig = -grads[0], -grads[1], -(weights @ grads[2:])
        inputs = -(weights @ input_path_gradients(problem, alphas))
        exact = exact_unit_effects(problem)
        aucs = {
            "exact": roc_auc(exact, labels),
            "eap (corrupted point)": roc_auc(eap_corrupted, labels),
            "eap-ig": roc_auc(ig, labels),
            "|eap-ig|": roc_auc(np.abs(ig), labels),
            "eap-ig-inputs": roc_auc(inputs, labels),
            "|eap-ig-inputs|": roc_auc(np.abs(inputs), labels),
        }
        target = _loss(problem, graph.gates(0.0)) - _loss(problem, graph.gates(1.0))
        print(f"\n{name} ({ablation} ablation, l2) AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items())
              + f"; eap, atp-star, hisp at the clean point: zero gradient (max |eap| {np.abs(eap_clean).max():.1e})"
              + f"; EAP-IG score sum {ig.sum():.4f} vs loss(ablated) - loss(clean) {target:.4f}")
        assert np.all(exact > -1e-6)
        if ablation == "zero":
            assert aucs["exact"] == 1.0
        assert np.abs(eap_clean).max() < 1e-4 * np.abs(ig).max()
