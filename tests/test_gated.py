"""The gated forward: its invariants, its semantics against a plain reference, vmap, grad, tracing."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax.models import run_with_sources

from . import reference
from .conftest import TINY_CONFIGS

GRAPHS = {
    "qkv": dict(qkv_split=True),
    "head": dict(qkv_split=False),
    "internal": dict(qkv_split=True, internal_edges=True),
    "node": dict(qkv_split=True, level="node"),
}


def _tokens(model, batch=3, seed=0):
    cfg = model.config
    rng = np.random.RandomState(seed)
    return rng.randint(0, cfg.d_vocab, (batch, cfg.n_ctx - 1))


def _run(model, graph_kind="qkv", ablation="corrupt", seed=0):
    graph = aj.Graph.from_model(model, **GRAPHS[graph_kind])
    clean, corrupt = _tokens(model, seed=seed), _tokens(model, seed=seed + 1)
    abl = aj.make_ablation(model, ablation, corrupt_tokens=corrupt, reference_tokens=_tokens(model, batch=5, seed=seed + 2))
    return aj.GatedRun(model, graph, clean, abl), clean, corrupt


@pytest.mark.parametrize("graph_kind", sorted(GRAPHS))
def test_all_gates_one_gives_clean_logits(tiny_model, graph_kind):
    run, clean, _ = _run(tiny_model, graph_kind)
    np.testing.assert_allclose(run(run.graph.gates(1.0)), tiny_model(clean), atol=1e-5, rtol=0)


@pytest.mark.parametrize("graph_kind", sorted(GRAPHS))
def test_all_gates_zero_gives_corrupted_logits(tiny_model, graph_kind):
    run, _, corrupt = _run(tiny_model, graph_kind)
    np.testing.assert_allclose(run(run.graph.gates(0.0)), tiny_model(corrupt), atol=1e-5, rtol=0)


def test_zero_ablation_all_off_is_biases_only(tiny_model):
    """With every gate at 0 under zero ablation the residual stream holds only the b_O constants."""
    run, _, _ = _run(tiny_model, ablation="zero")
    cfg = tiny_model.config
    resid = tiny_model.blocks.attn.b_O.sum(0)
    if tiny_model.ln_final is not None:
        resid = (resid - resid.mean()) / jnp.sqrt(resid.var() + cfg.ln_eps) * tiny_model.ln_final.w + tiny_model.ln_final.b
    expected = resid @ tiny_model.W_U + tiny_model.unembed.b_U
    out = run(run.graph.gates(0.0))
    np.testing.assert_allclose(out, jnp.broadcast_to(expected, out.shape), atol=1e-5, rtol=0)


@pytest.mark.parametrize("graph_kind", sorted(GRAPHS))
@pytest.mark.parametrize("ablation", ["corrupt", "zero", "mean"])
def test_matches_plain_reference(tiny_model, graph_kind, ablation):
    """Random gates in [0, 1] (some exactly 0 or 1) against a loop-per-destination numpy reference."""
    with jax.enable_x64(True):
        model = tiny_model.astype(jnp.float64)
        run, clean, _ = _run(model, graph_kind, ablation)
        rng = np.random.RandomState(3)
        gates = rng.uniform(size=run.graph.n_gates)
        gates[rng.uniform(size=gates.shape) < 0.3] = 0.0
        gates[rng.uniform(size=gates.shape) < 0.3] = 1.0
        expected = reference.gated_logits(model, run.graph, clean, gates, run.ablation.values)
        np.testing.assert_allclose(run(jnp.asarray(gates)), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("graph_kind", ["qkv", "head", "node"])
def test_per_position_gates_match_reference(tiny_model, graph_kind):
    with jax.enable_x64(True):
        model = tiny_model.astype(jnp.float64)
        run, clean, _ = _run(model, graph_kind)
        n_pos = clean.shape[1]
        gates = np.random.RandomState(4).uniform(size=(n_pos, run.graph.n_gates))
        expected = reference.gated_logits(model, run.graph, clean, gates, run.ablation.values)
        np.testing.assert_allclose(run(jnp.asarray(gates)), expected, atol=1e-10, rtol=1e-10)
        # the same gate at every position is the global gate
        constant = np.broadcast_to(gates[0], gates.shape)
        np.testing.assert_allclose(run(jnp.asarray(constant)), run(jnp.asarray(gates[0])), atol=1e-12, rtol=0)


def test_gates_interpolate_linearly_where_the_model_is_linear():
    """Without LayerNorm the logits are affine in the gates of edges into ``logits``."""
    cfg = aj.TransformerConfig(
        n_layers=2, n_heads=2, d_model=8, d_head=4, d_mlp=6, d_vocab=11, n_ctx=5, act_fn="relu",
        normalization=None, causal=False, tied_unembed=False,
    )
    model = aj.init_model(cfg, jax.random.PRNGKey(1), std=0.5)
    run, _, _ = _run(model)
    graph = run.graph
    into_logits = np.array([e.endswith("->logits") for e in graph.edges])

    def logits_at(alpha):
        return run(jnp.where(into_logits, alpha, 1.0))

    mid = logits_at(0.25)
    np.testing.assert_allclose(mid, 0.75 * logits_at(0.0) + 0.25 * logits_at(1.0), atol=1e-5, rtol=0)
    assert np.abs(logits_at(0.0) - logits_at(1.0)).max() > 1e-2


def test_node_gates_equal_their_expanded_edge_gates(tiny_model):
    """Node gates (one residual carried through the layers) against the same gates on every edge
    (the difference buffer, read per input), in float64: the two sum in different orders."""
    with jax.enable_x64(True):
        model = tiny_model.astype(jnp.float64)
        run_node, clean, _ = _run(model, "node")
        run_edge = aj.GatedRun(model, aj.Graph.from_model(model), clean, run_node.ablation)
        node_gates = np.random.RandomState(5).uniform(size=run_node.graph.n_gates)
        edge_gates = np.array(
            [node_gates[run_node.graph.index(src)] for src, _ in map(aj.Graph.split_edge, run_edge.graph.edges)]
        )
        expected = np.asarray(run_edge(edge_gates))
        np.testing.assert_allclose(run_node(node_gates), expected, atol=1e-12 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("graph_kind", ["qkv", "node"])
def test_vmap_over_gate_configurations_equals_loop(tiny_model, graph_kind):
    """In float64, so that the comparison is of the batching, not of float32 summation order."""
    with jax.enable_x64(True):
        run, _, _ = _run(tiny_model.astype(jnp.float64), graph_kind)
        gates = jax.random.uniform(jax.random.PRNGKey(7), (16, run.graph.n_gates), jnp.float64)
        looped = np.stack([np.asarray(run(g)) for g in gates])
        np.testing.assert_allclose(run.batched(gates), looped, atol=1e-12, rtol=0)
        np.testing.assert_allclose(run.batched(gates, chunk_size=5), looped, atol=1e-12, rtol=0)


def test_chunked_vmap_handles_pytrees_and_padding():
    xs = {"a": jnp.arange(11.0), "b": jnp.arange(22.0).reshape(11, 2)}
    out = aj.chunked_vmap(lambda x: x["a"] * x["b"].sum(), xs, 4)
    np.testing.assert_array_equal(out, jax.vmap(lambda x: x["a"] * x["b"].sum())(xs))


@pytest.mark.parametrize("graph_kind", ["qkv", "internal", "node"])
def test_gate_gradient_matches_central_differences(tiny_model, graph_kind):
    with jax.enable_x64(True):
        model = tiny_model.astype(jnp.float64)
        run, _, _ = _run(model, graph_kind)
        weights = jax.random.normal(jax.random.PRNGKey(2), run(run.graph.gates(1.0, jnp.float64)).shape, jnp.float64)

        def f(gates):
            return jnp.sum(jnp.tanh(run.logits(gates)) * weights)

        gates = jax.random.uniform(jax.random.PRNGKey(3), (run.graph.n_gates,), jnp.float64)
        grad = jax.jit(jax.grad(f))(gates)
        picks = np.random.RandomState(0).choice(run.graph.n_gates, size=min(40, run.graph.n_gates), replace=False)
        eps = 1e-5
        f_jit = jax.jit(f)
        for i in picks:
            step = jnp.zeros_like(gates).at[i].set(eps)
            numeric = (f_jit(gates + step) - f_jit(gates - step)) / (2 * eps)
            np.testing.assert_allclose(grad[i], numeric, rtol=1e-6, atol=1e-9, err_msg=run.graph.name(int(i)))


def test_changing_gate_values_does_not_retrace(tiny_model):
    run, _, _ = _run(tiny_model)
    chex.clear_trace_counter()  # chex counts traces per code object, across parametrisations

    @eqx.filter_jit
    @chex.assert_max_traces(n=1)
    def metric(run, gates):
        return run.logits(gates).sum()

    for value in (1.0, 0.5, 0.0):
        metric(run, run.graph.gates(value))
    metric(run, jax.random.uniform(jax.random.PRNGKey(0), (run.graph.n_gates,)))


@pytest.mark.parametrize("graph_kind", ["qkv", "node"])
def test_resuming_from_a_layer_with_clean_prefix_equals_full_run(tiny_model, graph_kind):
    """ACDC's shortcut: with every gate below layer l at 1, running from l on clean deltas is exact
    (node gates resume their carried residual from one read of the differences)."""
    run, _, _ = _run(tiny_model, graph_kind)
    graph = run.graph
    layers = graph.edge_layers() if graph.level == "edge" else np.array([_node_layer(graph, n) for n in graph.nodes])
    deltas = run.clean_deltas()
    resume = eqx.filter_jit(aj.GatedRun.logits_from)  # one compilation: the start layer is traced
    for start in range(tiny_model.config.n_layers + 1):
        gates = jnp.where(layers >= start, jax.random.uniform(jax.random.PRNGKey(start), (graph.n_gates,)), 1.0)
        np.testing.assert_allclose(resume(run, jnp.int32(start), deltas, gates), run(gates), atol=2e-6, rtol=0)
        np.testing.assert_allclose(run.logits_from(start, deltas, gates), run(gates), atol=2e-6, rtol=0)


def _node_layer(graph, node):
    """The first layer whose inputs a node's gate changes: embed 0, a{l}.h l (its layer's MLP reads
    it), mlp{l} l + 1."""
    if node == "embed":
        return 0
    layer = int(node.split(".")[0].lstrip("amlp"))
    return layer + 1 if node.startswith("mlp") else layer


def test_sources_sum_to_the_residual_stream(tiny_model):
    """embed + every head + b_O + every MLP is exactly what the final LayerNorm reads."""
    tokens = _tokens(tiny_model)
    out = run_with_sources(tiny_model, jnp.asarray(tokens))
    np.testing.assert_allclose(out.logits, tiny_model(tokens), atol=1e-5, rtol=0)
    assert out.values.shape == (tiny_model.config.n_sources,) + tokens.shape + (tiny_model.config.d_model,)


def test_gated_run_rejects_mismatched_shapes(tiny_model):
    graph = aj.Graph.from_model(tiny_model)
    clean = _tokens(tiny_model)
    abl = aj.corrupt_ablation(tiny_model, clean[:, :-1])
    with pytest.raises(aj.InputError, match="same shape, position by position"):
        aj.GatedRun(tiny_model, graph, clean, abl)
    other = aj.Graph(n_layers=5, n_heads=1, has_mlp=True)
    with pytest.raises(aj.InputError, match="does not belong to this model"):
        aj.GatedRun(tiny_model, other, clean, aj.zero_ablation(tiny_model))
    run = aj.GatedRun(tiny_model, graph, clean, aj.zero_ablation(tiny_model))
    with pytest.raises(aj.GraphError, match="gates must have shape"):
        run(jnp.ones(graph.n_gates + 1))


TRIM_CONFIGS = {
    "rotary-gqa-parallel": aj.TransformerConfig(
        n_layers=2, n_heads=4, n_kv_heads=2, d_model=16, d_head=4, d_mlp=24, d_vocab=29, n_ctx=9, normalization="rms",
        positional="rotary", gated_mlp=True, act_fn="silu", tied_unembed=False, parallel=True),
    "post-norms-windows": aj.TransformerConfig(
        n_layers=2, n_heads=2, n_kv_heads=1, d_model=8, d_head=4, d_mlp=16, d_vocab=29, n_ctx=9, normalization="gemma_rms",
        post_norms=True, positional="rotary", gated_mlp=True, act_fn="gelu_new", attn_softcap=2.0, logit_softcap=3.0,
        sliding_window=(None, 3), embed_multiplier=2.0),
}


@pytest.mark.parametrize("name", ["gpt2-like", "tracr-like", *sorted(TRIM_CONFIGS)])
def test_the_last_layer_at_the_read_positions_equals_the_full_run_there(name):
    """With a few read positions the gated forward runs its last layer only there (queries, heads and
    MLP; keys and values everywhere): the logits equal the full run's at those positions, at random
    gates, on every graph kind and from every (traced) start layer, in float64."""
    with jax.enable_x64(True):
        model = aj.init_model({**TINY_CONFIGS, **TRIM_CONFIGS}[name], jax.random.PRNGKey(0), std=0.5)
        model = jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)
        clean, corrupt = _tokens(model), _tokens(model, seed=1)
        n = clean.shape[1]
        positions = jnp.asarray([[n - 1, 2], [n - 3, 0], [1, n - 1]])
        ablation = aj.corrupt_ablation(model, corrupt)
        for kind in ("qkv", "node"):
            graph = aj.Graph.from_model(model, **GRAPHS[kind])
            gates = jnp.asarray(np.random.RandomState(2).uniform(size=graph.n_gates))
            full = np.take_along_axis(np.asarray(aj.GatedRun(model, graph, clean, ablation)(gates)), np.asarray(positions)[:, :, None], 1)
            run = aj.GatedRun(model, graph, clean, ablation, positions)
            np.testing.assert_allclose(run(gates), full, rtol=1e-12, atol=1e-12 * np.abs(full).max())
        # ACDC's resumed runs: a traced start layer, layers below it on the clean differences
        for kind in ("qkv", "node"):
            graph = aj.Graph.from_model(model, **GRAPHS[kind])
            layers = (graph.edge_layers() if kind == "qkv"
                      else np.array([_node_layer(graph, node) for node in graph.nodes]))
            run = aj.GatedRun(model, graph, clean, ablation, positions)
            resume = eqx.filter_jit(aj.GatedRun.logits_from)
            for start in range(model.config.n_layers + 1):
                later = jnp.where(layers >= start, jnp.asarray(np.random.RandomState(start).uniform(size=layers.shape)), 1.0)
                expected = np.take_along_axis(np.asarray(aj.GatedRun(model, graph, clean, ablation)(later)),
                                              np.asarray(positions)[:, :, None], 1)
                got = resume(run, jnp.int32(start), run.clean_deltas(), later)
                np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


def _clean_into(graph, gates, destinations):
    """``gates`` with every edge into these destinations at 1 (nodes ``a{l}.h.q|k|v``, ``a{l}.h``,
    ``mlp{l}``, ``logits``, matched on the edge's destination prefix)."""
    gates = np.array(gates)
    for i, edge in enumerate(graph.edges):
        if any(edge.split("->")[1] == d or edge.split("->")[1].startswith(d + ".") for d in destinations):
            gates[i] = 1.0
    return gates


@pytest.mark.parametrize("name", ["gpt2-like", "attn-only", *sorted(TRIM_CONFIGS)])
def test_layers_reading_every_source_at_one_read_the_carried_residual_exactly(name):
    """A layer whose inputs all read every earlier source at 1 reads the run's carried residual
    instead of the difference buffer (and so does an MLP, or the unembedding, whose row is all 1).
    At gates mixing such layers with pruned ones: the reference's logits (every read position, and
    the last layer trimmed to a few positions), the same per configuration in a vmapped batch that
    mixes configurations with and without such layers, and gradients equal to central differences
    at gates 1 and at the mixed gates (differentiated runs read the buffer), in float64."""
    with jax.enable_x64(True):
        model = aj.init_model({**TINY_CONFIGS, **TRIM_CONFIGS}[name], jax.random.PRNGKey(0), std=0.5)
        model = jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)
        cfg = model.config
        clean, corrupt = _tokens(model), _tokens(model, seed=1)
        ablation = aj.corrupt_ablation(model, corrupt)
        positions = jnp.asarray([[clean.shape[1] - 1], [2], [0]])
        for kind in ("qkv", "head") if name == "gpt2-like" else ("qkv",):
            graph = aj.Graph.from_model(model, **GRAPHS[kind])
            rng = np.random.RandomState(1)
            random = rng.uniform(size=graph.n_gates)
            mlp = ["mlp0"] if cfg.has_mlp else []
            configs = {
                "layer 0 and the logits clean": _clean_into(graph, random, ["a0", "logits"]),
                "a pruned layer 0, the rest clean": _clean_into(graph, random, [f"a{l}" for l in range(1, cfg.n_layers)]
                                                                + [f"mlp{l}" for l in range(cfg.n_layers) if cfg.has_mlp]
                                                                + ["logits"]),
                "only an MLP clean": _clean_into(graph, random, mlp),
                "all clean": np.ones(graph.n_gates),
            }
            run = aj.GatedRun(model, graph, clean, ablation)
            trimmed = aj.GatedRun(model, graph, clean, ablation, positions)
            for what, gates in configs.items():
                expected = reference.gated_logits(model, graph, clean, gates, ablation.values)
                scale = np.abs(expected).max()
                np.testing.assert_allclose(run(gates), expected, rtol=0, atol=1e-12 * scale, err_msg=what)
                at = np.take_along_axis(expected, np.asarray(positions)[:, :, None], 1)
                np.testing.assert_allclose(trimmed(gates), at, rtol=0, atol=1e-12 * scale, err_msg=what)
            stacked = np.stack(list(configs.values()))
            looped = np.stack([np.asarray(run(g)) for g in stacked])
            np.testing.assert_allclose(run.batched(stacked), looped, rtol=0, atol=1e-12 * np.abs(looped).max())
            clean_only = np.stack([configs["all clean"]] * 2)
            np.testing.assert_allclose(run.batched(clean_only), looped[[-1, -1]], rtol=0, atol=1e-12 * np.abs(looped).max())

            weights = jax.random.normal(jax.random.PRNGKey(2), expected.shape, jnp.float64)

            def f(gates, run=run, weights=weights):
                return jnp.sum(jnp.tanh(run.logits(gates)) * weights)

            grad, f_jit = jax.jit(jax.grad(f)), jax.jit(f)
            picks = rng.choice(graph.n_gates, size=min(12, graph.n_gates), replace=False)
            for what in ("all clean", "a pruned layer 0, the rest clean"):
                at_gates = jnp.asarray(configs[what])
                g = grad(at_gates)
                for i in picks:
                    step = jnp.zeros_like(at_gates).at[i].set(1e-5)
                    numeric = (f_jit(at_gates + step) - f_jit(at_gates - step)) / 2e-5
                    np.testing.assert_allclose(g[i], numeric, rtol=1e-6, atol=1e-9, err_msg=f"{what}: {graph.name(int(i))}")
