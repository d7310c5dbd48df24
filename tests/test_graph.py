"""The graph: sizes of the published graphs, names, order, and the dense gate layout."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import acdc_jax as aj
from acdc_jax.models import TransformerConfig

GPT2 = TransformerConfig.gpt2()


def test_gpt2_small_edge_counts():
    assert aj.Graph.from_model(GPT2, qkv_split=True).n_edges == 32_491
    acdc = aj.Graph.from_model(GPT2, qkv_split=True, internal_edges=True)
    assert acdc.n_edges == 32_923
    assert len(acdc.internal_edge_names) == 432
    assert aj.Graph.from_model(GPT2, qkv_split=False).n_edges == 11_611
    node = aj.Graph.from_model(GPT2, level="node")
    assert node.n_gates == 1 + 144 + 12
    assert node.n_edges == 32_491  # the underlying edges stay listed


@pytest.mark.parametrize("size", ["distilgpt2", "gpt2-medium"])
def test_edge_count_formula(size):
    cfg = TransformerConfig.gpt2(size)
    L, H = cfg.n_layers, cfg.n_heads
    attn = sum(3 * H * (1 + l * (H + 1)) for l in range(L))
    mlp = sum(1 + l * (H + 1) + H for l in range(L))
    assert aj.Graph.from_model(cfg).n_edges == attn + mlp + 1 + L * (H + 1)


def test_attention_only_graph():
    cfg = TransformerConfig(n_layers=2, n_heads=4, d_model=16, d_head=4, d_vocab=10, n_ctx=8)
    g = aj.Graph.from_model(cfg)
    assert g.sources == ("embed",) + tuple(f"a{l}.{h}" for l in range(2) for h in range(4))
    assert g.n_edges == 12 * 1 + 12 * 5 + 9
    assert "a0.1->a1.2.k" in g.edges and not any("mlp" in e for e in g.edges)


def test_names_round_trip_and_order_is_topological():
    g = aj.Graph.from_model(TransformerConfig.gpt2("distilgpt2"), internal_edges=True)
    for i in range(0, g.n_edges, 97):
        assert g.index(g.name(i)) == i
    position = {name: i for i, name in enumerate(g.sources)}
    layers = g.edge_layers()
    assert np.all(np.diff(layers) >= 0)
    for e, layer in zip(g.edges, layers):
        src, dst = g.split_edge(e)
        if src in position and src != "embed":
            src_layer = int(src[1:].split(".")[0]) if src.startswith("a") else int(src[3:])
            assert src_layer < layer or (src_layer == layer and dst.startswith("mlp") and src.startswith("a")), e
    assert g.edges[0] == "embed->a0.0.q" and g.edges[-1] == "mlp5->logits"
    assert g.edges[g.edges.index("embed->a0.0.v") + 1 : g.edges.index("embed->a0.0.v") + 4] == (
        "a0.0.q->a0.0", "a0.0.k->a0.0", "a0.0.v->a0.0",
    )


def test_unknown_names_list_close_matches():
    g = aj.Graph.from_model(GPT2)
    with pytest.raises(aj.GraphError, match=r"unknown edge 'a9\.9->a10\.1\.g'.*close matches: .*a9\.9->a10\.1\.q"):
        g.index("a9.9->a10.1.g")
    with pytest.raises(aj.GraphError, match="unknown destination 'mlp12'"):
        g.sources_of("mlp12")
    with pytest.raises(aj.GraphError, match="unknown node 'a1.12'"):
        aj.Graph.from_model(GPT2, level="node").index("a1.12")


def test_graph_is_static_and_hashable():
    a, b = aj.Graph.from_model(GPT2), aj.Graph.from_model(GPT2)
    assert a == b and hash(a) == hash(b)
    assert a != aj.Graph.from_model(GPT2, qkv_split=False)
    scale = jax.jit(lambda x, g: x * g.n_edges, static_argnums=1)
    assert scale(1.0, a) == 32_491 and scale(2.0, b) == 2 * 32_491


def test_dense_layout_puts_each_gate_where_its_edge_reads():
    cfg = TransformerConfig(n_layers=2, n_heads=2, d_model=8, d_head=4, d_mlp=8, d_vocab=10, n_ctx=8)
    g = aj.Graph.from_model(cfg)
    gates = np.arange(1, g.n_gates + 1, dtype=np.float32)
    dense = g.dense(gates)
    for i, e in enumerate(g.edges):
        src, dst = g.split_edge(e)
        s = g.sources.index(src)
        if dst == "logits":
            value = dense.logits[s]
        elif dst.startswith("mlp"):
            value = dense.mlp[int(dst[3:]), s]
        else:
            layer, rest = dst[1:].split(".", 1)
            h, t = rest.split(".")
            value = dense.attn[int(layer), 3 * int(h) + "qkv".index(t), s]
        assert value == gates[i], e
    total = float(dense.attn.sum() + dense.mlp.sum() + dense.logits.sum())
    assert total == float(gates.sum())  # nothing else is non-zero


def test_gates_from_names():
    g = aj.Graph.from_model(GPT2, qkv_split=False)
    gates = np.asarray(g.gates_from_names(["embed->logits", "a3.4->mlp7"]))
    assert gates.sum() == 2 and gates[g.index("a3.4->mlp7")] == 1


@settings(max_examples=30, deadline=None)
@given(
    n_layers=st.integers(1, 4),
    n_heads=st.integers(1, 4),
    has_mlp=st.booleans(),
    qkv_split=st.booleans(),
    internal=st.booleans(),
    parallel=st.booleans(),
)
def test_graph_properties_for_any_shape(n_layers, n_heads, has_mlp, qkv_split, internal, parallel):
    """Edge count formula, name round trip, and each gate landing exactly where its edge reads.
    ``parallel`` (GPT-NeoX): an MLP reads no head of its own layer."""
    internal = internal and qkv_split
    g = aj.Graph(n_layers, n_heads, has_mlp, qkv_split, internal_edges=internal, parallel=parallel)
    per_head = 3 if qkv_split else 1
    M = int(has_mlp)
    own_heads = 0 if parallel else n_heads
    expected = sum(per_head * n_heads * (1 + l * (n_heads + M)) + M * (1 + l * (n_heads + M) + own_heads) for l in range(n_layers))
    expected += 1 + n_layers * (n_heads + M) + (3 * n_heads * n_layers if internal else 0)
    assert g.n_edges == expected
    assert len(set(g.edges)) == g.n_edges and all(g.index(e) == i for i, e in enumerate(g.edges))
    gates = np.random.RandomState(0).uniform(0.5, 1.0, g.n_gates).astype(np.float32)
    dense = g.dense(gates)
    total = float(dense.attn.sum() + dense.logits.sum() + (dense.mlp.sum() if has_mlp else 0.0))
    residual = [i for i, e in enumerate(g.edges) if e not in g.internal_edge_names]
    if not internal:
        np.testing.assert_allclose(total, gates[residual].sum(), rtol=1e-5)
    node = aj.Graph(n_layers, n_heads, has_mlp, qkv_split, level="node", parallel=parallel)
    node_dense = node.dense(np.ones(node.n_gates, np.float32))
    assert float(node_dense.logits.sum()) == node.n_sources
