"""EAP-IG over activations (``eap-ig-activations``), the third EAP baseline of MIB's circuit track.

**What is interpolated.** The sources are split into *groups*, in this order: the embedding, then
for each layer l its heads together (``a{l}.*``), then its MLP (``mlp{l}``). For one group G and
one ``alpha``, the run is the clean run except that every reader of a source s in G reads the
constant ``x~_s + alpha (x_s - x~_s)`` (``x_s``: the clean run's value of s, ``x~_s``: its ablated
value; corrupted-input ablation: the corrupted run's). It is a constant: no gradient flows from
G's output back into G's inputs (the EAP-IG library replaces the output with a detached tensor).
In this project's gates that run is: gates of the edges out of G at 0, every other gate at 1,
and the ablated values of G's sources replaced by the mix, so that a gate at 0 reads the mix and
nothing flows back through G's own computation.

**What is differentiated.** In every such run, every edge ``s -> d`` (not only the edges out of
G) gets the fixed clean difference dotted with the gradient at its destination input::

    c_e(G, alpha) = (x_s - x~_s) . (d loss / d in_d)(G at alpha)       (x_s - x~_s from the clean run)

(read through zero-valued ghost gates, as in ``eap_ig``'s inputs variant; summed over prompts
and positions by the metric's mean over prompts). Destinations whose only way to the output is
through G (G's own inputs) get 0.

**Library estimator** (``groups="all"``, default; hannamw/EAP-IG ``get_scores_ig_activations``,
which MIB's EAP-IG-activations baseline runs). Steps ``k = 1..m`` (``alpha_k = k / m``: the
right-endpoint grid, alpha = 1, the clean value, included, alpha = 0 not), every group, and the
sum divided by the total number of runs ``n_groups * m``::

    score_e = -(1 / (n_groups m)) sum_G sum_{k=1..m} c_e(G, k / m)

**Own-group estimator** (``groups="own"``, method ``eap-ig-activations-own``; the formulation of
the paper: integrated gradients along the path of the edge's own source). Each edge is
integrated only along the interpolation of its source's group ``G(s)``, with the same grid::

    score_e = -(1 / m) sum_{k=1..m} c_e(G(s), k / m)

**Completeness** (own-group estimator): along G's path, ``d loss / d alpha = sum_{s in G, d}
c_{s->d}(G, alpha)`` exactly (each source's total derivative is the sum over its readers), so
``sum_{s in G} sum_d score(s -> d) -> loss(G ablated alone) - loss(clean)`` as m grows (error
O(1/m) for the right-endpoint rule). The library estimator's sum over G's edges is
``1/n_groups`` of that plus the other groups' runs' terms: no decomposition holds for it.

**Sign and scale.** The library stores ``(x~_s - x_s) . grad M_lib`` averaged over prompts and
runs, with M_lib the metric it is given; MIB gives it a loss (the negative logit difference or
probability difference), so the library's score is this project's score when ``loss`` is the
same metric turned lower-is-better (``Metric.loss``): **this project's score = -(d loss) term as
written above, positive = the edge supports the clean behaviour, ~ metric(full) - metric(edge
ablated)**. ``export.to_mib`` converts to MIB's stored convention (see there).

**Departures from the library.** For a zero or mean ablation the library interpolates towards
zero (it never fills its corrupted buffer) while differencing against the mean; here both use the
ablation's values (they coincide for corrupted-input and zero ablation). Internal edges
``a{l}.{h}.t -> a{l}.{h}`` (which the library does not have) score the sum of their input's
residual edges, as in ``eap_ig``.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from ..models import Ablation
from ._circuit import Circuit
from ._gradients import (
    attribution_circuit,
    fold_internal_edges,
    input_difference_aux,
    pullback,
    run_probed,
    shares_rows,
)
from ._problem import Problem

GROUPINGS = ("all", "own")


def source_groups(problem: Problem) -> list[tuple[str, np.ndarray]]:
    """``(name, source indices)`` for each group in the library's order: embed, then per layer its heads, its MLP."""
    cfg = problem.model.config
    H, M = cfg.n_heads, int(cfg.has_mlp)
    groups = [("embed", np.array([0]))]
    for layer in range(cfg.n_layers):
        first = 1 + layer * (H + M)
        groups.append((f"a{layer}", np.arange(first, first + H)))
        if M:
            groups.append((f"mlp{layer}", np.array([first + H])))
    return groups


def _gate_sources(problem: Problem) -> np.ndarray:
    """Source index of each gate unit (-1 for internal edges, whose source is a head's input)."""
    graph = problem.graph
    index = {name: i for i, name in enumerate(graph.sources)}
    out = []
    for name in graph.gate_names:
        src = name if graph.level == "node" else graph.split_edge(name)[0]
        out.append(index.get(src, -1))
    return np.array(out)


def group_mix_logits(run, row, point, aux, shared, per_config):
    """Group ``aux["masks"][point]`` (a source mask) read as the constant clean/ablated mix at
    ``aux["alphas"][point]``; ``shared[point]`` are ghost gates on the clean differences."""
    deltas = jnp.take(aux["clean_deltas"], row[None], axis=1)
    mask = aux["masks"][point][:, None, None, None]
    values = run.ablation.values + aux["alphas"][point] * mask * deltas
    mixed = run.__class__(run.model, run.graph, run.tokens, Ablation.from_values(run.model, values), run.positions)
    return run_probed(mixed, aux["gates"][point], ghost=aux["ghost_base"] + shared[point], ghost_deltas=deltas,
                      shared_rows=aux.get("shared_rows", False))


def group_path_gradients(problem: Problem, steps: int, *, chunk_size: int | None = None):
    """``[n_groups, steps, n_gates]`` array of ``c_e(G, k / steps)``, k = 1..steps (module docstring)."""
    dtype = problem.model.dtype
    graph = problem.graph
    groups = source_groups(problem)
    n_sources = problem.model.config.n_sources
    gate_src = _gate_sources(problem)
    masks, gates = [], []
    for _, members in groups:
        mask = np.zeros(n_sources)
        mask[members] = 1.0
        masks.append(mask)
        gates.append(np.where(np.isin(gate_src, members), 0.0, 1.0))
    alphas = np.arange(1, steps + 1) / steps
    n_groups = len(groups)
    point_alphas = np.tile(alphas, n_groups)
    point_masks = np.repeat(np.array(masks), steps, axis=0)
    point_gates = np.repeat(np.array(gates), steps, axis=0)
    n_points = n_groups * steps
    difference = input_difference_aux(problem)
    _, grad, _ = pullback(
        problem,
        group_mix_logits,
        n_points=n_points,
        weights=jnp.ones(n_points),
        aux={
            "gates": jnp.asarray(point_gates, dtype),
            "masks": jnp.asarray(point_masks, dtype),
            "alphas": jnp.asarray(point_alphas, dtype),
            **difference,
            "shared_rows": shares_rows(graph, point_gates, difference["ghost_base"]),
        },
        shared=jnp.zeros((n_points, graph.n_gates), dtype),
        chunk_size=chunk_size,
    )
    grad = fold_internal_edges(graph, np.array(grad, np.float64))
    return grad.reshape(n_groups, steps, graph.n_gates)


def eap_ig_activations(
    problem: Problem,
    *,
    steps: int = 5,
    groups: str = "all",
    absolute: bool = False,
    top_n: int | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
) -> Circuit:
    """EAP-IG over activations (module docstring): ``groups="all"`` is the EAP-IG library's
    estimator, ``groups="own"`` integrates each edge along its own source group only.
    ``absolute``, ``top_n``, ``threshold`` and ``chunk_size`` are as in ``eap``."""
    if groups not in GROUPINGS:
        raise ValueError(f"groups must be one of {', '.join(GROUPINGS)}, got {groups!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    started = time.perf_counter()
    c = group_path_gradients(problem, int(steps), chunk_size=chunk_size)  # [groups, steps, gates]
    if groups == "all":
        signed = -c.mean(axis=(0, 1))
    else:
        gate_src = _gate_sources(problem)
        signed = np.zeros(problem.graph.n_gates)
        for g, (_, members) in enumerate(source_groups(problem)):
            own = np.isin(gate_src, members)
            signed[own] = -c[g, :, own].mean(axis=1) if own.any() else 0.0
        internal = gate_src < 0  # internal edges: integrated along their own head's group
        if internal.any():
            graph = problem.graph
            for i in np.flatnonzero(internal):
                dst, _ = graph.split_edge(graph.gate_names[i])
                signed[i] = sum(signed[graph.index(f"{src}->{dst}")] for src in graph.sources_of(dst))
    name = "eap-ig-activations" if groups == "all" else "eap-ig-activations-own"
    return attribution_circuit(
        problem,
        name,
        signed,
        absolute=absolute,
        top_n=top_n,
        threshold=threshold,
        started=started,
        settings={"steps": int(steps), "groups": groups, "grid": "k/steps, k=1..steps",
                  "metric": problem.metric.name, "ablation": problem.ablation},
    )
