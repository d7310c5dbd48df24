"""Scoring circuits: ROC/AUC against a canonical circuit (as the ACDC paper counts), faithfulness
curves with MIB's CPR and CMD, KL to the clean model, and plots of each.

**ROC, edge level** (ACDC paper; ``notebooks/roc_plot_generator.py``, ``acdc/acdc_utils.py``).
Units are the edges of the circuit's graph; positives are the canonical circuit's edges in that
graph (``CanonicalCircuit.labels``), negatives every other edge. ACDC's graph has three edge
types and the paper counts two: residual ("ADDITION") edges ``src->dst`` and the q/k/v input to
q/k/v activation ("DIRECT_COMPUTATION") edges, which are this project's ``a{l}.{h}.q->a{l}.{h}``
internal edges; the "PLACEHOLDER" edges (q/k/v activation to head output, MLP input to MLP
output) are never counted and do not exist here. So the paper's numbers (32,923 edges for
GPT-2 small) need ``internal_edges=True``; other graphs count their own edges.

**ROC points and AUC.** One circuit with scores gives one point per cut of its ranking (ties
enter together, NaN = never tested = last); a family of kept sets (ACDC at several thresholds)
gives one point per set. The paper adds (0, 0) and (1, 1), keeps the Pareto-optimal points
(drops every point with another strictly left of it and strictly above it) and integrates the
*pessimistic* staircase through them: ``sum_i (1 - fpr_i) * (tpr_i - tpr_{i-1})``, i.e. a TPR
counts only from the FPR at which it is reached (``acdc_graphics.pessimistic_auc``). That is the
default ``kind="pessimistic"``; ``kind="trapezoid"`` gives the usual trapezoid area. For a
ranking without ties the two agree. On the paper's stored ROC points this gives its table
(IOI 0.869, Greater-Than 0.853, Docstring 0.982; tests/fixtures/acdc_paper_roc_points.json).

**ROC, node level.** ``nodes="acdc"`` counts as the paper does (``get_node_stats``): a node is in
a circuit when it is an endpoint of a kept counted edge, after ACDC's ``filter_nodes``, whose
quirks decide the numbers. In this project's names the nodes are ``embed``, each head's output
``a{l}.{h}``, each q/k/v input ``a{l}.{h}.q|k|v`` (``a{l}.{h}.in`` in a per-head graph), each q/k/v
activation ``a{l}.{h}.hook_q|k|v`` (only when the graph lists internal edges), ``mlp{l}`` and
``logits``. ``hook_q_input`` is renamed to a name that does not match ``hook_q``, so a head's
input and its activation stay two nodes (1,022 nodes for GPT-2 small, as the paper's stored
points imply), and MLP input nodes are dropped, so an MLP counts only through its outgoing
edges. Hence: a source (``embed``, head, MLP) is in when one of its outgoing edges is kept; a
q/k/v input when one of its incoming edges or its internal edge is kept; an activation when its
internal edge is kept; ``logits`` when one of its incoming edges is kept. The ground truth is the
same function of the canonical edge set. ``nodes="sources"`` is this project's node level
(``embed``, heads, MLPs): a node is in when a kept edge starts at it or ends at one of its inputs.
A node's score is the largest score of the edges that put it in (it enters the ranking when the
first of them does). Node-level circuits (Subnetwork Probing style) become edge sets first, as the
paper converts SP's masks: an edge is kept when its source node and the node it feeds are kept
(``logits`` always); as scores, the smaller of the two.

**Faithfulness, CPR and CMD, as MIB computes them** (Mueller et al. 2025; read in hannamw/MIB-circuit-track
at b759df3, ``MIB_circuit_track/evaluation.py`` ``evaluate_area_under_curve`` and ``run_evaluation.py``, the
leaderboard's mttk/MIB-circuit-track-autoeval ``eval_submissions.py``, and the EAP-IG commit the track pins,
7af394a, ``eap/graph.py`` ``apply_topn`` / ``prune`` and ``eap/evaluate.py``). For each fraction k of
``MIB_FRACTIONS`` (0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100%) keep the top ``n = int(k * n_units)``
units (MIB: ``int(pct * len(graph.edges))``, every edge of its graph) by score, or by ``|score|`` with
``absolute=True`` (NaN last, ties in graph order), ablate the rest, and normalise the metric as
``f = (m(C_n) - m(empty)) / (m(full) - m(empty))``: ``m`` is the task metric, a mean over prompts (MIB: the
logit difference of each prompt at its last token, then ``.mean()``), ``m(empty)`` has every unit ablated
(MIB: ``apply_topn(0)``, each edge patched with the counterfactual run) and ``m(full)`` none (MIB: the
unpatched model). Here both come from the same batch as the curve, so f is exactly 0 and 1 at its ends.
CPR is the trapezoid area under f over the ten fractions, ``sum_i (k_{i+1} - k_i) (f_i + f_{i+1}) / 2``, x
the fraction itself on a linear axis from 0.001 to 1 with no point at 0 (MIB's ``log_scale`` defaults to
off and neither the track's ``run_evaluation.py`` nor the leaderboard passes it); higher is better. CMD is
the same trapezoid of ``|1 - f_i|``: absolute values at the points, so a segment on which f crosses 1 counts
``(|1 - f_i| + |1 - f_{i+1}|) / 2`` per unit of x, not the integral of ``|1 - f|``; lower is better. MIB
reports CPR from the ranking by signed score (``--absolute`` off) and CMD from the ranking by ``|score|``
(the leaderboard evaluates both and takes CPR from ``abs-False``, CMD from ``abs-True``):
``mib_evaluation`` runs both curves. A submission of nine fixed circuits (MIB's other format) is scored
from one curve: its circuits' faithfulness at 0.1% .. 50% and 1 at 100%.

Where this differs from MIB, and why it does not change the numbers: MIB prunes dangling edges before it
evaluates a circuit (``Graph.prune``: repeatedly drop nodes without a kept edge in or out, ``input`` always
counting as fed, then edges whose node at either end is out). Under patching that leaves the output as it
is: a node without a kept edge out reaches nothing, and a node without a kept edge in reads only the
counterfactual's activations, so it computes its counterfactual output, which is what its ablated edges
deliver anyway. So the curves here are evaluated without it; ``prune_dangling`` reproduces it for MIB's
edge counts (its ``weighted_edge_counts``, which the commits MIB pins take after one round of the prune),
and the tests check the claim on a model, for one round and for the prune run to its end. MIB reads scores
into float32 and sorts them with ``torch.argsort`` (ties in no specified order); ``mib_scores`` gives the
scores as MIB reads an exported file (NaN written as 0, float32), ranked here with ties in graph order.

**KL to clean**: KL(clean model || circuit) at the task's read positions, mean over prompts and
read positions (``metrics.kl_divergence``), the circuit's kept units at 1 and the rest ablated.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .graph import Graph
from .metrics import Metric, get_metric, kl_divergence
from .patching import auto_chunk_size, chunked_vmap
from .tasks import CanonicalCircuit, Task

AucKind = Literal["pessimistic", "trapezoid"]
NodeConvention = Literal["acdc", "sources"]
RocLevel = Literal["edge", "node"]

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


# --------------------------------------------------------------------------------------------
# ROC primitives


def roc_from_scores(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of every cut of the ranking by score, from (0, 0) to (1, 1); ties move together."""
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    labels = np.asarray(labels, bool)
    if labels.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    n_pos, n_neg = _counts(labels)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    cut = np.flatnonzero(s[1:] != s[:-1])  # last index of each group of tied scores (-inf == -inf)
    ends = np.concatenate([cut, [len(s) - 1]])
    tp = np.cumsum(y)[ends]
    fp = np.cumsum(~y)[ends]
    tpr = np.concatenate([[0.0], tp / n_pos])
    fpr = np.concatenate([[0.0], fp / n_neg])
    return fpr, tpr


def roc_from_masks(masks, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of a family of kept sets (e.g. ACDC at several thresholds), completed as the
    ACDC paper does: corners (0, 0) and (1, 1) added, only Pareto-optimal points kept, sorted."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = _counts(labels)
    fpr, tpr = [0.0, 1.0], [0.0, 1.0]
    for mask in masks:
        mask = np.asarray(mask, bool)
        if mask.shape != labels.shape:
            raise ValueError(f"a kept set has shape {mask.shape}, the labels {labels.shape}")
        fpr.append(float((mask & ~labels).sum() / n_neg))
        tpr.append(float((mask & labels).sum() / n_pos))
    return pareto_frontier(fpr, tpr)


def pareto_frontier(fpr, tpr) -> tuple[np.ndarray, np.ndarray]:
    """The points no other point beats on both axes (strictly left and strictly above), sorted by
    FPR then TPR, duplicates merged (ACDC's ``discard_non_pareto_optimal``)."""
    points = sorted(set(zip(np.asarray(fpr, np.float64).tolist(), np.asarray(tpr, np.float64).tolist())))
    kept = [(x, y) for x, y in points if not any(x1 < x and y1 > y for x1, y1 in points)]
    xs, ys = zip(*kept)
    return np.array(xs), np.array(ys)


def auc(fpr, tpr, kind: AucKind = "pessimistic") -> float:
    """Area under a ROC curve through points sorted by FPR (then TPR).

    ``pessimistic`` (the ACDC paper): the staircase that reaches each TPR only at its FPR,
    ``sum (1 - fpr_i) * (tpr_i - tpr_{i-1})``; needs TPR non-decreasing (use ``pareto_frontier``).
    ``trapezoid``: straight lines between the points.
    """
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1 or fpr.size < 2:
        raise ValueError(f"need two 1-d arrays of at least 2 points, got {fpr.shape} and {tpr.shape}")
    if np.any(np.diff(fpr) < 0):
        raise ValueError("ROC points must be sorted by false positive rate")
    if kind == "pessimistic":
        if np.any(np.diff(tpr) < 0):
            raise ValueError("the pessimistic AUC needs non-decreasing TPR; pass the points through pareto_frontier")
        return float(np.sum((1.0 - fpr[1:]) * np.diff(tpr)))
    if kind == "trapezoid":
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    raise ValueError(f"kind must be 'pessimistic' or 'trapezoid', got {kind!r}")


def roc_auc(scores, labels, kind: AucKind = "pessimistic") -> float:
    """AUC of the ranking by score (see ``roc_from_scores`` and ``auc``)."""
    return auc(*roc_from_scores(scores, labels), kind=kind)


def precision_recall(kept_mask, labels) -> tuple[float, float]:
    """Precision and recall of a kept set against the reference (precision is 1 for an empty set)."""
    kept, labels = np.asarray(kept_mask, bool), np.asarray(labels, bool)
    tp = int((kept & labels).sum())
    precision = tp / kept.sum() if kept.any() else 1.0
    recall = tp / labels.sum() if labels.any() else 1.0
    return float(precision), float(recall)


def _counts(labels: np.ndarray) -> tuple[int, int]:
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs at least one positive and one negative unit")
    return n_pos, n_neg


# --------------------------------------------------------------------------------------------
# Nodes from edges, edges from nodes


def _edge_graph(graph: Graph) -> Graph:
    return dataclasses.replace(graph, level="edge")


def _owner(dst: str) -> str | None:
    """The node a destination input belongs to (None for ``logits``)."""
    if dst == "logits":
        return None
    if dst.startswith("mlp"):
        return dst
    return ".".join(dst.split(".")[:2])


def node_names(graph: Graph, convention: NodeConvention = "acdc") -> tuple[str, ...]:
    """The units of node-level ROC under ``convention`` (see the module docstring)."""
    if convention == "sources":
        return graph.sources
    if convention != "acdc":
        raise ValueError(f"convention must be 'acdc' or 'sources', got {convention!r}")
    names = ["embed"]
    for layer in range(graph.n_layers):
        for h in range(graph.n_heads):
            head = f"a{layer}.{h}"
            letters = ("q", "k", "v") if graph.qkv_split else ("in",)
            names += [f"{head}.{t}" for t in letters]
            if graph.internal_edges:
                names += [f"{head}.hook_{t}" for t in letters]
            names.append(head)
        if graph.has_mlp:
            names.append(f"mlp{layer}")
    names.append("logits")
    return tuple(names)


def _edge_nodes(graph: Graph, convention: NodeConvention) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """For every edge of ``graph`` (edge level), the (up to two) nodes its being kept puts in."""
    graph = _edge_graph(graph)
    names = node_names(graph, convention)
    index = {n: i for i, n in enumerate(names)}
    first = np.full(graph.n_edges, -1, np.int64)
    second = np.full(graph.n_edges, -1, np.int64)
    internal = set(graph.internal_edge_names)
    for e, edge in enumerate(graph.edges):
        src, dst = Graph.split_edge(edge)
        if edge in internal:  # a{l}.{h}.t -> a{l}.{h}
            if convention == "acdc":
                head, t = src.rsplit(".", 1)
                first[e], second[e] = index[src], index[f"{head}.hook_{t}"]
            else:
                first[e] = index[dst]
            continue
        first[e] = index[src]
        if convention == "sources":
            owner = _owner(dst)
            second[e] = -1 if owner is None else index[owner]
        elif dst == "logits":
            second[e] = index["logits"]
        elif dst.startswith("mlp"):
            second[e] = -1  # ACDC's filter_nodes drops MLP inputs
        else:
            second[e] = index[dst if graph.qkv_split else f"{dst}.in"]
    return first, second, names


def nodes_from_edges(graph: Graph, kept_edges, convention: NodeConvention = "acdc") -> np.ndarray:
    """Boolean mask over ``node_names(graph, convention)``: the nodes a kept edge set puts in."""
    first, second, names = _edge_nodes(graph, convention)
    kept = np.asarray(kept_edges, bool)
    if kept.shape != first.shape:
        raise ValueError(f"need one flag per edge ({first.shape[0]}), got {kept.shape}")
    mask = np.zeros(len(names), bool)
    mask[first[kept]] = True
    mask[second[kept & (second >= 0)]] = True
    return mask


def node_scores_from_edges(graph: Graph, edge_scores, convention: NodeConvention = "acdc") -> np.ndarray:
    """Each node's score: the largest score of the edges that put it in (NaN when all are NaN)."""
    first, second, names = _edge_nodes(graph, convention)
    scores = np.nan_to_num(np.asarray(edge_scores, np.float64), nan=-np.inf)
    if scores.shape != first.shape:
        raise ValueError(f"need one score per edge ({first.shape[0]}), got {scores.shape}")
    out = np.full(len(names), -np.inf)
    np.maximum.at(out, first, scores)
    has_second = second >= 0
    np.maximum.at(out, second[has_second], scores[has_second])
    return np.where(np.isneginf(out), np.nan, out)


def _edge_endpoint_nodes(graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """Source node and fed node (index into ``graph.sources``; -1 for ``logits``) of every edge."""
    graph = _edge_graph(graph)
    src_index = {n: i for i, n in enumerate(graph.sources)}
    internal = set(graph.internal_edge_names)
    src = np.zeros(graph.n_edges, np.int64)
    fed = np.zeros(graph.n_edges, np.int64)
    for e, edge in enumerate(graph.edges):
        s, d = Graph.split_edge(edge)
        if edge in internal:
            src[e] = fed[e] = src_index[d]
            continue
        owner = _owner(d)
        src[e] = src_index[s]
        fed[e] = -1 if owner is None else src_index[owner]
    return src, fed


def edges_from_nodes(graph: Graph, kept_nodes) -> np.ndarray:
    """Boolean mask over the edges of ``graph`` at edge level: kept when its source node and the
    node it feeds are kept (``logits`` always is)."""
    src, fed = _edge_endpoint_nodes(graph)
    kept = np.asarray(kept_nodes, bool)
    if kept.shape != (graph.n_sources,):
        raise ValueError(f"need one flag per node ({graph.n_sources}), got {kept.shape}")
    return kept[src] & np.where(fed >= 0, kept[np.maximum(fed, 0)], True)


def edge_scores_from_nodes(graph: Graph, node_scores) -> np.ndarray:
    """Each edge's score from node scores: the smaller of its source node's and its fed node's."""
    src, fed = _edge_endpoint_nodes(graph)
    scores = np.nan_to_num(np.asarray(node_scores, np.float64), nan=-np.inf)
    if scores.shape != (graph.n_sources,):
        raise ValueError(f"need one score per node ({graph.n_sources}), got {scores.shape}")
    out = np.minimum(scores[src], np.where(fed >= 0, scores[np.maximum(fed, 0)], np.inf))
    return np.where(np.isneginf(out), np.nan, out)


# --------------------------------------------------------------------------------------------
# ROC of circuits against a canonical circuit


@dataclasses.dataclass(frozen=True)
class RocCurve:
    """ROC points (the completed, Pareto-optimal ones the area is taken over) and their AUC."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    level: str
    n_positive: int
    n_negative: int
    label: str = ""
    kind: str = "pessimistic"


def reference_labels(
    graph: Graph, reference: CanonicalCircuit | Task, level: RocLevel = "edge", nodes: NodeConvention = "acdc"
) -> np.ndarray:
    """Ground-truth flags: per edge of ``graph`` (edge level) or per ``node_names(graph, nodes)``."""
    canonical = _canonical(reference)
    if level == "edge":
        return canonical.labels(_edge_graph(graph))
    if level != "node":
        raise ValueError(f"level must be 'edge' or 'node', got {level!r}")
    if canonical.has_edges:
        return nodes_from_edges(graph, canonical.labels(_edge_graph(graph)), nodes)
    if nodes == "sources":
        return canonical.labels(dataclasses.replace(graph, level="node"))
    raise ValueError(f"the canonical circuit ({canonical.source}) lists no edges, so ACDC-style node counting is "
                     "impossible; use nodes='sources'")


def _canonical(reference: CanonicalCircuit | Task) -> CanonicalCircuit:
    if isinstance(reference, Task):
        if reference.canonical is None:
            raise ValueError(f"task {reference.name!r} has no canonical circuit to compare with")
        return reference.canonical
    return reference


def _unit_scores(circuit: Circuit, level: RocLevel, nodes: NodeConvention) -> np.ndarray:
    graph = circuit.graph
    scores = circuit.scores
    if graph.level == "node":
        if level == "node" and nodes == "sources":
            return scores
        scores = edge_scores_from_nodes(graph, scores)
    return scores if level == "edge" else node_scores_from_edges(graph, scores, nodes)


def _unit_mask(circuit: Circuit, level: RocLevel, nodes: NodeConvention) -> np.ndarray:
    graph = circuit.graph
    kept = circuit.kept_mask()
    if graph.level == "node":
        if level == "node" and nodes == "sources":
            return kept
        kept = edges_from_nodes(graph, kept)
    return kept if level == "edge" else nodes_from_edges(graph, kept, nodes)


def roc_curve(
    circuit: Circuit | Sequence[Circuit],
    reference: CanonicalCircuit | Task,
    *,
    level: RocLevel = "edge",
    nodes: NodeConvention = "acdc",
    kind: AucKind = "pessimistic",
    label: str | None = None,
) -> RocCurve:
    """ROC of one circuit's scores, or of a family of circuits' kept sets, against ``reference``.

    ``level="edge"`` counts the edges of the circuit's graph, ``level="node"`` the nodes of
    ``nodes`` (module docstring). A family must share one graph.
    """
    family = not isinstance(circuit, Circuit)
    circuits = list(circuit) if family else [circuit]
    if not circuits:
        raise ValueError("an empty family of circuits has no ROC curve")
    graph = circuits[0].graph
    if any(c.graph != graph for c in circuits):
        raise ValueError("the circuits of a family must share one graph")
    labels = reference_labels(graph, reference, level, nodes)
    if family:
        fpr, tpr = roc_from_masks([_unit_mask(c, level, nodes) for c in circuits], labels)
    else:
        fpr, tpr = pareto_frontier(*roc_from_scores(_unit_scores(circuits[0], level, nodes), labels))
    return RocCurve(
        fpr=fpr,
        tpr=tpr,
        auc=auc(fpr, tpr, kind),
        level=level,
        n_positive=int(labels.sum()),
        n_negative=int((~labels).sum()),
        label=label if label is not None else circuits[0].method,
        kind=kind,
    )


@dataclasses.dataclass
class ThresholdFamily:
    """Circuits of one method at several thresholds, and their ROC curves when a reference is known."""

    thresholds: tuple[float, ...]
    circuits: list[Circuit]
    roc: RocCurve | None = None
    node_roc: RocCurve | None = None


def acdc_family(
    problem: Problem,
    thresholds: Sequence[float],
    reference: CanonicalCircuit | Task | None = None,
    *,
    nodes: NodeConvention = "acdc",
    kind: AucKind = "pessimistic",
    **acdc_options,
) -> ThresholdFamily:
    """Run ACDC at each threshold and return the circuits with their edge- and node-level ROC.

    The paper's sweeps use thresholds spread on a log scale (and its plots drop runs below 1e-6);
    here every given threshold is one point. Node-level ROC for a node-level problem uses its nodes.
    """
    from .methods.acdc import acdc

    thresholds = tuple(float(t) for t in thresholds)
    circuits = [acdc(problem, threshold=t, **acdc_options) for t in thresholds]
    result = ThresholdFamily(thresholds, circuits)
    if reference is not None:
        canonical = _canonical(reference)
        if canonical.has_edges:
            result.roc = roc_curve(circuits, canonical, level="edge", kind=kind, label="ACDC")
        node_convention = "sources" if problem.graph.level == "node" and not canonical.has_edges else nodes
        result.node_roc = roc_curve(circuits, canonical, level="node", nodes=node_convention, kind=kind, label="ACDC")
    return result


# --------------------------------------------------------------------------------------------
# Faithfulness curves, CPR and CMD


@dataclasses.dataclass(frozen=True)
class FaithfulnessCurve:
    """The metric of top-n circuits, raw and normalised (0 = all ablated, 1 = full model)."""

    fractions: np.ndarray
    n_kept: np.ndarray
    values: np.ndarray
    faithfulness: np.ndarray
    full_value: float
    ablated_value: float
    n_units: int
    metric: str
    absolute: bool
    label: str = ""

    @property
    def cpr(self) -> float:
        return cpr(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        return cmd(self.fractions, self.faithfulness)


def cpr(fractions, faithfulness) -> float:
    """MIB's CPR: trapezoid area under the faithfulness curve over the fractions (higher is better)."""
    x, f = _curve_arrays(fractions, faithfulness)
    return float(np.sum(np.diff(x) * (f[1:] + f[:-1]) / 2))


def cmd(fractions, faithfulness) -> float:
    """MIB's CMD: trapezoid area between the faithfulness curve and 1, ``|1 - f|`` (lower is better)."""
    x, f = _curve_arrays(fractions, faithfulness)
    gap = np.abs(1.0 - f)
    return float(np.sum(np.diff(x) * (gap[1:] + gap[:-1]) / 2))


def _curve_arrays(fractions, faithfulness) -> tuple[np.ndarray, np.ndarray]:
    x, f = np.asarray(fractions, np.float64), np.asarray(faithfulness, np.float64)
    if x.shape != f.shape or x.ndim != 1:
        raise ValueError(f"fractions {x.shape} and faithfulness {f.shape} must be 1-d and of one length")
    if np.any(np.diff(x) < 0):
        raise ValueError("fractions must be sorted in increasing order")
    return x, f


def ranking(scores, absolute: bool = False) -> np.ndarray:
    """Rank of every unit (0 = first kept): by score, or ``|score|``, descending; NaN last; ties in
    graph order."""
    scores = np.asarray(scores, np.float64)
    key = np.abs(scores) if absolute else scores
    order = np.argsort(-np.nan_to_num(key, nan=-np.inf), kind="stable")
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank


@eqx.filter_jit
def _top_n_values(problem: Problem, rank: jax.Array, ns: jax.Array, chunk: int) -> jax.Array:
    dtype = problem.model.dtype

    def value(n):
        return problem.value((rank < n).astype(dtype))

    return chunked_vmap(value, ns, chunk)


def faithfulness_curve(
    problem: Problem,
    circuit: Circuit | np.ndarray,
    *,
    fractions: Sequence[float] | None = MIB_FRACTIONS,
    ns: Sequence[int] | None = None,
    absolute: bool = False,
    metric: str | Metric | None = None,
    chunk_size: int | None = None,
    label: str | None = None,
) -> FaithfulnessCurve:
    """The metric of the top-n circuits of ``circuit``'s scores (or a score array), n over a grid.

    The grid is ``n = int(k * n_units)`` for the fractions ``k`` (MIB's by default), or ``ns``
    directly. All circuits, plus the empty and full ones that normalise the curve, are evaluated
    in one vmapped, chunked batch. ``metric`` defaults to the problem's (MIB uses the task metric).
    """
    if isinstance(circuit, Circuit):
        scores, name = circuit.scores, circuit.method
        if circuit.graph != problem.graph:
            raise ValueError(f"the circuit's graph ({circuit.graph.describe()}) is not the problem's ({problem.graph.describe()})")
    else:
        scores, name = np.asarray(circuit, np.float64), ""
    n_units = problem.graph.n_gates
    if scores.shape != (n_units,):
        raise ValueError(f"need one score per gate unit ({n_units}), got {scores.shape}")
    if metric is not None:
        problem = problem.with_metric(metric if isinstance(metric, Metric) else _metric_for(problem, metric))
    if ns is None:
        if fractions is None:
            raise ValueError("give fractions or ns")
        fracs = np.asarray(fractions, np.float64)
        if np.any((fracs < 0) | (fracs > 1)):
            raise ValueError("fractions must lie in [0, 1]")
        n_kept = np.array([int(k * n_units) for k in fracs.tolist()], np.int64)
    else:
        n_kept = np.asarray(ns, np.int64)
        if np.any((n_kept < 0) | (n_kept > n_units)):
            raise ValueError(f"ns must lie in 0..{n_units}")
        fracs = n_kept / n_units
    if np.any(np.diff(fracs) < 0):
        raise ValueError("the grid must be increasing")
    grid = np.concatenate([[0, n_units], n_kept]).astype(np.int32)
    # pad to a power of two with copies of the full circuit, so grids of similar length share a compilation
    padded = 1 << (len(grid) - 1).bit_length()
    grid = np.concatenate([grid, np.full(padded - len(grid), n_units, np.int32)])
    if chunk_size is None:
        chunk_size = auto_chunk_size(problem.run, len(grid))
    values = np.asarray(_top_n_values(problem, jnp.asarray(ranking(scores, absolute)), jnp.asarray(grid), int(chunk_size)),
                        np.float64)
    ablated, full = float(values[0]), float(values[1])
    if full == ablated:
        raise ValueError(f"the metric is {full} for both the full and the fully ablated model; faithfulness is undefined")
    values = values[2 : 2 + len(n_kept)]
    # the endpoints reuse the normalising evaluations, so they are exactly 0 and 1
    values = np.where(n_kept == 0, ablated, np.where(n_kept == n_units, full, values))
    return FaithfulnessCurve(
        fractions=fracs,
        n_kept=n_kept,
        values=values,
        faithfulness=(values - ablated) / (full - ablated) + 0.0,  # + 0.0: no negative zeros
        full_value=full,
        ablated_value=ablated,
        n_units=n_units,
        metric=problem.metric.name,
        absolute=absolute,
        label=label if label is not None else name,
    )


def _metric_for(problem: Problem, name: str) -> Metric:
    return problem.metric if name == problem.metric.name else get_metric(name)


# --------------------------------------------------------------------------------------------
# MIB's evaluation: both curves, pruned edge counts


def _check_mib_graph(graph: Graph) -> None:
    if graph.kv_grouped:
        raise ValueError(f"MIB's edge graph has k/v inputs per query head; this is the {graph.describe()}: convert the "
                         "circuit with acdc_jax.export.ungroup_kv first")
    if graph.level != "edge" or not graph.qkv_split or graph.internal_edges or not graph.has_mlp:
        raise ValueError(
            f"MIB's edge graph has separate q/k/v inputs, an MLP per layer and no internal edges; this is the "
            f"{graph.describe()}"
        )


def mib_scores(scores, prompts_per_batch: int = 1) -> np.ndarray:
    """The scores as MIB reads them from an exported importances file (``export.to_mib``): NaN written as
    0, divided by ``prompts_per_batch``, rounded to float32 (EAP-IG's score tensor)."""
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0) / float(prompts_per_batch)
    return scores.astype(np.float32).astype(np.float64)


def prune_dangling(graph: Graph, kept, *, rounds: int | None = 1) -> np.ndarray:
    """MIB's ``Graph.prune`` on a kept edge set: a node (``embed``, a head, an MLP) stays only with a kept edge
    out and one into it (``embed`` always counts as fed), and an edge only when the nodes at both ends stay
    (``logits`` always does). Returns the pruned mask.

    ``rounds=1`` is what the EAP-IG commits MIB pins (7af394a in the track, 61367f1 in the leaderboard)
    count: after ``apply_topn`` has set the nodes, their ``prune`` loop stops after one pass of edge
    removal. ``rounds=None`` repeats until nothing changes, as EAP-IG does since 795f560 (PR #17).
    """
    _check_mib_graph(graph)
    src, fed = _edge_endpoint_nodes(graph)
    kept = np.asarray(kept, bool)
    if kept.shape != src.shape:
        raise ValueError(f"need one flag per edge ({src.shape[0]}), got {kept.shape}")
    if rounds is not None and rounds < 1:
        raise ValueError(f"rounds must be a positive int or None, got {rounds!r}")
    into_logits = fed < 0
    fed_index = np.maximum(fed, 0)
    done = 0
    while rounds is None or done < rounds:
        has_out = np.zeros(graph.n_sources, bool)
        has_out[src[kept]] = True
        has_in = np.zeros(graph.n_sources, bool)
        has_in[fed_index[kept & ~into_logits]] = True
        has_in[0] = True  # embed (MIB's input node)
        alive = has_out & has_in
        pruned = kept & alive[src] & (into_logits | alive[fed_index])
        done += 1
        if np.array_equal(pruned, kept):
            break
        kept = pruned
    return pruned


@dataclasses.dataclass(frozen=True)
class MIBEvaluation:
    """MIB's two curves of one set of scores: ``signed`` (ranked by score, its CPR) and ``absolute``
    (ranked by ``|score|``, its CMD), and the edges each top-n set keeps after ``prune_dangling`` (one
    round: the ``weighted_edge_counts`` MIB records for an importances file)."""

    signed: FaithfulnessCurve
    absolute: FaithfulnessCurve
    pruned_counts_signed: np.ndarray
    pruned_counts_absolute: np.ndarray

    @property
    def cpr(self) -> float:
        return self.signed.cpr

    @property
    def cmd(self) -> float:
        return self.absolute.cmd

    def curve(self, ranking: str) -> FaithfulnessCurve:
        if ranking not in ("signed", "absolute"):
            raise ValueError(f"ranking must be 'signed' or 'absolute', got {ranking!r}")
        return self.signed if ranking == "signed" else self.absolute


def mib_evaluation(problem: Problem, scores, *, chunk_size: int | None = None) -> MIBEvaluation:
    """MIB's faithfulness curves of ``scores`` (give them as MIB reads them: ``mib_scores``) on ``problem``
    (a q/k/v-split edge graph; MIB's metric is the task's logit difference, under patching)."""
    _check_mib_graph(problem.graph)
    scores = np.asarray(scores.scores if isinstance(scores, Circuit) else scores, np.float64)
    curves, counts = [], []
    for absolute in (False, True):
        curve = faithfulness_curve(problem, scores, absolute=absolute, chunk_size=chunk_size)
        rank = ranking(scores, absolute)
        counts.append(np.array([int(prune_dangling(problem.graph, rank < n).sum()) for n in curve.n_kept.tolist()]))
        curves.append(curve)
    return MIBEvaluation(curves[0], curves[1], counts[0], counts[1])


# --------------------------------------------------------------------------------------------
# KL to the clean model


@eqx.filter_jit
def _kl_values(problem: Problem, gates: jax.Array, chunk: int) -> jax.Array:
    return chunked_vmap(lambda g: kl_divergence(problem.run.logits(g), problem.inputs), gates, chunk)


def kl_to_clean(problem: Problem, circuit, *, chunk_size: int | None = None):
    """KL(clean model || circuit) at the read positions: a float for one circuit (a ``Circuit`` or a
    gate vector), an array for several (a list of circuits or a ``[k, n_gates]`` gate array),
    evaluated in one vmapped batch."""
    single = isinstance(circuit, Circuit) or (isinstance(circuit, (np.ndarray, jax.Array)) and circuit.ndim == 1)
    rows = []
    for item in [circuit] if single else list(circuit):
        if isinstance(item, Circuit):
            if item.graph != problem.graph:
                raise ValueError(f"the circuit's graph ({item.graph.describe()}) is not the problem's ({problem.graph.describe()})")
            item = item.kept_mask()
        rows.append(np.asarray(item, np.float64))
    gates = np.stack(rows)
    if gates.shape[1:] != (problem.graph.n_gates,):
        raise ValueError(f"gate vectors must have {problem.graph.n_gates} entries, got shape {gates.shape[1:]}")
    if chunk_size is None:
        chunk_size = auto_chunk_size(problem.run, len(gates))
    values = np.asarray(_kl_values(problem, jnp.asarray(gates, problem.model.dtype), int(chunk_size)), np.float64)
    return float(values[0]) if single else values


# --------------------------------------------------------------------------------------------
# Plots


def _figure(figsize=(5.0, 4.0)):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'acdc-jax[plot]'") from err
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # a non-interactive canvas; no pyplot state is touched
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"save plots as .png, .svg or .pdf, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, bbox_inches="tight", dpi=150)
    return path


def _named(curves, kind: type) -> list:
    if isinstance(curves, kind):
        return [curves]
    if isinstance(curves, Mapping):
        return [dataclasses.replace(c, label=str(name)) for name, c in curves.items()]
    return list(curves)


def plot_roc(curves, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """ROC curve(s) on one axes, as the staircases the AUC integrates, AUCs in the legend.

    ``curves``: a ``RocCurve``, a list of them, or a mapping name -> curve. The file format
    follows the extension (.png, .svg, .pdf).
    """
    curves = _named(curves, RocCurve)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, ls="--")
    for curve in curves:
        step = "steps-post" if curve.kind == "pessimistic" else "default"
        ax.plot(curve.fpr, curve.tpr, drawstyle=step, marker=".", ms=4,
                label=f"{curve.label or 'circuit'} (AUC {curve.auc:.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel(f"false positive rate ({curves[0].level}s)" if curves else "false positive rate")
    ax.set_ylabel(f"true positive rate ({curves[0].level}s)" if curves else "true positive rate")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_faithfulness(curves, path: str | os.PathLike, *, title: str | None = None, log_x: bool = True) -> Path:
    """Faithfulness curve(s) against the fraction of units kept, CPR and CMD in the legend.

    ``log_x`` puts the fraction on a log axis (points at 0 are then left out of the picture).
    """
    curves = _named(curves, FaithfulnessCurve)
    fig = _figure()
    ax = fig.add_subplot()
    ax.axhline(1.0, color="0.8", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.8", lw=0.8, ls="--")
    for curve in curves:
        show = curve.fractions > 0 if log_x else np.ones_like(curve.fractions, bool)
        ax.plot(curve.fractions[show], curve.faithfulness[show], marker="o", ms=3,
                label=f"{curve.label or 'circuit'} (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("fraction of units kept")
    ax.set_ylabel(f"faithfulness ({curves[0].metric})" if curves else "faithfulness")
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


# Imported last: ``methods`` imports this module, and these names are needed only at call time
# (and by the runtime type checks of the annotations above).
from .methods._circuit import Circuit  # noqa: E402
from .methods._problem import Problem  # noqa: E402

__all__ = [
    "MIB_FRACTIONS",
    "FaithfulnessCurve",
    "MIBEvaluation",
    "RocCurve",
    "ThresholdFamily",
    "acdc_family",
    "auc",
    "cmd",
    "cpr",
    "edge_scores_from_nodes",
    "edges_from_nodes",
    "faithfulness_curve",
    "kl_to_clean",
    "mib_evaluation",
    "mib_scores",
    "node_names",
    "node_scores_from_edges",
    "nodes_from_edges",
    "pareto_frontier",
    "plot_faithfulness",
    "plot_roc",
    "precision_recall",
    "prune_dangling",
    "ranking",
    "reference_labels",
    "roc_auc",
    "roc_curve",
    "roc_from_masks",
    "roc_from_scores",
]
