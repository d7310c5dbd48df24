"""HISP: head importance scores for pruning (Michel et al. 2019), for heads, MLPs and the embedding.

Michel et al. score head h by ``I_h = E_x |d L(x) / d xi_h|`` at ``xi = 1``, where ``xi_h`` is a
mask multiplying the head's output. On a node-level graph a node gate is exactly such a mask
(interpolating towards the ablated value instead of towards 0; with zero ablation they coincide),
so::

    score_n = sum_prompts | d loss / d g_n (that prompt's share) |     at all gates 1

where a prompt's share is its contribution to the gradient of the batch metric (``loss`` =
``Metric.loss``): for a mean over prompts, ``1/n`` times the gradient of that prompt's own metric,
so the score is the mean over prompts of the per-prompt gradient magnitude. Scores are >= 0 and
unsigned by definition (a node whose effect flips sign between prompts still scores high); the
signed sum over prompts, which is node-level EAP, is in ``circuit.extra["signed"]`` (positive =
supports the clean behaviour). ``normalize_per_layer`` divides each layer's head scores by their
L2 norm, as Michel et al. do before pruning across layers (MLPs and ``embed`` are left as they
are). Like EAP, HISP vanishes for a metric whose minimum is the clean model (kl, l2).
"""

from __future__ import annotations

import time
import warnings

import jax.numpy as jnp
import numpy as np

from ._circuit import Circuit
from ._gradients import (MINIMUM_AT_CLEAN, attribution_circuit, gate_point_logits, pullback, shares_rows,
                         uniform_alphas, uniform_gate_gradients)
from ._problem import Problem


def per_prompt_gate_gradients(problem: Problem, gates, *, chunk_size: int | None = None) -> np.ndarray:
    """``[n_prompts, n_gates]``: each prompt's share of ``d loss / d gates`` (they sum to the batch
    gradient). At a uniform gate vector (all 1 for HISP) from one residual stream, at the plain
    model's cost (``_gradients.uniform_gate_gradients``); elsewhere from the gated forward."""
    dtype = problem.model.dtype
    gates = jnp.asarray(gates, dtype)
    alphas = uniform_alphas(problem.graph, gates[None])
    if alphas is not None:
        return uniform_gate_gradients(problem, alphas, per_row=True, chunk_size=chunk_size)[0]
    n_rows = problem.run.tokens.shape[0]
    _, _, per_prompt = pullback(
        problem,
        gate_point_logits,
        n_points=1,
        weights=jnp.ones(1),
        aux={"gates": gates[None], "shared_rows": shares_rows(problem.graph, gates)},
        shared=jnp.zeros_like(gates)[None],
        per_config=jnp.zeros((n_rows, gates.shape[0]), dtype),
        chunk_size=chunk_size,
    )
    return np.asarray(per_prompt, np.float64)


def hisp(
    problem: Problem,
    *,
    normalize_per_layer: bool = False,
    top_n: int | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
) -> Circuit:
    """HISP importance of every node of a node-level ``problem`` (see the module docstring)."""
    graph = problem.graph
    if graph.level != "node":
        raise ValueError("hisp scores nodes: build the problem on a node-level graph (level='node')")
    if problem.metric.name in MINIMUM_AT_CLEAN:
        warnings.warn(
            f"HISP with {problem.metric.name!r}: the clean model is this metric's minimum, so every gradient "
            "is zero up to float error; use a metric such as logit_diff or nll",
            stacklevel=2,
        )
    started = time.perf_counter()
    per_prompt = per_prompt_gate_gradients(problem, graph.gates(1.0, problem.model.dtype), chunk_size=chunk_size)
    scores = np.abs(per_prompt).sum(0)
    if normalize_per_layer:
        for layer in range(graph.n_layers):
            heads = graph.indices([f"a{layer}.{h}" for h in range(graph.n_heads)])
            norm = np.linalg.norm(scores[heads])
            if norm > 0:
                scores[heads] = scores[heads] / norm
    return attribution_circuit(
        problem,
        "hisp",
        -per_prompt.sum(0),
        absolute=False,
        top_n=top_n,
        threshold=threshold,
        started=started,
        settings={"normalize_per_layer": bool(normalize_per_layer), "metric": problem.metric.name,
                  "ablation": problem.ablation},
        scores=scores,
    )
