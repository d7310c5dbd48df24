"""Top-down path patching: semantics against a plain reference, planted recovery, grouped patching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax import path_patching
from acdc_jax.methods import Problem, discover
from acdc_jax.models import build_model, expected_shapes
from acdc_jax.tasks import CanonicalCircuit, Task

from . import reference
from .conftest import TINY_CONFIGS
from .planted import PLANTED_EDGES, planted_problem


def _logit_diff_task(cfg, n_prompts=5, seed=0):
    rng = np.random.RandomState(seed)
    n_pos = cfg.n_ctx - 1
    clean = rng.randint(0, cfg.d_vocab, (n_prompts, n_pos))
    corrupt = rng.randint(0, cfg.d_vocab, clean.shape)
    answers = rng.randint(0, cfg.d_vocab_out, (n_prompts, 1))
    wrong = (answers + 1 + rng.randint(0, cfg.d_vocab_out - 1, answers.shape)) % cfg.d_vocab_out
    return Task(
        name="random-logit-diff",
        clean=clean,
        corrupt=corrupt,
        positions=np.full((n_prompts, 1), n_pos - 1),
        metric="logit_diff",
        answers=answers,
        wrong_answers=wrong,
        labels={"A": np.full(n_prompts, 2), "END": np.full(n_prompts, n_pos - 1)},
    )


def _open_out_edges(graph, node, n_pos):
    """Pass-2 gates ``[n_pos, n_gates]``: 1 on every edge out of ``node`` (live), 0 elsewhere."""
    gates = np.zeros((n_pos, graph.n_gates))
    for e, name in enumerate(graph.edges):
        if graph.split_edge(name)[0] == node:
            gates[:, e] = 1.0
    return gates


def _second_pass_effect(model, graph, task, loss, node, gates, sources, clean_values):
    """Pass 2 by hand: every gate at 0 reads the clean values except that ``node``'s output is its
    pass-1 (patched) value from ``sources``; the loss with it minus the loss without it."""
    swapped = clean_values.copy()
    swapped[graph.sources.index(node)] = sources[graph.sources.index(node)]
    return (loss(reference.gated_logits(model, graph, task.clean, gates, swapped))
            - loss(reference.gated_logits(model, graph, task.clean, gates, clean_values)))


def test_effects_flow_only_through_found_edges():
    """Each kept connection into a layer-1 head, recomputed by hand in float64: pass 1 patches the
    sender into the head's input at one position; pass 2 swaps the head's new output in only on its
    found edge into the logits, everything else clean."""
    with jax.enable_x64(True):
        model = aj.init_model(TINY_CONFIGS["attn-only"], jax.random.PRNGKey(4), std=0.6).astype(jnp.float64)
        task = _logit_diff_task(model.config)
        problem = Problem.build(model, task, metric="logit_diff")
        circuit = path_patching(problem, threshold=0.02, relative=True)
        graph = problem.graph
        end = task.labels["END"][0]
        corrupt_values = np.asarray(problem.run.ablation.values)
        _, clean_values = reference.gated_logits(model, graph, task.clean, np.ones(graph.n_gates), corrupt_values, return_sources=True)
        direct = {p["senders"][0] for p in circuit.extra["paths"] if p["receiver"] == "logits"}

        def loss(logits):
            last = logits[np.arange(len(task.clean)), task.positions[:, 0]]
            picked = np.take_along_axis(last, task.answers, 1) - np.take_along_axis(last, task.wrong_answers, 1)
            return -picked.mean()

        checked = 0
        for path in circuit.extra["paths"]:
            head = path["receiver"].rsplit(".", 1)[0]
            if not path["receiver"].startswith("a1.") or len(path["senders"]) != 1:
                continue
            assert head in direct
            n_pos = task.clean.shape[1]
            first = np.ones((n_pos, graph.n_gates))
            first[path["position"], graph.index(f"{path['senders'][0]}->{path['receiver']}")] = 0.0
            _, sources = reference.gated_logits(model, graph, task.clean, first, corrupt_values, return_sources=True)
            second = _open_out_edges(graph, head, n_pos)
            second[end, graph.index(f"{head}->logits")] = 0.0
            effect = _second_pass_effect(model, graph, task, loss, head, second, sources, clean_values)
            np.testing.assert_allclose(path["effect"], effect, rtol=1e-8, atol=1e-10)
            checked += 1
        assert checked >= 2


@pytest.mark.parametrize("grouped", [False, True])
def test_path_patching_recovers_the_planted_circuit(grouped):
    """Outside the planted edges every effect is exactly zero, so any threshold below the smallest
    planted effect (0.0024 nats: one position of a hard-attention key) recovers it exactly."""
    circuit = path_patching(planted_problem(ablation="zero", metric="nll"), threshold=1e-3, grouped=grouped)
    assert sorted(circuit.kept) == sorted(PLANTED_EDGES)
    junk = [s for e, s in zip(circuit.graph.edges, circuit.scores) if e not in PLANTED_EDGES and not np.isnan(s)]
    assert junk and max(abs(s) for s in junk) == 0.0
    assert circuit.extra["composition"]["k"] > 0 and circuit.extra["composition"]["q"] > 0


def _distributed_model(n_heads=6, signs=None):
    """One layer of heads that each copy the current token into the output with weight 1/n_heads
    (times ``signs[h]``, default +1): each head alone matters little, together they carry the answer."""
    vocab, n_ctx = 5, 4
    cfg = aj.TransformerConfig(
        n_layers=1, n_heads=n_heads, d_model=2 * vocab, d_head=vocab, d_mlp=None, d_vocab=vocab, n_ctx=n_ctx,
        normalization=None, causal=True, attn_scale=1.0, tied_unembed=False,
    )
    w = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(cfg).items()}
    w["embed.W_E"][:, :vocab] = np.eye(vocab)
    for h in range(n_heads):
        w["blocks.attn.W_V"][0, h, :vocab, :] = np.eye(vocab)
        w["blocks.attn.W_O"][0, h, :, vocab:] = (1.0 if signs is None else signs[h]) * np.eye(vocab) / n_heads
    w["unembed.W_U"][vocab:, :] = 6.0 * np.eye(vocab)
    model = build_model(cfg, w)
    clean = np.array([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]])
    task = Task(
        name="distributed",
        clean=clean,
        corrupt=(clean + 1) % vocab,
        positions=np.full((3, 1), 3),
        metric="logit_diff",
        answers=clean[:, :1],
        wrong_answers=(clean[:, :1] + 1) % vocab,
        labels={"END": np.full(3, 3)},
        canonical=CanonicalCircuit(tuple(f"a0.{h}->logits" for h in range(n_heads)), (), "corrupt", "by construction"),
    )
    return model, task


def _two_hop_model(n_heads=6):
    """Two layers of n heads, each head attending to its own position (positions in their own
    subspace, queries and keys reading them sharply). Layer 0's heads each copy the token (subspace A)
    into B with weight 1/n; layer 1's heads each copy B into C with weight 1/n; the unembedding reads
    C. The circuit is embed -> every a0 head's value -> every a1 head's value -> logits, all at END,
    and every single edge of it carries 1/n (or 1/n^2) of the effect."""
    vocab, n_ctx = 5, 4
    A, B, C = (slice(i * vocab, (i + 1) * vocab) for i in range(3))
    P = slice(3 * vocab, 3 * vocab + n_ctx)
    cfg = aj.TransformerConfig(
        n_layers=2, n_heads=n_heads, d_model=3 * vocab + n_ctx, d_head=vocab, d_mlp=None, d_vocab=vocab, n_ctx=n_ctx,
        normalization=None, causal=True, attn_scale=1.0, tied_unembed=False,
    )
    w = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(cfg).items()}
    w["embed.W_E"][:, A] = np.eye(vocab)
    w["embed.W_pos"][:, P] = np.eye(n_ctx)
    for layer, (read, write) in enumerate([(A, B), (B, C)]):
        for h in range(n_heads):
            w["blocks.attn.W_Q"][layer, h, P, :n_ctx] = np.sqrt(40.0) * np.eye(n_ctx)
            w["blocks.attn.W_K"][layer, h, P, :n_ctx] = np.sqrt(40.0) * np.eye(n_ctx)
            w["blocks.attn.W_V"][layer, h, read, :] = np.eye(vocab)
            w["blocks.attn.W_O"][layer, h, :, write] = np.eye(vocab) / n_heads
    w["unembed.W_U"][C, :] = 6.0 * np.eye(vocab)
    model = build_model(cfg, w)
    clean = np.array([[1, 0, 2, 1], [2, 3, 0, 2], [3, 1, 4, 3]])
    corrupt = clean.copy()
    corrupt[:, 3] = (clean[:, 3] + 1) % vocab
    circuit = (["embed->a0.%d.v" % h for h in range(n_heads)]
               + [f"a0.{g}->a1.{h}.v" for g in range(n_heads) for h in range(n_heads)]
               + [f"a1.{h}->logits" for h in range(n_heads)])
    task = Task(
        name="two-hop", clean=clean, corrupt=corrupt, positions=np.full((3, 1), 3), metric="logit_diff",
        answers=clean[:, 3:], wrong_answers=(clean[:, 3:] + 1) % vocab, labels={"END": np.full(3, 3)},
        canonical=CanonicalCircuit(tuple(circuit), (), "corrupt", "by construction"),
    )
    return model, task


def test_grouped_patching_recovers_a_distributed_two_hop_circuit():
    """No single edge passes (each carries 1/6 of the gap, or 1/36), so plain path patching finds
    nothing; grouped mode finds the layer-1 group into the logits, expands it as a group (its members'
    values patched together) to the layer-0 group, and that one to the embedding: the whole circuit,
    at END only, and the circuit evaluated at its positions has the clean model's metric."""
    model, task = _two_hop_model()
    problem = Problem.build(model, task, metric="logit_diff")
    clean, ablated = problem.clean_value(), problem.ablated_value()
    assert clean == pytest.approx(6.0, abs=1e-4) and ablated == pytest.approx(-6.0, abs=1e-4)
    plain = path_patching(problem, threshold=0.25, relative=True)
    assert plain.kept == ()
    grouped = path_patching(problem, threshold=0.25, relative=True, grouped=True)
    assert set(grouped.kept) == set(task.canonical.edges)
    assert {k["position"] for k in grouped.extra["kept_positions"]} == {3}
    assert abs(grouped.metric_value - clean) <= 0.05 * abs(clean)
    units = {(tuple(p["senders"]), p["receiver"].split("+")[0]) for p in grouped.extra["paths"]}
    heads = lambda layer: tuple(f"a{layer}.{h}" for h in range(6))  # noqa: E731
    assert units == {(heads(1), "logits"), (heads(0), "a1.0.v"), (("embed",), "a0.0.v")}
    # without the group of layer 1 the circuit is the fully ablated model: that is what the old search kept
    only_direct = problem.evaluate(problem.graph.gates_from_names([f"a1.{h}->logits" for h in range(6)]))
    assert only_direct == pytest.approx(ablated, abs=1e-3)


def test_grouped_search_finds_a_superset_of_the_plain_one():
    """A random model with MLPs: every (edge, position) the plain search keeps, grouped mode keeps."""
    model = aj.init_model(TINY_CONFIGS["gpt2-like"], jax.random.PRNGKey(2), std=0.5)
    problem = Problem.build(model, _logit_diff_task(model.config), metric="logit_diff")
    plain = path_patching(problem, threshold=0.3, relative=True)  # at 0.3 of the gap a layer group passes
    grouped = path_patching(problem, threshold=0.3, relative=True, grouped=True)
    pairs = lambda c: {(k["edge"], k["position"]) for k in c.extra["kept_positions"]}  # noqa: E731
    assert pairs(plain) and pairs(plain) < pairs(grouped)
    assert any(len(p["senders"]) > 1 for p in grouped.extra["paths"])


def test_alike_heads_are_grouped_in_the_summary():
    model, task = _distributed_model(n_heads=3)
    circuit = path_patching(Problem.build(model, task, metric="logit_diff"), threshold=0.5)
    assert circuit.extra["head_groups"] == [["a0.0", "a0.1", "a0.2"]]
    assert circuit.extra["summary"].splitlines()[0] == "G1 = {a0.0, a0.1, a0.2}"
    assert "G1 -> logits at END" in circuit.extra["summary"]
    # a head writing the opposite way has the opposite signature: it is kept, but in a group of its own
    model, task = _distributed_model(n_heads=3, signs=(1.0, -1.0, 1.0))
    circuit = path_patching(Problem.build(model, task, metric="logit_diff"), threshold=0.5)
    assert {"a0.0->logits", "a0.1->logits", "a0.2->logits"} <= set(circuit.kept)
    assert sorted(circuit.extra["head_groups"]) == [["a0.0", "a0.2"], ["a0.1"]]
    assert circuit.extra["signed_scores"]["a0.1->logits"] < 0 < circuit.extra["signed_scores"]["a0.0->logits"]


def test_path_patching_through_discover_and_its_errors():
    circuit = discover("tracr-xproportion", "tracr-xproportion", "path-patching", threshold=1e-4, ablation="zero")
    assert circuit.method == "path-patching" and "auc" in circuit.extra
    with pytest.raises(ValueError, match="Q, K and V composition separately"):
        path_patching(planted_problem(qkv_split=False), threshold=0.1)
    model, task = _distributed_model()
    shifted = dict(task.labels, END=np.array([3, 2, 3]))
    bad = Task(**{**task.__dict__, "labels": shifted})
    with pytest.raises(ValueError, match="label 'END' sits at different positions"):
        path_patching(Problem.build(model, bad), threshold=0.1)


def _reference_path_patching(model, graph, task, cut, corrupt_values, labels):
    """Plain float64 top-down path patching, one patched forward per path (pass 1) and one per
    measurement through the found edges (pass 2), nodes in exact reverse topological order."""
    n_pos = task.clean.shape[1]

    def loss(logits):
        last = logits[np.arange(len(task.clean)), task.positions[:, 0]]
        picked = np.take_along_axis(last, task.answers, 1) - np.take_along_axis(last, task.wrong_answers, 1)
        return -picked.mean()

    ones = np.ones((n_pos, graph.n_gates))
    clean_logits, clean_values = reference.gated_logits(model, graph, task.clean, ones, corrupt_values, return_sources=True)
    ref_loss = loss(clean_logits)
    order = ["logits"] + list(graph.sources[::-1])  # reverse topological
    frontier = {name: set() for name in order}
    frontier["logits"] = {int(p) for p in task.positions[0]}
    found = {}  # (src, dst input, position) -> effect
    causal = model.config.causal
    for node in order:
        for pos in sorted(frontier[node], reverse=True):
            if node == "logits" or node.startswith("mlp"):
                inputs = [(node, pos)]
            else:
                earlier = sorted({p for p in labels.values() if p <= pos or not causal})
                inputs = [(f"{node}.q", pos)] + [(f"{node}.{t}", p) for t in "kv" for p in earlier]
            for dst, p in inputs:
                for src in graph.sources_of(dst):
                    first = ones.copy()
                    first[p, graph.index(f"{src}->{dst}")] = 0.0
                    if node == "logits":
                        effect = loss(reference.gated_logits(model, graph, task.clean, first, corrupt_values)) - ref_loss
                    else:
                        _, sources = reference.gated_logits(model, graph, task.clean, first, corrupt_values, return_sources=True)
                        second = _open_out_edges(graph, node, n_pos)
                        for (s, d, q) in found:
                            second[q, graph.index(f"{s}->{d}")] = 0.0 if s == node else 1.0
                        effect = _second_pass_effect(model, graph, task, loss, node, second, sources, clean_values)
                    if abs(effect) >= cut:
                        found[(src, dst, p)] = effect
                        if src != "embed":
                            frontier[src].add(p)
    return found


@pytest.mark.parametrize("seed", [1])
def test_path_patching_equals_an_independent_float64_reference(seed):
    """Random 2-layer models with LayerNorm and MLPs (heads of a layer feed its MLP, so the expansion
    order matters): the same kept (edge, position) set and every kept path's effect to 1e-6."""
    with jax.enable_x64(True):
        model = aj.init_model(TINY_CONFIGS["gpt2-like"], jax.random.PRNGKey(seed), std=0.5).astype(jnp.float64)
        task = _logit_diff_task(model.config, n_prompts=3, seed=seed)
        problem = Problem.build(model, task, metric="logit_diff")
        circuit = path_patching(problem, threshold=0.03, relative=True)
        labels = {name: int(v[0]) for name, v in task.labels.items()}
        expected = _reference_path_patching(model, problem.graph, task, circuit.settings["cut"],
                                            np.asarray(problem.run.ablation.values), labels)
        got = {(p["senders"][0], p["receiver"], p["position"]): p["effect"] for p in circuit.extra["paths"]}
        assert len(got) == len(circuit.extra["paths"])  # every path measured once
        assert any(d.startswith("mlp1") and s.startswith("a1.") for s, d, _ in expected)  # head -> MLP of its layer
        assert sorted(got) == sorted(expected)
        for key, effect in expected.items():
            np.testing.assert_allclose(got[key], effect, rtol=1e-6, atol=1e-9, err_msg=str(key))
        # scores rank by |effect| (the largest over positions); the signed effect is kept alongside
        assert min(expected.values()) < 0 < max(expected.values())
        for edge in {f"{s}->{d}" for s, d, _ in expected}:
            effects = [e for (s, d, _), e in expected.items() if f"{s}->{d}" == edge]
            strongest = max(effects, key=abs)
            np.testing.assert_allclose(circuit.score(edge), abs(strongest), rtol=1e-6)
            np.testing.assert_allclose(circuit.extra["signed_scores"][edge], strongest, rtol=1e-6)


def test_truncation_is_recorded_and_unknown_labels_are_rejected():
    model, task = _distributed_model(n_heads=2)
    problem = Problem.build(model, task, metric="logit_diff")
    with pytest.raises(ValueError, match=r"unknown position label\(s\) \['S2'\]; the task's labels are \['END'\]"):
        path_patching(problem, threshold=0.5, positions=["END", "S2"])
    with pytest.warns(UserWarning, match="truncated"):
        circuit = path_patching(problem, threshold=0.5, max_nodes=1)
    assert circuit.extra["truncated"] is True
    assert path_patching(problem, threshold=0.5).extra["truncated"] is False
