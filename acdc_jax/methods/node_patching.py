"""Node-level activation patching: ablate each head, MLP (and the embedding) alone, in one batch.

The score of a node is ``loss(node ablated) - loss(clean)`` on the metric turned lower-is-better:
positive means the node supports the clean behaviour. Nodes with ``|score| >= threshold`` are
kept. It costs one vmapped batch of ``n_nodes`` forward passes, which makes it a cheap first pass;
its kept nodes can restrict an edge-level run (``acdc(..., nodes=...)``).
"""

from __future__ import annotations

import time

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..graph import Graph
from ..patching import auto_chunk_size, chunked_vmap
from ._circuit import Circuit
from ._problem import Problem


@eqx.filter_jit
def _single_ablation_losses(problem: Problem, chunk: int):
    n = problem.graph.n_gates
    rows = 1.0 - jnp.eye(n, dtype=problem.model.dtype)
    reference = problem.loss(jnp.ones(n, problem.model.dtype))
    return chunked_vmap(problem.loss, rows, chunk) - reference


def node_patching(problem: Problem, *, threshold: float = 0.0, include_embed: bool = False, chunk_size: int | None = None) -> Circuit:
    """Score every node by ablating it alone; keep those whose ``|score| >= threshold``."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    started = time.perf_counter()
    if problem.graph.level != "node":
        problem = problem.with_graph(Graph.from_model(problem.model, problem.graph.qkv_split, level="node"))
    graph = problem.graph
    chunk = chunk_size or max(1, min(64, auto_chunk_size(problem.run, graph.n_gates)))
    scores = np.asarray(_single_ablation_losses(problem, chunk), np.float64)
    keep = np.abs(scores) >= threshold
    if not include_embed:
        keep[graph.index("embed")] = True  # the embedding is not a unit under test: always kept
    kept = tuple(name for name, k in zip(graph.gate_names, keep) if k)
    return Circuit.of(
        problem,
        "node-patching",
        scores=scores,
        kept=kept,
        threshold=float(threshold),
        metric_value=problem.evaluate(jnp.asarray(keep, problem.model.dtype)),
        seconds=time.perf_counter() - started,
        settings={"threshold": threshold, "include_embed": include_embed},
    )

