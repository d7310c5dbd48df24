"""Exports to ACDC, auto-circuit and MIB: names, layouts, round trips, and ACDC's own tracr edges."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import acdc_jax as aj
from acdc_jax import export as ex
from acdc_jax.cli import app
from acdc_jax.evaluate import edges_from_nodes
from acdc_jax.methods import Circuit
from acdc_jax.models import models_dir
from acdc_jax.tasks import get_task

from .circuits import GPT2, random_circuit, tracr_reverse_acdc

runner = CliRunner()
GPT2_EDGES = aj.Graph.from_model(GPT2)


def through_json(document):
    """What a reader of the written file sees (strict JSON: NaN would fail here)."""
    return json.loads(json.dumps(document, allow_nan=False))


def assert_same_circuit(back: Circuit, original: Circuit):
    assert back.graph == original.graph
    np.testing.assert_array_equal(back.scores, original.scores)  # NaN == NaN here; floats bit-exact
    assert back.kept == original.kept
    assert (back.method, back.task, back.metric, back.ablation) == (original.method, original.task, original.metric, original.ablation)
    assert (back.threshold, back.metric_value) == (original.threshold, original.metric_value)


def ground_truth(program: str) -> dict:
    return json.loads((models_dir() / "tracr" / program / "ground_truth_edges.json").read_text())


def merged_embed(keys):
    """ACDC keys with token and position embedding senders made one, as our ``embed`` is."""
    return {(r, ri, "embed" if s in ("hook_embed", "hook_pos_embed") else s, si) for r, ri, s, si in keys}


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_real_tracr_circuit_round_trips(fmt):
    circuit = tracr_reverse_acdc()
    assert circuit.n_kept == 10 and not np.isnan(circuit.scores).any()
    back = ex.import_circuit(through_json(ex.export_circuit(circuit, fmt)))
    assert_same_circuit(back, circuit)


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_random_gpt2_sized_scores_round_trip(fmt):
    circuit = random_circuit(GPT2_EDGES, seed=1)
    assert circuit.graph.n_gates == 32_491 and np.isnan(circuit.scores).sum() > 3000 and circuit.n_kept > 1000
    document = through_json(ex.export_circuit(circuit, fmt))
    assert ex.detect_format(document) == fmt
    assert_same_circuit(ex.import_circuit(document), circuit)


def test_autocircuit_prune_scores_alone_give_the_same_scores():
    circuit = random_circuit(GPT2_EDGES, seed=2)
    document = through_json(ex.to_autocircuit(circuit))
    del document["edges"], document["acdc_jax"]  # what an auto-circuit user would write: PruneScores + kept names
    back = ex.from_autocircuit(document)
    np.testing.assert_array_equal(back.scores, circuit.scores)
    assert back.kept == circuit.kept and back.graph == circuit.graph


def test_files_round_trip_and_are_strict_json(tmp_path):
    circuit = random_circuit(GPT2_EDGES, seed=3)
    for fmt in ex.FORMATS:
        path = ex.write_circuit(circuit, tmp_path / f"{fmt}.json", fmt)
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{fmt}: non-standard JSON constant {c}"))
        assert_same_circuit(ex.read_circuit(path), circuit)


# ------------------------------------------------------------------------------------ names and layouts


def test_acdc_names_follow_acdc_hooks_on_gpt2():
    g = GPT2_EDGES
    kept = ("a0.1->a3.2.q", "embed->logits", "mlp4->a7.11.v", "a2.5->mlp2")
    circuit = Circuit("x", "ioi", g, np.arange(g.n_gates, dtype=float), kept, "kl", "corrupt")
    doc = ex.to_acdc(circuit)
    assert doc["embed"] == "blocks.0.hook_resid_pre"
    present = {k for k in ex.acdc_edge_keys(doc) if "hook_result" not in k[0] and "attn.hook_" not in k[0]
               and "hook_mlp_out" not in k[0]}
    assert present == {
        ("blocks.3.hook_q_input", (None, None, 2), "blocks.0.attn.hook_result", (None, None, 1)),
        ("blocks.11.hook_resid_post", (None,), "blocks.0.hook_resid_pre", (None,)),
        ("blocks.7.hook_v_input", (None, None, 11), "blocks.4.hook_mlp_out", (None,)),
        ("blocks.2.hook_mlp_in", (None,), "blocks.2.attn.hook_result", (None, None, 5)),
    }
    rows = {(r["receiver"], tuple(r["receiver_index"]), r["sender"], tuple(r["sender_index"])): r for r in doc["edges"]}
    assert rows[("blocks.3.hook_q_input", (None, None, 2), "blocks.0.attn.hook_result", (None, None, 1))]["score"] == g.index("a0.1->a3.2.q")
    # ACDC's graph: every residual edge, plus per head 3 direct-computation and 3 placeholder edges, per MLP 1
    assert len(doc["edges"]) == g.n_edges + 12 * 12 * 6 + 12
    # the q/k/v computations and placeholders of the heads and MLPs the circuit touches are present
    assert ("blocks.3.attn.hook_q", (None, None, 2), "blocks.3.hook_q_input", (None, None, 2)) in ex.acdc_edge_keys(doc)
    assert ("blocks.3.attn.hook_k", (None, None, 2), "blocks.3.hook_k_input", (None, None, 2)) not in ex.acdc_edge_keys(doc)
    assert ("blocks.3.attn.hook_result", (None, None, 2), "blocks.3.attn.hook_k", (None, None, 2)) in ex.acdc_edge_keys(doc)
    assert ("blocks.2.hook_mlp_out", (None,), "blocks.2.hook_mlp_in", (None,)) in ex.acdc_edge_keys(doc)
    assert ("blocks.3.hook_mlp_out", (None,), "blocks.3.hook_mlp_in", (None,)) not in ex.acdc_edge_keys(doc)


def test_autocircuit_names_and_prune_score_shapes():
    circuit = random_circuit(GPT2_EDGES, seed=4)
    doc = ex.to_autocircuit(circuit)
    assert [s["name"] for s in doc["srcs"][:3]] == ["Resid Start", "A0.0", "A0.1"]
    assert doc["srcs"][13] == {"name": "MLP 0", "module": "blocks.0.hook_mlp_out", "head": None, "idx": 13}
    assert doc["srcs"][15] == {"name": "A1.1", "module": "blocks.1.attn.hook_result", "head": 1, "idx": 15}
    assert doc["dests"][0]["name"] == "A0.0.Q" and doc["dests"][-1] == {
        "name": "Resid End", "module": "blocks.11.hook_resid_post", "head": None, "idx": len(GPT2_EDGES.destinations) - 1}
    shapes = {m: np.array(v, dtype=float).shape for m, v in doc["prune_scores"].items()}
    assert shapes["blocks.3.hook_q_input"] == (12, 1 + 3 * 13)  # heads x (embed + 3 layers of 12 heads and an MLP)
    assert shapes["blocks.3.hook_mlp_in"] == (1 + 3 * 13 + 12,)
    assert shapes["blocks.11.hook_resid_post"] == (157,)
    assert len(shapes) == 12 * 4 + 1
    i = GPT2_EDGES.index("a0.1->a3.2.q")
    assert doc["edges"]["A0.1->A3.2.Q"] == pytest.approx(circuit.scores[i])
    assert doc["prune_scores"]["blocks.3.hook_q_input"][2][2] == doc["edges"]["A0.1->A3.2.Q"]  # [head 2][src idx 2 = A0.1]
    assert doc["edges"]["Resid Start->MLP 0"] == _none_or(circuit.score("embed->mlp0"))
    assert "MLP 11->Resid End" in doc["edges"] and len(doc["edges"]) == GPT2_EDGES.n_edges


def _none_or(x):
    return None if np.isnan(x) else x


def test_autocircuit_one_head_models_have_no_head_axis():
    doc = ex.to_autocircuit(tracr_reverse_acdc())  # auto-circuit shapes a patch mask [heads, srcs] only for > 1 head
    assert np.array(doc["prune_scores"]["blocks.3.hook_v_input"], dtype=float).shape == (1 + 3 * 2,)
    assert "embed->a3.0.v" in tracr_reverse_acdc().kept and "Resid Start->A3.0.V" in doc["circuit"]


def test_mib_layout_is_eap_ig_graph_json():
    circuit = random_circuit(GPT2_EDGES, seed=5)
    doc = through_json(ex.to_mib(circuit))
    assert doc["cfg"] == {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": False, "d_model": 768}
    assert set(doc["nodes"]) == {"input", "logits"} | {f"a{l}.h{h}" for l in range(12) for h in range(12)} | {f"m{l}" for l in range(12)}
    assert len(doc["edges"]) == 32_491  # EAP-IG's GPT-2 graph has the same edges as ours
    i = GPT2_EDGES.index("a0.1->a3.2.q")
    assert doc["edges"]["a0.h1->a3.h2<q>"] == {"score": _zero_if_nan(circuit.scores[i]), "in_graph": bool(circuit.kept_mask()[i])}
    assert "input->m0" in doc["edges"] and "m11->logits" in doc["edges"] and "input->a0.h0<k>" in doc["edges"]
    unscored = [e for e, s in zip(GPT2_EDGES.edges, circuit.scores) if np.isnan(s)]
    assert doc["acdc_jax"]["unscored"] == unscored
    kept = set(circuit.kept)
    assert doc["nodes"]["logits"]["in_graph"] and doc["nodes"]["input"]["in_graph"] == any(e.startswith("embed->") for e in kept)
    a32 = any(e.startswith("a3.2->") or ".a3.2." in f".{e.split('->')[1]}." for e in kept)
    assert doc["nodes"]["a3.h2"]["in_graph"] == a32


def _zero_if_nan(x):
    return 0.0 if np.isnan(x) else float(x)


def test_mib_file_from_eap_ig_without_our_block_reads_by_its_names():
    circuit = random_circuit(GPT2_EDGES, seed=6, nan_fraction=0.0)
    doc = through_json(ex.to_mib(circuit))
    del doc["acdc_jax"]
    back = ex.from_mib(doc)
    assert back.graph == GPT2_EDGES and back.kept == circuit.kept and back.method == "imported-mib"
    np.testing.assert_array_equal(back.scores, circuit.scores)
    doc["cfg"]["parallel_attn_mlp"] = True
    with pytest.raises(ex.ExportError, match="parallel attention"):
        ex.from_mib(doc)


def test_mib_needs_d_model_it_cannot_infer():
    assert ex.infer_d_model(random_circuit(GPT2_EDGES)) == 768
    assert ex.infer_d_model(tracr_reverse_acdc()) == 41
    odd = random_circuit(aj.Graph(3, 5, True), task="custom")
    with pytest.raises(ex.ExportError, match="pass d_model="):
        ex.to_mib(odd)
    assert ex.to_mib(odd, d_model=40)["cfg"]["d_model"] == 40
    with pytest.raises(ex.ExportError, match="attention-only"):
        ex.to_mib(random_circuit(aj.Graph(2, 2, False)), d_model=8)


# ------------------------------------------------------------------------------------ ACDC's tracr edges


@pytest.mark.parametrize("program, n_split_partners", [("reverse", 4), ("xproportion", 1)])
def test_acdc_export_of_canonical_tracr_circuit_matches_acdc_edges(program, n_split_partners):
    """ACDC's ``acdc_edges`` are reproduced exactly except for the embedding split: ACDC keeps
    ``hook_embed`` and ``hook_pos_embed`` apart, our ``embed`` is both, so each merged edge is
    written with both senders. The surplus is exactly the partner halves ACDC dropped (reverse:
    4, e.g. ``hook_embed -> a3.0.k`` next to the true ``hook_pos_embed -> a3.0.k``), nothing is
    missing, and with the two embedding hooks identified the sets are equal."""
    truth = ground_truth(program)
    theirs = set(ex.acdc_edge_keys(truth["acdc_edges"]))
    task = get_task(f"tracr-{program}")
    for internal in (False, True):
        graph = aj.Graph(_n_layers(program), 1, True, internal_edges=internal)
        kept = task.canonical.gate_names(graph)
        circuit = Circuit("canonical", f"tracr-{program}", graph, np.ones(graph.n_gates), tuple(sorted(kept)), "l2", "zero")
        doc = ex.to_acdc(circuit)  # embed="auto": split, as ACDC for tracr tasks
        assert doc["embed"] == "hook_embed + hook_pos_embed"
        ours = set(ex.acdc_edge_keys(doc))
        assert theirs <= ours
        surplus = ours - theirs
        assert len(surplus) == n_split_partners
        for receiver, r_index, sender, s_index in surplus:
            partner = {"hook_embed": "hook_pos_embed", "hook_pos_embed": "hook_embed"}[sender]
            assert (receiver, r_index, partner, s_index) in theirs
        assert merged_embed(ours) == merged_embed(theirs)
        # and ACDC's own list read back is the canonical circuit of that graph
        assert set(ex.from_acdc(truth["acdc_edges"], graph=graph).kept) == kept


def _n_layers(program: str) -> int:
    return {"reverse": 4, "xproportion": 2}[program]


def test_acdc_reading_identifies_direct_computation_edges_with_internal_edges():
    truth = ground_truth("reverse")
    graph = aj.Graph(4, 1, True, internal_edges=True)
    back = ex.from_acdc(truth["acdc_edges"], graph=graph)
    internal = sorted(e for e in back.kept if e in graph.internal_edge_names)
    # hook_q <- hook_q_input edges; a0.0's q and k have only placeholders (hook_result <- hook_q) in ACDC's list
    assert internal == ["a0.0.v->a0.0", "a3.0.k->a3.0", "a3.0.q->a3.0", "a3.0.v->a3.0"]
    assert np.isnan(back.scores).all() and back.method == "imported-acdc"
    with pytest.raises(ex.ExportError, match="pass graph="):
        ex.from_acdc(truth["acdc_edges"])


def test_acdc_embed_modes():
    circuit = tracr_reverse_acdc()
    split = ex.to_acdc(circuit, embed="split")
    resid = ex.to_acdc(circuit, embed="resid_pre")
    senders = lambda doc: {k[2] for k in ex.acdc_edge_keys(doc)}  # noqa: E731
    assert {"hook_embed", "hook_pos_embed"} <= senders(split) and "blocks.0.hook_resid_pre" not in senders(split)
    assert "blocks.0.hook_resid_pre" in senders(resid) and "hook_embed" not in senders(resid)
    assert len(ex.acdc_edge_keys(split)) == len(ex.acdc_edge_keys(resid)) + sum(e.startswith("embed->") for e in circuit.kept)
    for doc in (split, resid):
        assert_same_circuit(ex.from_acdc(through_json(doc)), circuit)
    with pytest.raises(ex.ExportError, match="embed must be one of"):
        ex.to_acdc(circuit, embed="tokens")


# ------------------------------------------------------------------------------------ other graphs


def test_per_head_graphs_native_in_autocircuit_and_as_qkv_triples_elsewhere():
    graph = aj.Graph.from_model(GPT2, qkv_split=False)
    circuit = random_circuit(graph, seed=7)
    for fmt in ex.FORMATS:
        assert_same_circuit(ex.import_circuit(through_json(ex.export_circuit(circuit, fmt))), circuit)
    ac = ex.to_autocircuit(circuit)
    assert "A0.1->A3.2" in ac["edges"] and np.array(ac["prune_scores"]["blocks.3.hook_attn_in"], dtype=float).shape == (12, 40)
    mib = through_json(ex.to_mib(circuit))
    i = graph.index("a0.1->a3.2")
    assert [mib["edges"][f"a0.h1->a3.h2<{t}>"]["in_graph"] for t in "qkv"] == [bool(circuit.kept_mask()[i])] * 3
    del mib["acdc_jax"]  # a foreign reader sees the q/k/v graph, each per-head edge as three equal edges
    foreign = ex.from_mib(mib)
    assert foreign.graph == GPT2_EDGES
    into_heads = {e for e in circuit.kept if e.split("->")[1].startswith("a")}
    assert set(foreign.kept) == {f"{e}.{t}" for e in into_heads for t in "qkv"} | (set(circuit.kept) - into_heads)


def test_internal_edges_round_trip_in_acdc_and_must_be_folded_elsewhere():
    graph = aj.Graph.from_model(GPT2, internal_edges=True)
    circuit = random_circuit(graph, seed=8, kept_fraction=0.3)
    assert_same_circuit(ex.from_acdc(through_json(ex.to_acdc(circuit))), circuit)
    for fmt in ("autocircuit", "mib"):
        with pytest.raises(ex.ExportError, match="fold_internal_edges"):
            ex.export_circuit(circuit, fmt)
    folded = ex.fold_internal_edges(circuit)
    assert folded.graph == GPT2_EDGES
    kept = set(circuit.kept)
    for edge in ["a0.1->a3.2.q", "embed->mlp0"]:
        i = GPT2_EDGES.index(edge)
        dst = edge.split("->")[1]
        alive = edge in kept and (dst.startswith("mlp") or f"{dst}->{dst.rsplit('.', 1)[0]}" in kept)
        assert (edge in folded.kept) == alive and folded.scores[i] == circuit.score(edge)
    expected = {e for e in GPT2_EDGES.edges if e in kept and (
        e.split("->")[1].count(".") < 2 or f"{e.split('->')[1]}->{e.split('->')[1].rsplit('.', 1)[0]}" in kept)}
    assert set(folded.kept) == expected
    assert_same_circuit(ex.import_circuit(through_json(ex.to_autocircuit(folded))), folded)


def test_node_level_circuits_round_trip_in_mib_and_convert_for_the_others():
    graph = aj.Graph.from_model(GPT2, level="node")
    circuit = random_circuit(graph, seed=9, kept_fraction=0.3)
    doc = through_json(ex.to_mib(circuit))
    assert doc["nodes"]["a3.h2"]["in_graph"] == ("a3.2" in circuit.kept)
    assert_same_circuit(ex.from_mib(doc), circuit)
    edge_mask = edges_from_nodes(GPT2_EDGES, circuit.kept_mask())
    assert [doc["edges"][n]["in_graph"] for n in ("input->m0", "a0.h1->a3.h2<q>")] == [
        bool(edge_mask[GPT2_EDGES.index(e)]) for e in ("embed->mlp0", "a0.1->a3.2.q")]
    for fmt in ("acdc", "autocircuit"):
        with pytest.raises(ex.ExportError, match="edge_circuit_from_nodes"):
            ex.export_circuit(circuit, fmt)
    edges = ex.edge_circuit_from_nodes(circuit)
    assert edges.graph == GPT2_EDGES and set(edges.kept) == {e for e, m in zip(GPT2_EDGES.edges, edge_mask) if m}
    assert_same_circuit(ex.from_acdc(through_json(ex.to_acdc(edges))), edges)


def test_reading_rejects_what_does_not_fit():
    with pytest.raises(ex.ExportError, match="cannot tell the format"):
        ex.import_circuit({"edges": {}})
    doc = through_json(ex.to_acdc(tracr_reverse_acdc()))
    doc["edges"][0]["receiver"] = "blocks.9.hook_q_input"
    with pytest.raises(aj.GraphError, match="not in the q/k/v-split edge-level graph"):
        ex.from_acdc(doc)
    doc["edges"][0]["receiver"] = "blocks.1.hook_z"
    with pytest.raises(ex.ExportError, match="unknown ACDC hook"):
        ex.from_acdc(doc)
    ac = through_json(ex.to_autocircuit(tracr_reverse_acdc()))
    ac["prune_scores"]["blocks.3.hook_v_input"] = [[0.0] * 7] * 5  # a position axis
    del ac["edges"]
    with pytest.raises(ex.ExportError, match="position"):
        ex.from_autocircuit(ac)
    mib = through_json(ex.to_mib(tracr_reverse_acdc()))
    mib["acdc_jax"]["graph"]["n_layers"] = 3
    with pytest.raises(ex.ExportError, match="n_layers"):
        ex.from_mib(mib)


# ------------------------------------------------------------------------------------ CLI


def test_cli_export_writes_each_format(tmp_path):
    circuit = tracr_reverse_acdc()
    source = circuit.save(tmp_path / "circuit.json")
    for fmt in ex.FORMATS:
        out = tmp_path / f"{fmt}.json"
        result = runner.invoke(app, ["export", str(source), "--format", fmt, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert f"({fmt}: 10 of 77 edges kept)" in " ".join(result.output.split())
        assert_same_circuit(ex.read_circuit(out), circuit)
    result = runner.invoke(app, ["export", str(source), "--format", "acdc", "--embed", "resid_pre", "-o", str(tmp_path / "r.json")])
    assert result.exit_code == 0 and json.loads((tmp_path / "r.json").read_text())["embed"] == "blocks.0.hook_resid_pre"


def test_cli_export_errors_say_what_to_do(tmp_path):
    internal = dataclasses.replace(tracr_reverse_acdc().graph, internal_edges=True)
    circuit = random_circuit(internal, seed=10, task="tracr-reverse", kept_fraction=0.5)
    source = circuit.save(tmp_path / "internal.json")
    cases = [
        (["--format", "graphml"], "--format must be one of acdc, autocircuit, mib"),
        (["--format", "autocircuit"], "--fold-internal"),
        (["--format", "mib", "--embed", "split"], "--embed applies to --format acdc only"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["export", str(source), *args, "-o", str(tmp_path / "x.json")])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    result = runner.invoke(app, ["export", str(source), "--format", "autocircuit", "--fold-internal", "-o", str(tmp_path / "f.json")])
    assert result.exit_code == 0, result.output
    assert_same_circuit(ex.read_circuit(tmp_path / "f.json"), ex.fold_internal_edges(circuit))
    missing = runner.invoke(app, ["export", str(tmp_path / "nope.json"), "--format", "acdc", "-o", str(tmp_path / "y.json")])
    assert missing.exit_code == 2 and "cannot read the circuit" in missing.output


def test_mib_scores_are_written_in_mib_scale_and_read_back_in_ours():
    """MIB's score is ours (same sign) divided by the prompts per batch; from_mib multiplies it back."""
    circuit = random_circuit(GPT2_EDGES, seed=8, nan_fraction=0.0)
    doc = through_json(ex.to_mib(circuit, prompts_per_batch=20))
    assert doc["acdc_jax"]["score_convention"]["prompts_per_batch"] == 20
    i = GPT2_EDGES.index("a0.1->a3.2.q")
    assert doc["edges"]["a0.h1->a3.h2<q>"]["score"] == circuit.scores[i] / 20
    assert doc["edges"]["input->m0"]["score"] == circuit.scores[GPT2_EDGES.index("embed->mlp0")] / 20
    back = ex.from_mib(doc)
    np.testing.assert_allclose(back.scores, circuit.scores, rtol=1e-15)
    assert back.kept == circuit.kept
    del doc["acdc_jax"]  # MIB's own files: say the batch size they were attributed with
    np.testing.assert_allclose(ex.from_mib(doc, prompts_per_batch=20).scores, circuit.scores, rtol=1e-15)
    np.testing.assert_allclose(ex.from_mib(doc).scores, circuit.scores / 20, rtol=1e-15)
