"""Pictures: the SVG's structure, labels, q/k/v colours and widths; PNG files; DOT source; heat maps."""

import re
import struct
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from typer.testing import CliRunner

import acdc_jax as aj
from acdc_jax import viz
from acdc_jax.cli import app
from acdc_jax.methods import Circuit

from .circuits import GPT2, random_circuit, tracr_reverse_acdc

SVG = "{http://www.w3.org/2000/svg}"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def svg_tree(path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return root


def svg_texts(root: ET.Element) -> set[str]:
    return {"".join(t.itertext()).strip() for t in root.iter(f"{SVG}text")}


def svg_groups(root: ET.Element, prefix: str) -> dict[str, ET.Element]:
    return {g.get("id"): g for g in root.iter(f"{SVG}g") if (g.get("id") or "").startswith(prefix)}


def stroke(group: ET.Element) -> tuple[str, float]:
    """Colour and width of the first stroked path of a group (an edge's line; its head comes after)."""
    for path in group.iter(f"{SVG}path"):
        style = dict(part.strip().split(": ", 1) for part in path.get("style", "").split(";") if ": " in part)
        if "stroke" in style:
            return style["stroke"], float(style.get("stroke-width", "1"))
    raise AssertionError("no stroked path")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def ioi_like_circuit() -> Circuit:
    """A GPT-2-sized circuit with path patching's head groups: G1 spans layers 9 and 10, G2 layers 7 and 8."""
    graph = aj.Graph.from_model(GPT2)
    kept = ["a9.6->logits", "a9.9->logits", "a10.0->logits", "a7.3->a9.6.q", "a8.6->a9.9.q", "a8.10->a10.0.q",
            "a5.5->a8.6.v", "embed->a5.5.k", "a0.1->a7.3.k", "embed->mlp0", "mlp0->a8.10.v", "a3.0->a7.3.v"]
    rng = np.random.default_rng(0)
    scores = np.full(graph.n_gates, np.nan)
    scores[graph.indices(kept)] = rng.uniform(0.1, 2.0, len(kept))
    scores[graph.index("a3.0->a7.3.v")] = -0.8
    scores[graph.index("a0.1->a7.3.k")] = np.nan
    groups = [["a9.6", "a9.9", "a10.0"], ["a7.3", "a8.6", "a8.10"], ["a5.5"]]
    return Circuit("path-patching", "ioi", graph, scores, tuple(kept), "logit_diff", "corrupt",
                   extra={"head_groups": groups})


# ------------------------------------------------------------------------------------ draw_circuit


def test_svg_of_a_real_circuit_has_its_nodes_and_qkv_colours(tmp_path):
    circuit = tracr_reverse_acdc()
    path = viz.draw_circuit(circuit, tmp_path / "reverse.svg")
    root = svg_tree(path)
    texts = svg_texts(root)
    used = {"embed", "a0.0", "mlp0", "mlp1", "mlp2", "a3.0", "logits"}
    assert used <= texts and not {"a1.0", "a2.0", "mlp3"} & texts  # untouched nodes hidden by default
    assert {"layer 0", "layer 3", "into query (q)", "into key (k)", "into value (v)"} <= texts
    edges = svg_groups(root, "edge_")
    assert len(edges) == circuit.n_kept == 10
    colours = {}
    for name in circuit.kept:
        src, dst = name.split("->")
        colour, width = stroke(edges[f"edge_{src}_to_{dst}"])
        letter = dst.rsplit(".", 1)[1] if dst.count(".") == 2 else "other"
        colours.setdefault(letter, set()).add(colour)
        # width is linear in |score|: 0.6 + 3.4 * |s| / max|s|
        expected = 0.6 + 3.4 * abs(circuit.score(name)) / np.nanmax(np.abs(circuit.scores[circuit.kept_mask()]))
        assert width == pytest.approx(expected, abs=1e-5), name
    assert colours == {"q": {"#0072b2"}, "k": {"#009e73"}, "v": {"#d55e00"}, "other": {"#4d4d4d"}}
    assert len({c for cs in colours.values() for c in cs}) == 4
    ports = svg_groups(root, "port_")
    assert set(ports) == {f"port_{h}.{t}" for h in ("a0.0", "a3.0") for t in "qkv"}


def test_all_nodes_mode_greys_the_rest_and_output_is_deterministic(tmp_path):
    circuit = tracr_reverse_acdc()
    first = viz.draw_circuit(circuit, tmp_path / "a.svg", hide_unused=False)
    second = viz.draw_circuit(circuit, tmp_path / "b.svg", hide_unused=False)
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text()
    assert "<dc:date>" not in text and "Date" not in text
    root = svg_tree(first)
    assert {"a1.0", "a2.0", "mlp3"} <= svg_texts(root)
    nodes = svg_groups(root, "node_")
    assert stroke(nodes["node_mlp3"])[0] == viz.UNUSED_COLOR.lower() and stroke(nodes["node_mlp2"])[0] == "#222222"


def test_png_and_pdf_files(tmp_path):
    circuit = tracr_reverse_acdc()
    width, height = png_size(viz.draw_circuit(circuit, tmp_path / "reverse.png"))
    assert width > 200 and height > 200
    assert (viz.draw_circuit(circuit, tmp_path / "reverse.pdf")).read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match=r"\.svg, \.png or \.pdf"):
        viz.draw_circuit(circuit, tmp_path / "reverse.jpg")


def test_head_groups_are_boxed_and_labelled(tmp_path):
    circuit = ioi_like_circuit()
    root = svg_tree(viz.draw_circuit(circuit, tmp_path / "ioi.svg"))
    texts = svg_texts(root)
    assert {"G1: a9.6, a9.9, a10.0", "G2: a7.3, a8.6, a8.10", "G1", "G2"} <= texts
    assert not any(t.startswith("G3") for t in texts)  # a one-head group is no group
    boxes = set(svg_groups(root, "group_"))
    # one box per row a group appears in: G1 in layer 9 (two heads side by side) and layer 10
    assert boxes == {"group_G1_a9.6", "group_G1_a10.0", "group_G2_a7.3", "group_G2_a8.6"}
    edges = svg_groups(root, "edge_")
    assert stroke(edges["edge_a3.0_to_a7.3.v"])[0] == "#d55e00"
    dashes = [p.get("style") for p in edges["edge_a3.0_to_a7.3.v"].iter(f"{SVG}path")][0]
    assert "stroke-dasharray" in dashes  # negative score: dashed
    assert {"negative score", "no score"} <= texts


def test_node_level_and_per_head_circuits(tmp_path):
    nodes = random_circuit(aj.Graph(3, 2, True, level="node"), seed=1, kept_fraction=0.5)
    root = svg_tree(viz.draw_circuit(nodes, tmp_path / "nodes.svg"))
    assert not svg_groups(root, "edge_") and not svg_groups(root, "port_")
    assert set(nodes.kept) <= svg_texts(root)
    graph = aj.Graph(3, 2, True, qkv_split=False)
    per_head = Circuit("x", "t", graph, np.linspace(0.1, 1, graph.n_gates), ("embed->a1.0", "a1.0->logits"), "kl", "corrupt")
    root = svg_tree(viz.draw_circuit(per_head, tmp_path / "per_head.svg"))
    assert stroke(svg_groups(root, "edge_")["edge_embed_to_a1.0"])[0] == "#4d4d4d"


# ------------------------------------------------------------------------------------ DOT


DOT_EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)"(?::([qkv]):s)? \[(.*)\];$')
DOT_NODE = re.compile(r'^\s*"([^"]+)" \[(.*)\];$')


def test_dot_source_has_the_nodes_edges_and_colours():
    circuit = tracr_reverse_acdc()
    dot = viz.to_dot(circuit)
    assert dot.startswith("digraph circuit {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    lines = dot.splitlines()
    declared = {m[1] for line in lines if (m := DOT_NODE.match(line)) and "->" not in line}
    assert declared == {"embed", "a0.0", "mlp0", "mlp1", "mlp2", "a3.0", "logits"}
    edges = {}
    for line in lines:
        if m := DOT_EDGE.match(line):
            src, node, port, attrs = m.groups()
            edges[f"{src}->{node}" + (f".{port}" if port else "")] = dict(re.findall(r'(\w+)="?([^",]+)"?', attrs))
    assert set(edges) == set(circuit.kept)
    assert {edges[e]["color"] for e in ("mlp2->a3.0.q", "embed->a3.0.k", "embed->a3.0.v", "a3.0->logits")} == {
        "#0072B2", "#009E73", "#D55E00", "#4D4D4D"}
    assert float(edges["embed->a0.0.v"]["penwidth"]) == pytest.approx(4.0)  # the largest |score|
    for node in ("a0.0", "a3.0"):  # ports the q/k/v edges enter by
        assert all(f'port="{t}"' in next(line for line in lines if line.strip().startswith(f'"{node}" [')) for t in "qkv")
    assert "subgraph cluster_layer0" in dot and "subgraph cluster_layer3" in dot and "cluster_layer1" in dot
    everything = viz.to_dot(circuit, hide_unused=False)
    assert '"mlp3" [' in everything and viz.UNUSED_COLOR in everything


def test_dot_marks_head_groups():
    dot = viz.to_dot(ioi_like_circuit())
    assert 'xlabel="G1"' in dot and dot.count('xlabel="G2"') == 3
    assert '"a3.0" -> "a7.3":v:s' in dot and 'style="dashed"' in dot and 'style="dotted"' in dot


# ------------------------------------------------------------------------------------ heat maps


def test_node_scores_sum_and_max_over_touching_edges():
    circuit = random_circuit(aj.Graph(3, 2, True), seed=2, nan_fraction=0.2)
    graph = circuit.graph
    by_sum = dict(zip(graph.sources, viz.node_scores(circuit, "sum")))
    by_max = dict(zip(graph.sources, viz.node_scores(circuit, "max")))
    for node in graph.sources:
        touching = [abs(s) for e, s in zip(graph.edges, circuit.scores)
                    if not np.isnan(s) and (e.split("->")[0] == node or e.split("->")[1] in (node, f"{node}.q", f"{node}.k", f"{node}.v"))]
        assert by_sum[node] == pytest.approx(sum(touching)) and by_max[node] == pytest.approx(max(touching)), node
    silent = Circuit("x", "t", graph, np.full(graph.n_gates, np.nan), (), "kl", "corrupt")
    assert np.isnan(viz.node_scores(silent)).all()
    with pytest.raises(ValueError, match="reduce must be one of sum, max"):
        viz.node_scores(circuit, "mean")
    nodes = random_circuit(aj.Graph(3, 2, True, level="node"), seed=3, nan_fraction=0.0)
    np.testing.assert_array_equal(viz.node_scores(nodes), np.abs(nodes.scores))


def test_heat_maps(tmp_path):
    circuit = tracr_reverse_acdc()
    assert png_size(viz.plot_scores(circuit, tmp_path / "scores.png"))[0] > 100
    root = svg_tree(viz.plot_scores(circuit, tmp_path / "scores.svg", per_edge=True, reduce="max"))
    texts = svg_texts(root)
    assert {"MLP", "layer", "head", "source", "destination input", "a3.0.q", "logits"} <= texts
    assert "max of |edge score| over its edges" in texts
    big = random_circuit(aj.Graph.from_model(GPT2), seed=4)
    assert png_size(viz.plot_scores(big, tmp_path / "gpt2.png", per_edge=True))[0] > 500
    with pytest.raises(ValueError, match="need an edge-level circuit"):
        viz.plot_scores(random_circuit(aj.Graph(2, 2, True, level="node")), tmp_path / "n.png", per_edge=True)


# ------------------------------------------------------------------------------------ CLI


def test_cli_draw(tmp_path):
    source = tracr_reverse_acdc().save(tmp_path / "circuit.json")
    out, heat, dot = tmp_path / "c.svg", tmp_path / "h.png", tmp_path / "c.dot"
    result = runner.invoke(app, ["draw", str(source), "-o", str(out), "--heatmap", str(heat), "--per-edge",
                                 "--dot", str(dot)])
    assert result.exit_code == 0, result.output
    assert {"a3.0", "mlp2"} <= svg_texts(svg_tree(out)) and png_size(heat)[0] > 100
    assert dot.read_text().startswith("digraph circuit {")
    result = runner.invoke(app, ["draw", str(source), "-o", str(tmp_path / "all.png"), "--all-nodes"])
    assert result.exit_code == 0 and png_size(tmp_path / "all.png")[0] > 100
    for args, message in [
        (["-o", str(tmp_path / "c.gif")], "save pictures as .svg, .png or .pdf"),
        (["-o", str(out), "--heatmap", str(heat), "--reduce", "mean"], "--reduce must be one of sum, max"),
    ]:
        result = runner.invoke(app, ["draw", str(source), *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
