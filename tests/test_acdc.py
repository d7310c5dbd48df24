"""ACDC: the batched implementation against a plain sequential loop, recovery of known circuits, resume."""

import json
import os
import signal

import equinox as eqx
import jax
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax.evaluate import precision_recall, roc_auc
from acdc_jax import acdc
from acdc_jax.methods import CheckpointMismatch, Problem, discover
from acdc_jax.tasks import Task, get_task

from .conftest import TINY_CONFIGS
from .planted import PLANTED_EDGES, planted_problem, planted_task


def plain_acdc(problem: Problem, threshold: float, abs_value: bool = False, nodes=None, scores=None) -> set[str]:
    """ACDC written plainly: one edge at a time, a full forward pass for every evaluation. With
    ``nodes``, edges with an endpoint outside them start at 0 and are never tested; ``scores``
    (a dict) receives each tested edge's result."""
    graph = problem.graph
    jitted = eqx.filter_jit(Problem.loss)
    gates = np.ones(graph.n_gates, np.float32)
    skipped = set()
    if nodes is not None:
        nodes = set(nodes) | {"embed", "logits"}
        for e in graph.edges:
            src, dst = graph.split_edge(e)
            owner = dst if dst == "logits" or dst.startswith("mlp") else ".".join(dst.split(".")[:2])
            if src not in nodes or owner not in nodes:
                gates[graph.index(e)] = 0
                skipped.add(e)

    def loss(g):
        return jitted(problem, g)

    order = ["logits"]
    heads = list(reversed(range(graph.n_heads)))
    kinds = ("v", "k", "q") if graph.qkv_split else (None,)
    for layer in reversed(range(graph.n_layers)):
        if graph.has_mlp:
            order.append(f"mlp{layer}")
        if graph.internal_edges:
            order += [("internal", f"a{layer}.{h}.{t}", f"a{layer}.{h}") for t in kinds for h in heads]
        if graph.kv_heads:  # grouped k/v inputs: v then k, last group first; then the queries
            order += [f"a{layer}.g{j}.{t}" for t in "vk" for j in reversed(range(graph.kv_heads))]
            order += [f"a{layer}.{h}.q" for h in heads]
        else:
            order += [f"a{layer}.{h}.{t}" if t else f"a{layer}.{h}" for t in kinds for h in heads]

    def senders(dst):  # latest block first, the heads of one layer head 0 first
        srcs = set(graph.sources_of(dst))
        out = []
        for layer in reversed(range(graph.n_layers)):
            out += [f"mlp{layer}"] + [f"a{layer}.{h}" for h in range(graph.n_heads)]
        return [s for s in out + ["embed"] if s in srcs]

    for item in order:
        if isinstance(item, tuple):  # the edge a.h.t -> a.h
            _, inp, head = item
            edges, owner, via = [f"{inp}->{head}"], head, None
        else:
            edges = [f"{src}->{item}" for src in senders(item)]
            owner = item if item in ("logits",) or item.startswith("mlp") else ".".join(item.split(".")[:2])
            via = f"{item}->{owner}" if graph.internal_edges and item.count(".") == 2 else None
        owners = (graph.heads_fed(item) or (owner,)) if isinstance(item, str) else (owner,)
        used = owner == "logits" or any(
            gates[graph.index(e)] for e in graph.edges if graph.split_edge(e)[0] in owners
        )
        if via is not None and not gates[graph.index(via)]:
            used = False
        if not used:
            for e in edges:
                gates[graph.index(e)] = 0
            continue
        for e in edges:
            if e in skipped:
                continue
            before = float(loss(gates))
            gates[graph.index(e)] = 0
            result = float(loss(gates)) - before
            if scores is not None:
                scores[e] = result
            if (abs(result) if abs_value else result) >= threshold:
                gates[graph.index(e)] = 1
    return {graph.name(i) for i in np.flatnonzero(gates)}


def test_visit_order_is_acdcs_on_a_two_layer_model_with_mlps():
    """TLACDCExperiment's order, written out by hand: layers from the last; in a layer the MLP input,
    the internal edges for v, k, q (last head first), then the v, k, q inputs (last head first);
    into one destination the latest block first, the heads of one layer head 0 first."""
    from acdc_jax.methods.acdc import visit_order

    cfg = aj.TransformerConfig(n_layers=2, n_heads=2, d_model=8, d_head=4, d_mlp=8, d_vocab=11, n_ctx=4)
    graph = aj.Graph.from_model(aj.init_model(cfg, jax.random.PRNGKey(0)), qkv_split=True, internal_edges=True)
    into = {
        "logits": ["mlp1", "a1.0", "a1.1", "mlp0", "a0.0", "a0.1", "embed"],
        "mlp1": ["a1.0", "a1.1", "mlp0", "a0.0", "a0.1", "embed"],
        "a1": ["mlp0", "a0.0", "a0.1", "embed"],
        "mlp0": ["a0.0", "a0.1", "embed"],
        "a0": ["embed"],
    }
    expected = [f"{s}->logits" for s in into["logits"]] + [f"{s}->mlp1" for s in into["mlp1"]]
    for layer in (1, 0):
        if layer == 0:
            expected += [f"{s}->mlp0" for s in into["mlp0"]]
        expected += [f"a{layer}.{h}.{t}->a{layer}.{h}" for t in "vkq" for h in (1, 0)]
        expected += [f"{s}->a{layer}.{h}.{t}" for t in "vkq" for h in (1, 0) for s in into[f"a{layer}"]]
    got = [graph.gate_names[u] for group in visit_order(graph) for u in group.units]
    assert got == expected
    assert sorted(got) == sorted(graph.gate_names)  # every edge exactly once
    without = aj.Graph.from_model(aj.init_model(cfg, jax.random.PRNGKey(0)), qkv_split=True)
    got = [without.gate_names[u] for group in visit_order(without) for u in group.units]
    assert got == [e for e in expected if e.count("->") and not e.split("->")[0].count(".") == 2]


def _random_problem(config_name, qkv_split=True, internal_edges=False, seed=0):
    cfg = TINY_CONFIGS[config_name]
    model = aj.init_model(cfg, jax.random.PRNGKey(seed), std=0.5)
    rng = np.random.RandomState(seed)
    clean = rng.randint(0, cfg.d_vocab, (4, cfg.n_ctx - 2))
    corrupt = rng.randint(0, cfg.d_vocab, clean.shape)
    task = Task(
        name="random",
        clean=clean,
        corrupt=corrupt,
        positions=np.tile(np.arange(clean.shape[1]), (4, 1)),
        metric="kl",
    )
    return Problem.build(model, task, qkv_split=qkv_split, internal_edges=internal_edges)


@pytest.mark.parametrize("config_name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("graph_kind", ["qkv", "head", "internal"])
def test_batched_acdc_equals_plain_loop_on_random_models(config_name, graph_kind):
    problem = _random_problem(config_name, qkv_split=graph_kind != "head", internal_edges=graph_kind == "internal")
    gap = problem.ablated_value() - problem.clean_value()  # KL of the fully ablated model
    sizes = []
    for threshold in (0.002 * gap, 0.02 * gap, 0.2 * gap):  # the same fractions for every model
        expected = plain_acdc(problem, threshold)
        circuit = acdc(problem, threshold=threshold, max_batch=8)
        assert set(circuit.kept) == expected, (threshold, set(circuit.kept) ^ expected)
        sizes.append(len(expected))
    assert any(0 < size < problem.graph.n_gates for size in sizes), sizes  # the comparison is not vacuous


@pytest.mark.parametrize("task_name", ["tracr-reverse", "tracr-xproportion"])
@pytest.mark.parametrize("ablation", ["zero", "corrupt"])
def test_batched_acdc_equals_plain_loop_on_tracr(task_name, ablation):
    problem = Problem.build(aj.load_model(task_name), get_task(task_name), ablation=ablation, metric="l2")
    for threshold in (1e-6, 1e-3, 0.05):
        for abs_value in (False, True):
            expected = plain_acdc(problem, threshold, abs_value)
            circuit = acdc(problem, threshold=threshold, abs_value=abs_value, max_batch=16)
            assert set(circuit.kept) == expected, (threshold, abs_value, set(circuit.kept) ^ expected)


@pytest.mark.parametrize("restricted", [False, True])
def test_restricted_acdc_equals_the_plain_loop_start_to_end(restricted):
    """With ``nodes`` the out-of-scope edges are 0 from the start, also below the layer being
    visited: every batch must see them (the cache comes from the gated run, not the clean one).
    The plain loop runs in float64, so that the scores are compared with exact ones (a float32
    plain loop is itself about 1e-6 off on these weights of std 1)."""
    cfg = TINY_CONFIGS["gpt2-like"]
    model = aj.init_model(cfg, jax.random.PRNGKey(5), std=1.0)
    rng = np.random.RandomState(5)
    clean = rng.randint(0, cfg.d_vocab, (3, cfg.n_ctx - 2))
    task = Task(name="random", clean=clean, corrupt=rng.randint(0, cfg.d_vocab, clean.shape),
                positions=np.tile(np.arange(clean.shape[1]), (3, 1)), metric="kl")
    problem = Problem.build(model, task)
    graph = problem.graph
    nodes = {"a0.0", "a0.2", "a1.0", "a1.1", "mlp1"} if restricted else None  # a0.1, mlp0, a1.2 out
    gap = problem.ablated_value() - problem.clean_value()
    for threshold in (0.01 * gap, 0.05 * gap):
        scores = {}
        with jax.enable_x64(True):
            exact = Problem.build(jax.tree.map(lambda x: x.astype(np.float64) if eqx.is_inexact_array(x) else x, model), task)
            expected = plain_acdc(exact, threshold, nodes=nodes, scores=scores)
        circuit = acdc(problem, threshold=threshold, max_batch=8, nodes=nodes)
        assert set(circuit.kept) == expected, (threshold, set(circuit.kept) ^ expected)
        assert 0 < len(expected) < graph.n_gates
        tested = {graph.name(i) for i in np.flatnonzero(~np.isnan(circuit.scores) & (circuit.scores != 0))}
        assert tested <= set(scores)
        np.testing.assert_allclose([circuit.score(e) for e in tested], [scores[e] for e in tested], atol=1e-6)
        gates = np.zeros(graph.n_gates, np.float32)
        gates[[graph.index(e) for e in expected]] = 1
        np.testing.assert_allclose(circuit.metric_value, problem.evaluate(gates), atol=1e-6)


def test_scores_are_the_metric_change_each_removal_caused():
    problem = _random_problem("gpt2-like")
    circuit = acdc(problem, threshold=0.01, max_batch=4)
    jitted = eqx.filter_jit(Problem.loss)

    def loss(g):
        return jitted(problem, g)

    # replay the decisions in visit order and recompute each tested edge's result with full forwards
    from acdc_jax.methods.acdc import visit_order

    gates = np.ones(problem.graph.n_gates, np.float32)
    kept = circuit.kept_mask()
    checked = 0
    for group in visit_order(problem.graph):
        for unit in group.units:
            if np.isnan(circuit.scores[unit]):
                continue
            before = float(loss(gates))
            gates[unit] = 0
            after = float(loss(gates))
            if circuit.scores[unit] != 0 or after != before:
                np.testing.assert_allclose(circuit.scores[unit], after - before, atol=2e-6)
                checked += 1
            gates[unit] = float(kept[unit])
    assert checked > 20


def test_acdc_recovers_the_planted_circuit():
    for max_batch in (1, 4, 64):
        circuit = acdc(planted_problem(ablation="zero"), threshold=1e-3, max_batch=max_batch)
        assert sorted(circuit.kept) == sorted(PLANTED_EDGES)


def test_acdc_recovers_the_planted_circuit_at_both_granularities():
    per_head = acdc(planted_problem(ablation="zero", qkv_split=False), threshold=1e-3)
    assert set(per_head.kept) == {"embed->a0.0", "a0.0->a1.0", "embed->a1.0", "a1.0->logits"}
    assert set(per_head.kept) == planted_task().canonical.gate_names(per_head.graph)


@pytest.mark.parametrize("task_name", ["tracr-reverse", "tracr-xproportion"])
def test_acdc_recovers_tracr_ground_truth_under_zero_ablation(task_name):
    """The ground truth was made by ACDC with zero ablation, so at a small threshold it is found exactly."""
    circuit = discover(task_name, task_name, "acdc", threshold=1e-6, ablation="zero")
    task = get_task(task_name)
    assert set(circuit.kept) == set(task.canonical.gate_names(circuit.graph))
    assert circuit.extra["auc"] == 1.0
    with_internal = discover(task_name, task_name, "acdc", threshold=1e-6, ablation="zero", internal_edges=True)
    assert set(with_internal.kept) == set(task.canonical.gate_names(with_internal.graph))


@pytest.mark.parametrize("task_name", ["tracr-reverse", "tracr-xproportion"])
def test_acdc_under_corrupted_patching_finds_what_patching_can_see(task_name, capsys):
    """What ACDC promises under any ablation: every kept edge moved the loss by at least tau when
    it was tested, and the pruned circuit's loss exceeds the full model's by less than tau per
    pruned edge. Against the tracr ground truth (made with zero ablation) it can only find edges
    whose ablation changes the output under this corruption: the shared README's diagnostics list
    those with zero single-edge effect (reverse: 4 of 10 under ACDC's scrambled positions), and
    the run matches them exactly: recall = the visible fraction, with no false positive."""
    task = get_task(task_name)
    folder = aj.models.models_dir() / "tracr" / task_name.split("-")[1]
    diagnostics = json.loads((folder / "ground_truth_edges.json").read_text())["diagnostics_seed1234_validation"]
    effects = diagnostics["merged_embed"]["corrupted_acdc"]["metric_remove_one_gt_edge_from_full_model"]
    invisible = {e for e, v in effects.items() if v == 0.0}
    tau = 1e-6
    circuit = discover(task_name, task, "acdc", threshold=tau, ablation="corrupt")
    labels = task.canonical.labels(circuit.graph)
    precision, recall = precision_recall(circuit.kept_mask(), labels)
    auc = roc_auc(circuit.scores, labels)
    with capsys.disabled():
        print(f"\n{task_name}, ACDC with ACDC's corrupted run: precision {precision:.3f} recall {recall:.3f} AUC {auc:.3f}")
    kept = circuit.kept_mask()
    assert np.all(circuit.scores[kept] >= tau)
    pruned = int((~kept & ~np.isnan(circuit.scores)).sum())
    assert circuit.metric_value < tau * pruned
    assert set(circuit.kept) == set(task.canonical.gate_names(circuit.graph)) - invisible
    assert precision == 1.0 and recall == pytest.approx(1 - len(invisible) / labels.sum())


def test_resume_after_interruption_gives_the_identical_circuit(tmp_path):
    problem = _random_problem("gpt2-like", internal_edges=True)
    full = acdc(problem, threshold=0.01, max_batch=4)
    calls = {"n": 0}

    def interrupt_after_a_few_batches(_):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt

    ckpt = tmp_path / "acdc.json"
    with pytest.raises(KeyboardInterrupt):
        acdc(problem, threshold=0.01, max_batch=4, checkpoint=ckpt, checkpoint_every=0.0, progress=interrupt_after_a_few_batches)
    saved = json.loads(ckpt.read_text())
    assert not saved["finished"] and 0 < saved["state"]["group"] < len(full.graph.destinations) + 48
    resumed = acdc(problem, threshold=0.01, max_batch=4, checkpoint=ckpt)
    assert resumed.kept == full.kept
    np.testing.assert_array_equal(resumed.scores, full.scores)
    with pytest.raises(CheckpointMismatch, match="different ACDC run"):
        acdc(problem, threshold=0.02, max_batch=4, checkpoint=ckpt)


def test_same_seed_gives_the_same_circuit_whatever_the_batching():
    """The model and prompts rebuilt from the same seed give the same circuit with other batch and
    chunk sizes (the speculation changes, the decisions must not); another seed gives another one,
    so the comparison can tell circuits apart."""
    problem = _random_problem("attn-only", seed=3)
    threshold = 0.02 * (problem.ablated_value() - problem.clean_value())
    a = acdc(problem, threshold=threshold, max_batch=64, chunk_size=8)
    b = acdc(_random_problem("attn-only", seed=3), threshold=threshold, max_batch=2, chunk_size=2)
    assert 0 < a.n_kept < problem.graph.n_gates and a.kept == b.kept
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-6 * np.nanmax(np.abs(a.scores)), equal_nan=True)
    other = acdc(_random_problem("attn-only", seed=4), threshold=threshold, max_batch=64, chunk_size=8)
    assert other.kept != a.kept


def test_node_restriction_prunes_the_search_space():
    problem = planted_problem(ablation="zero")
    nodes = acdc(planted_problem(ablation="zero", level="node"), threshold=1e-3)
    assert set(nodes.kept) == {"embed", "a0.0", "a1.0"}
    restricted = acdc(problem, threshold=1e-3, nodes=set(nodes.kept))
    assert sorted(restricted.kept) == sorted(PLANTED_EDGES)
    assert restricted.extra["evaluations"] < acdc(problem, threshold=1e-3).extra["evaluations"]


def test_circuit_json_round_trips(tmp_path):
    circuit = discover("tracr-xproportion", "tracr-xproportion", "acdc", threshold=1e-6)
    path = circuit.save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    for key in ("method", "task", "threshold", "edges", "circuit", "n_edges_total", "seconds", "auc"):
        assert key in data, key
    assert len(data["edges"]) == data["n_edges_total"] == circuit.graph.n_gates
    loaded = type(circuit).load(path)
    assert loaded.kept == circuit.kept and loaded.graph == circuit.graph
    np.testing.assert_array_equal(loaded.scores, circuit.scores)


def test_bad_input_fails_clearly():
    problem = planted_problem()
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        acdc(problem, threshold=-0.1)
    with pytest.raises(ValueError, match="unknown task 'tracr-revers'.*did you mean tracr-reverse"):
        discover("tracr-reverse", "tracr-revers", "acdc", threshold=0.1)
    with pytest.raises(ValueError, match="unknown method 'acdcc'.*did you mean acdc"):
        discover("tracr-reverse", "tracr-reverse", "acdcc", threshold=0.1)
    with pytest.raises(ValueError, match="must pair up position by position"):
        Task(name="bad", clean=np.zeros((2, 4), int), corrupt=np.zeros((2, 5), int), positions=np.zeros((2, 1), int), metric="kl")
    with pytest.raises(aj.GraphError, match="unknown edge 'embed->a9.0.q'"):
        acdc(problem, threshold=0.1).score("embed->a9.0.q")


def test_node_patching_and_the_node_prepass():
    from acdc_jax import node_patching

    problem = planted_problem(ablation="zero")
    nodes = node_patching(problem, threshold=1e-3)
    assert set(nodes.kept) == {"embed", "a0.0", "a1.0"}
    junk = [nodes.score(n) for n in ("a0.1", "a1.1", "mlp0", "mlp1")]
    assert junk == [0.0, 0.0, 0.0, 0.0] and nodes.score("a1.0") > 0
    fast = acdc(problem, threshold=1e-3, node_prepass=1e-3)
    assert sorted(fast.kept) == sorted(PLANTED_EDGES)
    assert set(fast.extra["node_prepass"]["kept"]) == {"embed", "a0.0", "a1.0"}


@pytest.mark.parametrize("signum, raised", [(signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_writes_the_checkpoint_before_exiting(tmp_path, signum, raised):
    problem = _random_problem("attn-only", seed=3)
    full = acdc(problem, threshold=0.01, max_batch=4)
    calls = {"n": 0}

    def signal_on_the_third_batch(_):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ckpt = tmp_path / "acdc.json"
    with pytest.raises(raised) as caught:  # checkpoint_every=1e9: only the signal can write the checkpoint
        acdc(problem, threshold=0.01, max_batch=4, checkpoint=ckpt, checkpoint_every=1e9, progress=signal_on_the_third_batch)
    if raised is SystemExit:
        assert caught.value.code == 143
    assert {s: signal.getsignal(s) for s in before} == before  # the run's handlers are gone
    saved = json.loads(ckpt.read_text())
    assert not saved["finished"] and calls["n"] == 3
    resumed = acdc(problem, threshold=0.01, max_batch=4, checkpoint=ckpt)
    assert resumed.kept == full.kept
    np.testing.assert_array_equal(resumed.scores, full.scores)
