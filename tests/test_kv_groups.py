"""Grouped-query attention gated per key/value head (``Graph.kv_heads``): names and order, the gated
forward against a plain float64 reference, gradient linearity against the per-head graph, finite
differences, every edge-level method, and the ungrouped MIB export."""

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax import export
from acdc_jax.graph import Graph
from acdc_jax.methods import Problem, get_method
from acdc_jax.patching import GatedRun, corrupt_ablation
from acdc_jax.tasks import Task

from .reference import gated_logits
from .test_families import ALL_FEATURES

# a tiny Llama with grouped-query attention: 4 query heads reading 2 key/value heads
LLAMA_GQA = aj.TransformerConfig(
    n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_head=8, d_mlp=48, d_vocab=23, n_ctx=8, act_fn="silu",
    normalization="rms", positional="rotary", gated_mlp=True, tied_unembed=False,
)


def _task(cfg, n_prompts=3, seed=0):
    rng = np.random.RandomState(seed)
    n_pos = 6
    clean = rng.randint(0, cfg.d_vocab, (n_prompts, n_pos))
    answers = rng.randint(0, cfg.d_vocab, (n_prompts, 1))
    return Task(name="random-logit-diff", clean=clean, corrupt=rng.randint(0, cfg.d_vocab, clean.shape),
                positions=np.full((n_prompts, 1), n_pos - 1), metric="logit_diff", answers=answers,
                wrong_answers=(answers + 1) % cfg.d_vocab,
                labels={"A": np.full(n_prompts, 2), "END": np.full(n_prompts, n_pos - 1)})


@pytest.fixture(scope="module")
def gqa_problems():
    with jax.enable_x64(True):
        model = aj.init_model(LLAMA_GQA, jax.random.PRNGKey(1), std=0.5).astype(np.float64)
        task = _task(LLAMA_GQA)
        yield {kv: Problem.build(model, task, kv_groups=kv, metric="logit_diff", ablation="corrupt") for kv in (False, True)}


def test_grouped_graph_names_order_sizes_and_errors(gqa_problems):
    g = Graph(2, 4, True, kv_heads=2)
    assert g.destinations[:9] == ("a0.0.q", "a0.1.q", "a0.2.q", "a0.3.q", "a0.g0.k", "a0.g0.v", "a0.g1.k", "a0.g1.v", "mlp0")
    assert g.n_in == 8 and g.heads_fed("a1.g1.v") == ("a1.2", "a1.3") and g.input_of(1, 1, "k") == "a1.g0.k"
    # every attention input of layer l reads embed and the earlier layers' 4 heads and MLP
    expected = sum((4 + 2 * 2) * (1 + 5 * layer) + (1 + 5 * layer + 4) for layer in range(2)) + 11
    assert g.n_edges == expected and Graph(2, 4, True).n_edges - g.n_edges == 2 * 2 * (1 + 6)
    assert g.edges.index("embed->a0.g0.k") == 4 and g.edges[g.edges.index("a0.3->a1.g1.v") + 1] == "a0.3->a1.g1.v".replace("a0.3", "mlp0")
    assert g.dense(g.gates()).attn.shape == (2, 8, g.n_sources)
    with pytest.raises(ValueError, match="n_kv_heads < n_heads"):
        Graph.from_model(aj.TransformerConfig(n_layers=1, n_heads=2, d_model=8, d_head=4, d_mlp=8, d_vocab=5, n_ctx=4),
                         kv_groups=True)
    for bad, match in [(dict(kv_heads=4), "smaller than it"), (dict(kv_heads=3), "divisor"),
                       (dict(kv_heads=2, internal_edges=True), "internal edges"),
                       (dict(kv_heads=2, qkv_split=False), "q/k/v-split"), (dict(kv_heads=2, level="node"), "node gates")]:
        with pytest.raises(ValueError, match=match):
            Graph(2, 4, True, **bad)
    run = gqa_problems[True].run
    with pytest.raises(aj.InputError, match="kv_groups=True"):
        GatedRun(run.model, Graph(2, 4, True, kv_heads=1), run.tokens, run.ablation)


def test_gated_forward_with_grouped_kv_is_the_model_and_the_reference():
    """Float64, the model with every family feature (post norms, parallel blocks, rotary, q/k norm):
    all gates 1 is the model, all 0 the corrupted model, random (and per-position) gates the plain
    reference in which every query head reads its group's gated k and v input; the last layer
    computed at the read positions only agrees. (The shared-row read of gradient methods at gates 1
    is checked by finite differences below.)"""
    with jax.enable_x64(True):
        model = aj.init_model(ALL_FEATURES, jax.random.PRNGKey(0), std=0.5).astype(np.float64)
        rng = np.random.RandomState(0)
        tokens, corrupt = rng.randint(0, ALL_FEATURES.d_vocab, (2, 2, 6))
        graph = Graph.from_model(model, kv_groups=True)
        ablation = corrupt_ablation(model, corrupt)
        run = GatedRun(model, graph, tokens, ablation)
        np.testing.assert_allclose(run(graph.gates(1.0, np.float64)), model(tokens), rtol=0, atol=1e-12)
        np.testing.assert_allclose(run(graph.gates(0.0, np.float64)), model(corrupt), rtol=0, atol=1e-12)
        gates = rng.uniform(0, 1, (6, graph.n_gates))  # per destination position
        np.testing.assert_allclose(run(gates), gated_logits(model, graph, tokens, gates, ablation.values), rtol=0, atol=1e-12)
        gates = rng.uniform(0, 1, graph.n_gates)
        at = np.array([[5, 2], [4, 1]])
        trimmed = GatedRun(model, graph, tokens, ablation, positions=at)(gates)
        np.testing.assert_allclose(trimmed, np.take_along_axis(run(gates), at[:, :, None], 1), rtol=0, atol=1e-12)


def test_eap_on_grouped_kv_is_the_sum_over_the_groups_heads_and_matches_finite_differences(gqa_problems):
    """At all gates 1 a grouped k/v gate moves the inputs of its group's heads together, so its gradient
    is the sum of theirs: per grouped edge, EAP equals the per-head k/v scores summed over the group,
    and every other edge keeps its score. Central finite differences of the loss check the gradient."""
    with jax.enable_x64(True):
        per_head, grouped = (get_method("eap").fn(gqa_problems[kv]).scores for kv in (False, True))
        ph, gr = gqa_problems[False].graph, gqa_problems[True].graph
        n_grouped = 0
        for i, name in enumerate(gr.edges):
            src, dst = name.split("->")
            if ".g" in dst:
                layer, j, t = int(dst[1]), int(dst.split(".g")[1][0]), dst[-1]
                heads = range(2 * j, 2 * j + 2)
                expected = sum(per_head[ph.index(f"{src}->a{layer}.{h}.{t}")] for h in heads)
                n_grouped += 1
            else:
                expected = per_head[ph.index(name)]
            assert grouped[i] == pytest.approx(expected, rel=1e-10, abs=1e-12), name
        assert n_grouped == 2 * 2 * (1 + 6) and np.abs(grouped).max() > 1e-3
        # EAP's score is -d loss / d g at all gates 1 (read there with one shared residual per layer)
        problem = gqa_problems[True]
        loss = eqx.filter_jit(Problem.loss)
        checked = [gr.index(e) for e in ("embed->a1.g1.k", "a0.2->a1.g0.v", "mlp0->a1.3.q", "embed->a0.g0.k", "a1.0->logits")]
        eps = 1e-6
        for i in checked:
            up, down = np.ones(gr.n_gates), np.ones(gr.n_gates)
            up[i] += eps
            down[i] -= eps
            numeric = (float(loss(problem, up)) - float(loss(problem, down))) / (2 * eps)
            assert -grouped[i] == pytest.approx(numeric, rel=1e-6, abs=1e-9), gr.edges[i]
        assert np.abs(grouped[checked]).min() > 1e-6


# EAP-IG, learned masks and wrong-answer read the gates only through the gated forward and its
# gradient, which the EAP test above checks on the grouped graph; path patching has its own reads
METHOD_OPTIONS = {"path-patching": dict(threshold=0.01, max_nodes=3, chunk_size=1)}


@pytest.mark.filterwarnings("ignore:path patching stopped after max_nodes")
def test_the_edge_methods_run_on_the_grouped_graph_and_acdc_is_the_plain_loop(gqa_problems):
    """Path patching on the grouped graph (EAP above, AtP* below), and ACDC equal to the plain one-edge-at-a-time loop, whose visit order is written out independently."""
    from .test_acdc import plain_acdc

    problem = gqa_problems[True]
    with jax.enable_x64(True):
        for name in METHOD_OPTIONS:
            circuit = get_method(name).fn(problem, **METHOD_OPTIONS[name])
            assert circuit.graph == problem.graph, name
            scores = np.asarray(circuit.scores, np.float64)
            assert np.any(np.isfinite(scores)) and np.nanmax(np.abs(scores)) > 0, name
            assert np.isfinite(circuit.metric_value), name
            if name == "path-patching":
                assert any(".g" in e for e in circuit.kept), circuit.kept
        threshold = 0.05 * abs(problem.ablated_value() - problem.clean_value())
        expected = plain_acdc(problem, threshold)
        kept = set(get_method("acdc").fn(problem, threshold=threshold, max_batch=8).kept)
        assert kept == expected and 0 < len(kept) < problem.graph.n_gates
        assert any(".g" in e for e in kept) and any(".g" in e for e in set(problem.graph.edges) - kept)


def test_atp_star_qk_fix_is_exact_for_grouped_keys():
    """One attention layer, no norm, logit_diff: the QK fix is exact, and a grouped k edge's is the
    sum over its group's heads of each head's pattern change."""
    from acdc_jax.methods._gradients import exact_unit_effects
    from acdc_jax.methods.atp_star import atp_estimates

    from .test_gradient_methods import _random_model, _toy_task

    cfg = aj.TransformerConfig(n_layers=1, n_heads=4, n_kv_heads=2, d_model=8, d_head=4, d_vocab=11, n_ctx=6,
                               normalization=None, tied_unembed=False, positional="rotary")
    with jax.enable_x64(True):
        model = _random_model(cfg, 1, 1.0)
        problem = Problem.build(model, _toy_task(model, "logit_diff", seed=1), kv_groups=True, metric="logit_diff",
                                ablation="corrupt")
        exact = exact_unit_effects(problem)
        atp = atp_estimates(problem)[0]
    keys = np.array([".g" in e and e.endswith(".k") for e in problem.graph.edges])
    assert np.abs(exact[keys]).max() > 1e-2
    np.testing.assert_allclose(atp, exact, rtol=1e-9, atol=1e-9)


def test_mib_export_ungroups_kv_edges_by_splitting_scores():
    """MIB evaluates grouped-query models ungrouped (TransformerLens ``ungroup_grouped_query_attention``):
    each grouped k/v edge becomes its group's per-head ``<k>``/``<v>`` edges, kept alike, the score
    split evenly; reading the file back regroups exactly."""
    graph = Graph(2, 4, True, kv_heads=2)
    rng = np.random.RandomState(0)
    scores = rng.normal(size=graph.n_gates)
    scores[graph.index("embed->a0.g1.v")] = np.nan
    kept = ("a0.1->a1.g0.k", "embed->a1.2.q", "mlp1->logits")
    circuit = aj.Circuit(method="eap", task="t", graph=graph, scores=scores, kept=kept, metric="logit_diff",
                         ablation="corrupt", threshold=None, metric_value=None)
    doc = export.to_mib(circuit, d_model=32)
    assert len(doc["edges"]) == Graph(2, 4, True).n_edges
    for h in (0, 1):
        assert doc["edges"][f"a0.h1->a1.h{h}<k>"] == {"score": scores[graph.index("a0.1->a1.g0.k")] / 2, "in_graph": True}
    assert not doc["edges"]["a0.h1->a1.h2<k>"]["in_graph"]
    assert doc["edges"]["input->a1.h2<q>"] == {"score": scores[graph.index("embed->a1.2.q")], "in_graph": True}
    assert doc["edges"]["m0->a1.h3<v>"]["score"] == scores[graph.index("mlp0->a1.g1.v")] / 2
    assert doc["edges"]["input->a0.h3<v>"]["score"] == 0.0  # NaN: unscored
    assert sum(e["in_graph"] for e in doc["edges"].values()) == 4
    back = export.from_mib(doc)
    assert back.graph == graph and set(back.kept) == set(kept)
    np.testing.assert_array_equal(back.scores, scores)  # halves of floats add up exactly
    with pytest.raises(export.ExportError, match="ungroup_kv"):
        export.to_acdc(circuit)
    ungrouped = export.ungroup_kv(circuit)
    assert ungrouped.graph == Graph(2, 4, True) and set(export.regroup_kv(ungrouped, graph).kept) == set(kept)


def test_cli_info_counts_grouped_kv_edges(tmp_path):
    import transformers
    from typer.testing import CliRunner

    from acdc_jax.cli import app

    transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             intermediate_size=48, vocab_size=23).save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["info", "--model", str(tmp_path)])
    assert result.exit_code == 0, result.output
    per_head, grouped = (f"{Graph(2, 4, True, kv_heads=k).n_edges:,}" for k in (None, 2))
    assert per_head in result.output and grouped in result.output and "k/v per key/value head" in result.output


def test_dataclass_round_trip_keeps_kv_heads():
    graph = Graph(2, 4, True, kv_heads=2)
    assert Graph(**dataclasses.asdict(graph)) == graph


def test_readme_grouped_edge_counts():
    """The README's k/v-per-key/value-head counts are the graph's, for the real checkpoints' shapes."""
    import re
    from pathlib import Path

    import transformers

    from acdc_jax.models.families import FAMILIES

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shapes = {
        "Qwen2.5-0.5B": ("qwen2", transformers.Qwen2Config(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                                           hidden_size=896, intermediate_size=4864)),
        "Llama-3.1-8B, Mistral-7B": ("llama", transformers.LlamaConfig(num_hidden_layers=32, num_attention_heads=32,
                                                                       num_key_value_heads=8)),
        "Gemma-2-2B": ("gemma2", transformers.Gemma2Config()),
    }
    for name, (family, hf) in shapes.items():
        config = FAMILIES[family].config_from_hf(hf.to_dict())
        row = re.search(rf"\| {re.escape(name)} \| (\d+) x (\d+) \| ([\d,]+) \(([\d,]+)\) \| ([\d,]+) \((\d+)\) \|", readme)
        layers, heads, edges, _, grouped, kv_heads = (int(g.replace(",", "")) for g in row.groups())
        assert (layers, heads, kv_heads) == (config.n_layers, config.n_heads, config.kv_heads)
        assert edges == Graph.from_model(config).n_edges
        assert grouped == Graph.from_model(config, kv_groups=True).n_edges


def test_grouped_circuits_are_drawn_per_query_head(tmp_path):
    from acdc_jax import viz

    graph = Graph(2, 4, True, kv_heads=2)
    scores = np.random.RandomState(1).normal(size=graph.n_gates)
    circuit = aj.Circuit(method="eap", task="t", graph=graph, scores=scores, kept=("a0.1->a1.g0.k", "a1.0->logits"),
                         metric="logit_diff", ablation="corrupt")
    assert viz.draw_circuit(circuit, tmp_path / "c.svg").stat().st_size > 0
    dot = viz.to_dot(circuit)
    assert "g0" not in dot and dot.count("->") == viz.to_dot(export.ungroup_kv(circuit)).count("->")
    assert viz.plot_scores(circuit, tmp_path / "s.png", per_edge=True).stat().st_size > 0
