"""Position-aware circuits: edges per token position (or labelled span) for EAP, EAP-IG and ACDC."""

import json

import jax
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax import export, viz
from acdc_jax.methods import Circuit, Problem
from acdc_jax.methods._positions import PositionUnits, resolve_positions
from acdc_jax.methods.acdc import acdc
from acdc_jax.methods.eap_ig import eap_ig
from acdc_jax.models import TransformerConfig, build_model, expected_shapes
from acdc_jax.tasks import Task

from .conftest import TINY_CONFIGS
from .reference import gated_logits

# ------------------------------------------------------------------------------------------------
# A planted model whose circuit uses each of its edges at one position only.
#
# Prompts ``BOS x1 x2 x3 x4``; the metric reads the last position, whose answer is x1. a0.0 is a
# previous-token head (q_i = S e_i, k_j = e_{j+1}, v = the token, written into ``prev``); a1.0's
# query exists only at the last position and points at position 2 (q_4 = S e_2, k_j = e_j), and it
# copies ``prev`` there (x1) into ``out``, which alone the unembedding reads. So a0.0's output is
# read by a1.0 only at position 2, a1.0's only at the last position, and so on: the circuit is
# seven (edge, position) units. The second head of each layer reads everything and writes only
# into ``junk``, which nothing reads.

VOCAB, N_POS, JUNK, SHARP = 5, 5, 3, 30.0
BLOCKS = {"tok": VOCAB, "pos": N_POS, "prev": VOCAB, "out": VOCAB, "junk": JUNK}
OFFSET = dict(zip(BLOCKS, np.cumsum([0] + list(BLOCKS.values()))[:-1].tolist()))
PLANTED_UNITS = {
    "embed->a0.0.q@2", "embed->a0.0.k@1", "embed->a0.0.v@1", "a0.0->a1.0.v@2",
    "embed->a1.0.q@4", "embed->a1.0.k@2", "a1.0->logits@4",
}


def _block(name):
    return slice(OFFSET[name], OFFSET[name] + BLOCKS[name])


def positional_model():
    cfg = TransformerConfig(
        n_layers=2, n_heads=2, d_model=sum(BLOCKS.values()), d_head=N_POS, d_mlp=None, d_vocab=VOCAB, n_ctx=N_POS,
        normalization=None, causal=True, attn_scale=1.0, tied_unembed=False, name="planted-positions",
    )
    rng = np.random.RandomState(0)
    w = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(cfg).items()}
    tok, pos, prev, out, junk = (_block(b) for b in BLOCKS)
    w["embed.W_E"][np.arange(VOCAB), OFFSET["tok"] + np.arange(VOCAB)] = 1.0
    w["embed.W_pos"][np.arange(N_POS), OFFSET["pos"] + np.arange(N_POS)] = 1.0
    w["blocks.attn.W_Q"][0, 0, pos, :] = SHARP * np.eye(N_POS)
    w["blocks.attn.W_K"][0, 0, pos, :] = np.eye(N_POS, k=1)
    w["blocks.attn.W_V"][0, 0, tok, :VOCAB] = np.eye(VOCAB)
    w["blocks.attn.W_O"][0, 0, :VOCAB, prev] = np.eye(VOCAB)
    w["blocks.attn.W_Q"][1, 0, OFFSET["pos"] + N_POS - 1, 2] = SHARP
    w["blocks.attn.W_K"][1, 0, pos, :] = np.eye(N_POS)
    w["blocks.attn.W_V"][1, 0, prev, :VOCAB] = np.eye(VOCAB)
    w["blocks.attn.W_O"][1, 0, :VOCAB, out] = np.eye(VOCAB)
    for layer in range(2):
        for name in ("W_Q", "W_K", "W_V"):
            w[f"blocks.attn.{name}"][layer, 1] = 0.5 * rng.randn(cfg.d_model, N_POS)
        w["blocks.attn.W_O"][layer, 1][:, junk] = 0.5 * rng.randn(N_POS, JUNK)
    w["unembed.W_U"][out, :] = 4.0 * np.eye(VOCAB)
    return build_model(cfg, w)


def positional_problem(n_prompts=4):
    rng = np.random.RandomState(1)
    x = rng.randint(0, VOCAB - 1, (n_prompts, N_POS - 1))
    clean = np.concatenate([np.full((n_prompts, 1), VOCAB - 1), x], axis=1)
    task = Task(name="planted-positions", clean=clean, corrupt=clean[::-1].copy(),
                positions=np.full((n_prompts, 1), N_POS - 1), metric="nll", answers=x[:, :1], ablation="zero",
                labels={"X1": np.full(n_prompts, 1), "END": np.full(n_prompts, N_POS - 1)})
    return Problem.build(positional_model(), task, metric="nll")


@pytest.fixture(scope="module")
def planted():
    return positional_problem()


@pytest.fixture(scope="module")
def planted_ig(planted):
    return eap_ig(planted, positions="each", steps=16, top_n=len(PLANTED_UNITS))


@pytest.fixture(scope="module")
def planted_acdc(planted):
    return acdc(planted, threshold=1e-3, positions="each")


def test_position_aware_eap_ig_and_acdc_find_each_edge_at_its_position_alone(planted, planted_ig, planted_acdc):
    assert planted.clean_value() < 0.1  # the model copies x1
    assert set(planted_ig.kept) == PLANTED_UNITS
    assert set(planted_acdc.kept) == PLANTED_UNITS
    # a0.0's output matters to a1.0's value input at position 2 alone, though a1.0 reads it everywhere
    for circuit in (planted_ig, planted_acdc):
        at = {name for name in circuit.kept if name.startswith("a0.0->a1.0.v@")}
        assert at == {"a0.0->a1.0.v@2"}
        assert circuit.positions.labels == ("0", "1", "2", "3", "4")
    # without positions the same edges are found, and nothing says where
    merged = planted_acdc.merge_positions()
    assert set(merged.kept) == {name.split("@")[0] for name in PLANTED_UNITS}
    # the kept units alone reproduce the clean behaviour
    assert planted_acdc.metric_value == pytest.approx(planted.evaluate(planted_acdc.gates()), rel=1e-6)
    assert planted_acdc.gates().shape == (N_POS, planted.graph.n_gates)
    # the task's labels as spans: X1 (position 1), END (4), and the rest as "other"
    labelled = acdc(planted, threshold=1e-3, positions="labels")
    assert labelled.positions.labels == ("other", "X1", "END")
    at = {"1": "X1", "4": "END", "2": "other"}
    assert set(labelled.kept) == {f"{u.split('@')[0]}@{at[u.split('@')[1]]}" for u in PLANTED_UNITS}


def test_per_position_scores_sum_to_the_position_free_scores(planted, planted_ig):
    graph = planted.graph
    plain = eap_ig(planted, steps=16)
    signed = planted_ig.extra["signed"]
    assert signed.shape == (N_POS, graph.n_gates)
    scale = np.abs(plain.extra["signed"]).max()
    np.testing.assert_allclose(signed.sum(0), plain.extra["signed"], rtol=0, atol=1e-6 * scale)
    assert planted_ig.extra["completeness"]["score_sum"] == pytest.approx(plain.extra["completeness"]["score_sum"], rel=1e-5)
    # a span's score is the sum of its positions' scores (the same per-position gradient, summed)
    spans = eap_ig(planted, positions={"X": [1, 2], "END": 4}, steps=16)
    assert spans.positions.labels == ("other", "X", "END")
    assert spans.positions.spans == ((0, 3), (1, 2), (4,))
    expected = np.stack([signed[[0, 3]].sum(0), signed[[1, 2]].sum(0), signed[4]])
    np.testing.assert_allclose(spans.extra["signed"], expected, rtol=0, atol=1e-6 * scale)
    # the task's labels: X1 at 1, END at 4, the rest as "other"
    labelled = resolve_positions(planted, "labels")
    assert labelled.labels == ("other", "X1", "END") and labelled.spans == ((0, 2, 3), (1,), (4,))


# ------------------------------------------------------------------------------------------------
# ACDC with positions against a plain sequential loop in float64, one forward per candidate


def _kl64(model, graph, tokens, ablated, clean_logits, gates):
    logits = gated_logits(model, graph, tokens, gates, ablated)
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    clean, patched = log_softmax(clean_logits), log_softmax(logits)
    return float((np.exp(clean) * (clean - patched)).sum(-1).mean())


def plain_positional_acdc(problem, units: PositionUnits, threshold: float) -> tuple[set[str], list[float]]:
    """ACDC over (edge, position unit) pairs, written plainly: destinations from logits back, the v,
    k, q inputs of a layer's heads (last head first) after its MLP, senders latest block first (heads
    of a layer head 0 first), and each edge's position units from the last to the first; a destination
    is skipped (its units removed) when no edge out of its node is kept at any position. Returns the
    kept units and every tested result."""
    model, graph = problem.model, problem.graph
    tokens = np.asarray(problem.run.tokens)
    ablated = np.asarray(problem.run.ablation.values, np.float64)
    ablated = np.broadcast_to(ablated, ablated.shape[:1] + tokens.shape + ablated.shape[-1:])
    clean_logits = gated_logits(model, graph, tokens, np.ones(graph.n_gates), ablated)
    gates = np.ones((units.n_units, graph.n_gates))

    def loss(g):
        return _kl64(model, graph, tokens, ablated, clean_logits, g[units.unit_of])

    order = ["logits"]
    for layer in reversed(range(graph.n_layers)):
        if graph.has_mlp:
            order.append(f"mlp{layer}")
        order += [f"a{layer}.{h}.{t}" for t in "vkq" for h in reversed(range(graph.n_heads))]
    results = []
    current = loss(gates)
    for dst in order:
        owner = dst if dst == "logits" or dst.startswith("mlp") else ".".join(dst.split(".")[:2])
        senders = []
        for layer in reversed(range(graph.n_layers)):
            senders += [f"mlp{layer}"] + [f"a{layer}.{h}" for h in range(graph.n_heads)]
        senders = [s for s in senders + ["embed"] if s in graph.sources_of(dst)]
        out_of_owner = [graph.index(e) for e in graph.edges if graph.split_edge(e)[0] == owner]
        if owner != "logits" and not gates[:, out_of_owner].any():
            for src in senders:
                gates[:, graph.index(f"{src}->{dst}")] = 0
            continue
        for src in senders:
            e = graph.index(f"{src}->{dst}")
            for u in reversed(range(units.n_units)):
                gates[u, e] = 0
                after = loss(gates)
                results.append(after - current)
                if after - current >= threshold:
                    gates[u, e] = 1
                else:
                    current = after
    names = units.unit_names(graph.gate_names)
    return {names[i] for i in np.flatnonzero(gates.reshape(-1))}, results


def test_acdc_with_positions_equals_a_plain_float64_loop_on_a_tiny_random_model():
    cfg = TINY_CONFIGS["attn-only"]
    model = aj.init_model(cfg, jax.random.PRNGKey(3), std=0.5)
    rng = np.random.RandomState(3)
    clean = rng.randint(0, cfg.d_vocab, (3, 3))
    task = Task(name="random", clean=clean, corrupt=rng.randint(0, cfg.d_vocab, clean.shape),
                positions=np.tile(np.arange(3), (3, 1)), metric="kl")
    problem = Problem.build(model, task)
    ablated = np.broadcast_to(np.asarray(problem.run.ablation.values, np.float64), (model.config.n_sources, 3, 3, cfg.d_model))
    clean_logits = gated_logits(model, problem.graph, clean, np.ones(problem.graph.n_gates), ablated)
    gap = _kl64(model, problem.graph, clean, ablated, clean_logits, np.zeros(problem.graph.n_gates))  # KL of the ablated model
    sizes = []
    for positions, fraction in (("each", 0.01), ("each", 0.1)):
        units = resolve_positions(problem, positions)
        threshold = fraction * gap
        expected, results = plain_positional_acdc(problem, units, threshold)
        # decisions are made on float32 losses: no result may sit at the threshold within that rounding
        assert min(abs(r - threshold) for r in results) > 1e-5 * gap
        circuit = acdc(problem, threshold=threshold, positions=positions)
        assert set(circuit.kept) == expected, (positions, threshold, set(circuit.kept) ^ expected)
        sizes.append(len(expected))
    assert all(0 < size < 87 for size in sizes) and sizes[0] > sizes[1], sizes  # not vacuous


# ------------------------------------------------------------------------------------------------
# The circuit's JSON, its drawing and its exports carry the positions


def test_json_drawing_and_exports_carry_positions(planted_acdc, planted_ig, tmp_path):
    circuit = planted_acdc
    loaded = Circuit.load(circuit.save(tmp_path / "c.json"))
    assert loaded.positions == circuit.positions and loaded.kept == circuit.kept
    np.testing.assert_array_equal(loaded.scores, circuit.scores)
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["version"] == 2 and data["positions"]["labels"] == ["0", "1", "2", "3", "4"]
    assert data["edges"]["a0.0->a1.0.v@2"] == circuit.score("a0.0->a1.0.v@2") > 0
    # a version-1 file (no positions) still loads
    plain = planted_ig.merge_positions()
    old = plain.to_dict() | {"version": 1}
    assert Circuit.from_dict(json.loads(json.dumps(old))).kept == plain.kept

    svg = viz.draw_circuit(circuit, tmp_path / "c.svg").read_text()
    for column in ("position 1", "position 2", "position 4"):
        assert column in svg
    assert "position 0" not in svg and "position 3" not in svg  # nothing kept there
    assert 'id="edge_a0.0_to_a1.0.v@2"' in svg and 'id="edge_a0.0_to_a1.0.v@1"' not in svg
    with pytest.raises(ValueError, match="draw_circuit"):
        viz.to_dot(circuit)

    doc = json.loads(json.dumps(export.to_autocircuit(circuit)))
    assert doc["seq_len"] == N_POS
    assert {"edge": "A0.0->A1.0.V", "seq_idx": 2} in doc["circuit"]
    assert np.array(doc["prune_scores"]["blocks.1.hook_v_input"], dtype=float).shape == (N_POS, 2, 3)
    back = export.from_autocircuit(doc)
    assert back.positions == circuit.positions and back.kept == circuit.kept
    np.testing.assert_array_equal(np.isnan(back.scores), np.isnan(circuit.scores))
    np.testing.assert_allclose(np.nan_to_num(back.scores), np.nan_to_num(circuit.scores))
    del doc["acdc_jax"]  # as auto-circuit itself would write it: labels are the token positions
    assert export.from_autocircuit(doc).kept == circuit.kept
    for fmt in ("acdc", "mib"):
        with pytest.raises(export.ExportError, match="merge_positions"):
            export.export_circuit(circuit, fmt)
    merged = export.to_acdc(export.merge_positions(circuit))
    present = {(r["receiver"], r["sender"]) for r in merged["edges"] if r["present"] and r["type"] == "addition"}
    assert ("blocks.1.hook_v_input", "blocks.0.attn.hook_result") in present


def test_bad_positions_fail_clearly(planted):
    with pytest.raises(ValueError, match="both spans"):
        resolve_positions(planted, {"A": [0, 1], "B": [1]})
    with pytest.raises(ValueError, match="outside"):
        resolve_positions(planted, {"A": [7]})
    with pytest.raises(ValueError, match="'each', 'labels'"):
        resolve_positions(planted, "every")
    task = planted.labels | {"X1": np.array([1, 2, 1, 1])}
    with pytest.raises(ValueError, match="different positions"):
        resolve_positions(Problem(planted.run, planted.inputs, planted.metric, "t", "zero", task), "labels")
    with pytest.raises(ValueError, match="position label"):
        PositionUnits(("a@b",), ((0,),), 1)


def test_cli_refuses_positions_for_a_method_without_them():
    from typer.testing import CliRunner

    from acdc_jax.cli import app

    result = CliRunner().invoke(app, ["discover", "--task", "tracr-reverse", "--method", "hisp", "--option", "positions=each"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "does not support positions" in text and "acdc" in text and "eap-ig" in text
