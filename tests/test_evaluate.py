"""Evaluation: ROC/AUC as the ACDC paper counts, node-level conversion, faithfulness curves
(MIB's CPR/CMD), KL to the clean model, plots."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax import evaluate as ev
from acdc_jax.methods import Circuit, Problem
from acdc_jax.models import build_model, expected_shapes
from acdc_jax.tasks import CanonicalCircuit, Task

from .conftest import TINY_CONFIGS
from .planted import PLANTED_EDGES, PLANTED_NODES, planted_problem, planted_task

FIXTURES = Path(__file__).parent / "fixtures"


# ------------------------------------------------------------------ ROC and AUC by hand


def test_roc_from_scores_with_ties_and_nan():
    scores = np.array([0.9, 0.8, 0.8, np.nan, 0.1, np.nan])
    labels = np.array([1, 0, 1, 1, 0, 0], bool)
    fpr, tpr = ev.roc_from_scores(scores, labels)
    # groups by score: {0.9: +}, {0.8: +, -}, {0.1: -}, {NaN, ranked last: +, -}
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1])
    # pessimistic staircase: 1 * 1/3 + (2/3) * 1/3 + (1/3) * 0 + 0 * 1/3
    assert ev.auc(fpr, tpr) == pytest.approx(5 / 9, abs=1e-15)
    # trapezoid = Mann-Whitney with ties counting 1/2: (3 + 2.5 + 0.5) / 9
    assert ev.auc(fpr, tpr, "trapezoid") == pytest.approx(2 / 3, abs=1e-15)
    assert ev.roc_auc(scores, labels) == pytest.approx(5 / 9, abs=1e-15)


def test_roc_of_a_threshold_family_is_completed_and_pareto_filtered():
    labels = np.array([1, 1, 0, 0, 0], bool)
    masks = [
        [1, 0, 0, 0, 0],  # (0, 1/2)
        [1, 1, 1, 0, 0],  # (1/3, 1)
        [0, 1, 1, 1, 0],  # (2/3, 1/2): beaten by (1/3, 1), dropped
        [1, 1, 1, 0, 0],  # a duplicate point
    ]
    fpr, tpr = ev.roc_from_masks(np.array(masks, bool), labels)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 2, 1, 1])
    assert ev.auc(fpr, tpr) == pytest.approx(1 / 2 + (2 / 3) * (1 / 2), abs=1e-15)
    assert ev.auc(fpr, tpr, "trapezoid") == pytest.approx((1 / 3) * (3 / 4) + 2 / 3, abs=1e-15)
    # an empty family is just the corners: the diagonal, pessimistic area 0
    fpr, tpr = ev.roc_from_masks([], labels)
    assert ev.auc(fpr, tpr) == 0.0 and ev.auc(fpr, tpr, "trapezoid") == 0.5


def test_pessimistic_auc_needs_a_monotone_curve():
    with pytest.raises(ValueError, match="pareto_frontier"):
        ev.auc([0, 0.5, 1], [0, 0.8, 0.6])
    with pytest.raises(ValueError, match="one positive and one negative"):
        ev.roc_from_scores([1.0, 2.0], [True, True])


def test_reproduces_the_acdc_paper_auc_table():
    """The paper's stored ROC points of its ACDC sweeps give its table's edge AUCs (to 3 digits);
    the trapezoid rule would not."""
    data = json.loads((FIXTURES / "acdc_paper_roc_points.json").read_text())
    for task, expected in data["paper_edge_auc"].items():
        points = data["points"][task]
        fpr, tpr = ev.pareto_frontier([0.0, *points["edge_fpr"], 1.0], [0.0, *points["edge_tpr"], 1.0])
        assert round(ev.auc(fpr, tpr), 3) == expected, task
        assert round(ev.auc(fpr, tpr, "trapezoid"), 3) != expected, task


# ------------------------------------------------------------------ node level


def test_node_conversion_by_hand():
    graph = aj.Graph(n_layers=1, n_heads=1, has_mlp=True, internal_edges=True)
    assert ev.node_names(graph) == (
        "embed", "a0.0.q", "a0.0.k", "a0.0.v", "a0.0.hook_q", "a0.0.hook_k", "a0.0.hook_v", "a0.0", "mlp0", "logits",
    )
    kept = np.isin(graph.edges, ["embed->a0.0.q", "a0.0.k->a0.0", "a0.0->mlp0"])
    acdc_nodes = np.array(ev.node_names(graph))[ev.nodes_from_edges(graph, kept)]
    # the MLP's input is not a node in ACDC's counting, so a0.0->mlp0 puts only a0.0 in
    assert set(acdc_nodes) == {"embed", "a0.0.q", "a0.0.k", "a0.0.hook_k", "a0.0"}
    source_nodes = np.array(ev.node_names(graph, "sources"))[ev.nodes_from_edges(graph, kept, "sources")]
    assert set(source_nodes) == {"embed", "a0.0", "mlp0"}

    # a node's score is the best score of the edges that put it in
    scores = np.array([0.5, np.nan, 0.2, 0.1, 0.7, np.nan, 0.3, 0.9, 0.4, np.nan, 0.6])
    by_node = dict(zip(ev.node_names(graph), ev.node_scores_from_edges(graph, scores)))
    assert by_node["embed"] == 0.5  # max of embed->(q, k, v, mlp0, logits) = 0.5, NaN, 0.2, 0.3, 0.4
    assert by_node["a0.0.k"] == 0.7 and by_node["a0.0.hook_k"] == 0.7
    assert by_node["a0.0.v"] == 0.2 and np.isnan(by_node["a0.0.hook_v"])
    assert by_node["a0.0"] == 0.9 and by_node["mlp0"] == 0.6 and by_node["logits"] == 0.6

    # node-level circuits become edge sets as the paper converts SP masks
    kept_nodes = np.array([True, True, False])  # embed, a0.0, mlp0
    kept_edges = ev.edges_from_nodes(graph, kept_nodes)
    assert set(np.array(graph.edges)[kept_edges]) == {
        "embed->a0.0.q", "embed->a0.0.k", "embed->a0.0.v", "a0.0.q->a0.0", "a0.0.k->a0.0", "a0.0.v->a0.0",
        "embed->logits", "a0.0->logits",
    }
    edge_scores = ev.edge_scores_from_nodes(graph, np.array([3.0, 1.0, 2.0]))
    assert dict(zip(graph.edges, edge_scores))["a0.0->mlp0"] == 1.0
    assert dict(zip(graph.edges, edge_scores))["mlp0->logits"] == 2.0


def test_acdc_counts_for_gpt2_small():
    """32,923 edges and 1,022 nodes: the totals the paper's stored ROC points imply."""
    graph = aj.Graph(n_layers=12, n_heads=12, has_mlp=True, internal_edges=True)
    assert graph.n_edges == 32923
    assert len(ev.node_names(graph)) == 1022
    assert len(ev.node_names(graph, "sources")) == 157
    assert ev.nodes_from_edges(graph, np.ones(graph.n_edges, bool)).all()


def test_roc_curve_of_circuits_at_both_levels():
    problem = planted_problem()
    task = planted_task()
    graph = problem.graph
    labels = task.canonical.labels(graph)
    scores = np.where(labels, 2.0, np.linspace(0.0, 1.0, graph.n_gates))
    perfect = Circuit("hand", task.name, graph, scores, PLANTED_EDGES, "kl", "zero")
    assert ev.roc_curve(perfect, task).auc == 1.0
    assert ev.roc_curve(perfect, task, level="node").auc == 1.0
    assert ev.roc_curve(perfect, task, level="node", nodes="sources").auc == 1.0
    backwards = Circuit("hand", task.name, graph, -scores, (), "kl", "zero")
    assert ev.roc_curve(backwards, task).auc == 0.0

    node_graph = planted_problem(level="node").graph
    node_scores = np.array([1.0 if n in PLANTED_NODES else 0.0 for n in node_graph.nodes])
    nodes = Circuit("hand", task.name, node_graph, node_scores, PLANTED_NODES, "kl", "zero")
    curve = ev.roc_curve(nodes, task, level="node", nodes="sources")
    assert (curve.auc, curve.n_positive, curve.n_negative) == (1.0, 3, 4)
    # as edges: every edge between kept nodes is kept; the planted circuit is among them
    edge_curve = ev.roc_curve([nodes], task, level="edge")
    n_between = int(ev.edges_from_nodes(node_graph, node_scores > 0).sum())
    np.testing.assert_allclose(edge_curve.fpr, [0, (n_between - 7) / 39, 1])
    np.testing.assert_allclose(edge_curve.tpr, [0, 1, 1])


def test_acdc_family_on_the_planted_circuit():
    """Under zero ablation exactly the planted edges matter: any threshold between 0 and their
    effects recovers them, a huge one keeps nothing, so the family's ROC is perfect."""
    family = ev.acdc_family(planted_problem(), [1e-3, 1e9], planted_task(), max_batch=4)
    assert [c.n_kept for c in family.circuits] == [7, 0]
    assert set(family.circuits[0].kept) == set(PLANTED_EDGES)
    np.testing.assert_array_equal(family.roc.fpr, [0, 0, 1])
    np.testing.assert_array_equal(family.roc.tpr, [0, 1, 1])
    assert family.roc.auc == 1.0 and family.node_roc.auc == 1.0


# ------------------------------------------------------------------ faithfulness, CPR, CMD


def test_cpr_and_cmd_of_a_hand_made_curve():
    x = [0.001, 0.01, 0.1, 1.0]
    f = [0.0, 0.5, 1.2, 1.0]
    assert ev.cpr(x, f) == pytest.approx(0.009 * 0.25 + 0.09 * 0.85 + 0.9 * 1.1, abs=1e-12)
    # |1 - f|: overshooting the full model counts as a distance too
    assert ev.cmd(x, f) == pytest.approx(0.009 * 0.75 + 0.09 * 0.35 + 0.9 * 0.1, abs=1e-12)


def test_ranking_orders_by_score_or_magnitude_nan_last():
    scores = np.array([-3.0, 1.0, 2.0, np.nan, 2.0])
    np.testing.assert_array_equal(ev.ranking(scores), [3, 2, 0, 4, 1])
    np.testing.assert_array_equal(ev.ranking(scores, absolute=True), [0, 3, 1, 4, 2])


def _random_task(model, n_prompts=4, seed=0):
    cfg = model.config
    rng = np.random.RandomState(seed)
    length = cfg.n_ctx - 1
    return Task(
        name="random",
        clean=rng.randint(0, cfg.d_vocab, (n_prompts, length)),
        corrupt=rng.randint(0, cfg.d_vocab, (n_prompts, length)),
        positions=np.full((n_prompts, 1), length - 1),
        metric="logit_diff",
        answers=rng.randint(0, cfg.d_vocab_out, (n_prompts, 1)),
        wrong_answers=rng.randint(0, cfg.d_vocab_out, (n_prompts, 1)),
        discovery_metric="kl",
    )


def _random_model(seed=0):
    """A small random GPT-2-like model, built from numpy weights (no compilation needed)."""
    cfg = TINY_CONFIGS["gpt2-like"]
    rng = np.random.RandomState(seed)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        is_ln_scale = name.endswith(".w") and "ln" in name
        weights[name] = (1.0 if is_ln_scale else 0.0) + 0.3 * rng.randn(*shape)
    return build_model(cfg, weights)


@pytest.fixture(scope="module")
def x64_problem():
    with jax.enable_x64(True):
        model = _random_model().astype(jnp.float64)
        task = _random_task(model)
        return model, task, Problem.build(model, task, metric="logit_diff", ablation="corrupt")


def test_faithfulness_curve_endpoints_and_the_mib_grid(x64_problem):
    with jax.enable_x64(True):
        _, _, problem = x64_problem
        n = problem.graph.n_gates
        scores = np.random.RandomState(1).randn(n)
        curve = ev.faithfulness_curve(problem, scores, ns=[0, 3, n // 2, n], chunk_size=3)
        assert curve.faithfulness[0] == 0.0 and curve.faithfulness[-1] == 1.0
        assert curve.values[0] == curve.ablated_value and curve.values[-1] == curve.full_value
        assert curve.ablated_value != curve.full_value

        mib = ev.faithfulness_curve(problem, scores, chunk_size=3)
        np.testing.assert_array_equal(mib.fractions, ev.MIB_FRACTIONS)
        np.testing.assert_array_equal(mib.n_kept, [int(k * n) for k in ev.MIB_FRACTIONS])
        assert mib.faithfulness[-1] == 1.0
        assert mib.cpr == pytest.approx(ev.cpr(ev.MIB_FRACTIONS, mib.faithfulness))
        assert mib.cmd == pytest.approx(ev.cmd(ev.MIB_FRACTIONS, mib.faithfulness))


def test_vmapped_faithfulness_curve_equals_a_loop(x64_problem):
    with jax.enable_x64(True):
        model, task, problem = x64_problem
        n = problem.graph.n_gates
        scores = np.random.RandomState(2).randn(n)
        ns = [0, 1, 2, 17, n - 1, n]
        curve = ev.faithfulness_curve(problem, scores, ns=ns, absolute=True, chunk_size=3)
        rank = ev.ranking(scores, absolute=True)
        looped = np.array([problem.evaluate(jnp.asarray(rank < k, jnp.float64)) for k in ns])
        np.testing.assert_allclose(curve.values, looped, rtol=1e-10, atol=1e-12)
        # the full gated model is the clean model, and nothing kept is the corrupted run
        assert curve.full_value == pytest.approx(
            float(problem.metric(model(task.clean, positions=task.positions), problem.inputs)), abs=1e-10)
        assert curve.ablated_value == pytest.approx(
            float(problem.metric(model(task.corrupt, positions=task.positions), problem.inputs)), abs=1e-10)


def test_kl_to_clean_of_full_and_empty_circuits(x64_problem):
    with jax.enable_x64(True):
        model, task, problem = x64_problem
        graph = problem.graph
        full = Circuit("hand", task.name, graph, np.zeros(graph.n_gates), graph.gate_names, "kl", "corrupt")
        empty = Circuit("hand", task.name, graph, np.zeros(graph.n_gates), (), "kl", "corrupt")
        clean = model(task.clean, positions=task.positions)
        ablated = model(task.corrupt, positions=task.positions)
        p, q = jax.nn.log_softmax(clean, -1), jax.nn.log_softmax(ablated, -1)
        expected = float((jnp.exp(p) * (p - q)).sum(-1).mean())
        assert expected > 1e-3
        assert abs(ev.kl_to_clean(problem, full)) < 1e-12
        assert ev.kl_to_clean(problem, empty) == pytest.approx(expected, rel=1e-10)
        # several circuits, or their gate vectors, in one batch
        batch = ev.kl_to_clean(problem, [full, empty])
        np.testing.assert_allclose(batch, [0.0, expected], rtol=1e-10, atol=1e-12)
        gates = np.stack([full.kept_mask(), empty.kept_mask()]).astype(np.float64)
        np.testing.assert_array_equal(ev.kl_to_clean(problem, gates), batch)


def test_plots_are_written(tmp_path):
    a = ev.RocCurve(np.array([0, 0.2, 1.0]), np.array([0, 0.8, 1.0]), 0.64, "edge", 5, 10, "ACDC")
    b = ev.RocCurve(np.array([0, 0.5, 1.0]), np.array([0, 0.5, 1.0]), 0.25, "edge", 5, 10, "EAP")
    png = ev.plot_roc([a, b], tmp_path / "roc.png", title="planted")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = ev.plot_roc({"first": a, "second": b}, tmp_path / "roc.svg")
    assert ET.parse(svg).getroot().tag.endswith("svg")
    assert "AUC 0.640" in svg.read_text()

    x = np.array(ev.MIB_FRACTIONS)
    curve = ev.FaithfulnessCurve(x, (x * 100).astype(int), x, np.sqrt(x), 1.0, 0.0, 100, "kl", False, "learned")
    png = ev.plot_faithfulness(curve, tmp_path / "faith.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = ev.plot_faithfulness([curve], tmp_path / "faith.svg", log_x=False)
    assert ET.parse(svg).getroot().tag.endswith("svg")
    with pytest.raises(ValueError, match=r"\.png, \.svg"):
        ev.plot_roc(a, tmp_path / "roc.jpeg")


def test_reference_needs_edges_for_acdc_node_counting():
    graph = aj.Graph(n_layers=1, n_heads=1, has_mlp=False)
    nodes_only = CanonicalCircuit((), ("embed", "a0.0"), "zero", "hand")
    with pytest.raises(ValueError, match="nodes='sources'"):
        ev.reference_labels(graph, nodes_only, level="node")
    np.testing.assert_array_equal(ev.reference_labels(graph, nodes_only, level="node", nodes="sources"), [True, True])
