"""EAP-IG over activations against a plain-loop float64 reimplementation, and its completeness."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from acdc_jax.methods import Problem, get_method
from acdc_jax.methods.eap_ig_activations import eap_ig_activations, group_path_gradients, source_groups
from acdc_jax.models._transformer import _attention, _block_at, _embed, _mlp, _unembed
from acdc_jax.patching import source_values

from .conftest import TINY_CONFIGS
from .test_gradient_methods import _random_model, _toy_task


@functools.lru_cache(maxsize=None)
def _problem():
    model = _random_model(TINY_CONFIGS["gpt2-like"], 3, 0.4)
    return Problem.build(model, _toy_task(model, n_prompts=3, seed=1), metric="nll", ablation="corrupt")


def _reference_loss(problem, fixed, eps):
    """Plain residual forward over all prompts; sources in ``fixed`` (index -> array) are constants;
    ``eps`` (zeros) is added to every destination input, so its gradient is d loss / d in_d."""
    model, run = problem.model, problem.run
    cfg = model.config
    H = cfg.n_heads
    resid = fixed.get(0, _embed(model, run.tokens, None))
    for layer in range(cfg.n_layers):
        block = _block_at(model, layer)
        first = 1 + layer * (H + 1)
        q, k, v = (resid[None] + eps[f"{t}{layer}"] for t in "qkv")
        z = _attention(cfg, block, jnp.asarray(layer), q, k, v, None)
        heads = jnp.einsum("hbqe,hed->hbqd", z, block.attn.W_O)
        if first in fixed:
            heads = jnp.stack([fixed[first + h] for h in range(H)])
        resid = resid + heads.sum(0) + block.attn.b_O[None, None]
        out = _mlp(cfg, block, resid + eps[f"mlp{layer}"], None)
        resid = resid + fixed.get(first + H, out)
    logits = _unembed(model, resid + eps["logits"], run.positions)
    return problem.metric.loss(logits, problem.inputs)


def _reference_terms(problem, steps):
    """``{(group, k): {edge: c_e}}`` with one forward and backward per (group, step), plain loops."""
    model, run, graph = problem.model, problem.run, problem.graph
    cfg = model.config
    clean = np.asarray(source_values(model, run.tokens))
    ablated = np.asarray(jnp.broadcast_to(run.ablation.values, clean.shape))
    delta = clean - ablated
    shape = clean.shape[1:]
    eps = {"logits": jnp.zeros(shape)}
    for layer in range(cfg.n_layers):
        for t in "qkv":
            eps[f"{t}{layer}"] = jnp.zeros((cfg.n_heads,) + shape)
        eps[f"mlp{layer}"] = jnp.zeros(shape)
    src_index = {name: i for i, name in enumerate(graph.sources)}
    out = {}
    for g, (_, members) in enumerate(source_groups(problem)):
        for k in range(1, steps + 1):
            alpha = k / steps
            fixed = {int(s): jnp.asarray(ablated[s] + alpha * delta[s]) for s in members}
            grads = jax.grad(lambda e: _reference_loss(problem, fixed, e))(eps)
            terms = {}
            for name in graph.gate_names:
                src, dst = graph.split_edge(name)
                parts = dst.split(".")
                if dst == "logits" or dst.startswith("mlp"):
                    grad = grads[dst]
                else:  # a{l}.{h}.t
                    grad = grads[f"{parts[2]}{parts[0][1:]}"][int(parts[1])]
                terms[name] = float(np.sum(delta[src_index[src]] * np.asarray(grad)))
            out[g, k] = terms
    return out


def test_eap_ig_activations_matches_a_plain_loop_reimplementation():
    steps = 3
    with jax.enable_x64(True):
        problem = _problem()
        ref = _reference_terms(problem, steps)
        names = problem.graph.gate_names
        n_groups = len(source_groups(problem))
        c = group_path_gradients(problem, steps)
        for (g, k), terms in ref.items():
            np.testing.assert_allclose(c[g, k - 1], [terms[n] for n in names], rtol=1e-9, atol=1e-12)
        library = -np.array([sum(t[n] for t in ref.values()) for n in names]) / (n_groups * steps)
        np.testing.assert_allclose(eap_ig_activations(problem, steps=steps).scores, library, rtol=1e-9, atol=1e-12)
        src_group = {}
        for g, (_, members) in enumerate(source_groups(problem)):
            for s in members:
                src_group[problem.graph.sources[s]] = g
        own = -np.array([sum(ref[src_group[problem.graph.split_edge(n)[0]], k][n] for k in range(1, steps + 1))
                         for n in names]) / steps
        circuit = get_method("eap-ig-activations-own").fn(problem, steps=steps)
        np.testing.assert_allclose(circuit.scores, own, rtol=1e-9, atol=1e-12)



def test_own_group_scores_are_complete_as_the_steps_grow():
    """Along group G's path, d loss / d alpha is the sum of c over G's outgoing edges, so the own-group
    scores of G's edges sum to loss(G ablated alone) - loss(clean), with an O(1/m) right-endpoint error:
    m * error settles, and Richardson's 2 S(2m) - S(m) cancels the 1/m term."""
    with jax.enable_x64(True):
        problem = _problem()
        graph = problem.graph
        src_of = np.array([graph.split_edge(n)[0] for n in graph.gate_names])
        out_of = [np.isin(src_of, [graph.sources[s] for s in members]) for _, members in source_groups(problem)]
        clean = float(problem.loss(graph.gates(1.0, jnp.float64)))
        targets = np.array([float(problem.loss(jnp.asarray(np.where(o, 0.0, 1.0)))) - clean for o in out_of])
        assert np.abs(targets).min() > 1e-3  # every group matters, so the sums have something to match
        sums = {}
        for steps in (16, 32, 64):
            scores = get_method("eap-ig-activations-own").fn(problem, steps=steps).scores
            sums[steps] = np.array([scores[o].sum() for o in out_of])
        error = {m: sums[m] - targets for m in sums}
        assert (np.abs(error[64]) < 0.02 * np.abs(targets).max()).all(), error
        np.testing.assert_allclose(64 * error[64], 32 * error[32], rtol=0.15)
        richardson = 2 * sums[64] - sums[32] - targets
        assert (np.abs(richardson) < np.abs(error[64]) / 3).all(), (richardson, error[64])
