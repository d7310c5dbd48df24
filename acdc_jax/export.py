"""Circuits and scores in the formats other tools read (ACDC, auto-circuit, MIB), and back.

Three formats, each a JSON document (``write_circuit`` / ``read_circuit``; ``to_*`` / ``from_*``
work on the parsed objects). Each file also carries an ``"acdc_jax"`` block (the graph, method,
task, metric, ...): the other tools ignore it, and it makes our own round trip exact. A file
without it (written by the other tool) is read with the graph its names imply.

**acdc** (``to_acdc``): ACDC's own edge keys, as ``TLACDCCorrespondence.edges`` holds them and as
``models/tracr/*/ground_truth_edges.json`` writes ``acdc_edges``: receiver hook, receiver index,
sender hook, sender index; index ``[null]`` is the whole hook, ``[null, null, h]`` head h::

    {"format": "acdc edges", "model": {"n_layers", "n_heads", "attn_only"}, "embed": ...,
     "edges": [{"receiver", "receiver_index", "sender", "sender_index",
                "type": "addition" | "direct_computation" | "placeholder",
                "present": bool, "score": float | null}, ...]}

``edges`` lists every edge of ACDC's graph; ``present`` marks the circuit (ACDC's
``Edge.present``). Names: ``embed`` -> ``blocks.0.hook_resid_pre`` (ACDC with
``use_pos_embed=False``, its setting for GPT-2 tasks) or, with ``embed="split"`` (ACDC's setting for
tracr: ``use_pos_embed = TASK.startswith("tracr")``, which ``embed="auto"`` follows by task name),
two senders ``hook_embed`` and ``hook_pos_embed`` with the same score and flag (an over-statement:
our merged edge cannot say which half matters); ``a{l}.{h}`` -> ``blocks.{l}.attn.hook_result[h]``;
``mlp{l}`` -> ``blocks.{l}.hook_mlp_out`` (as sender) and ``blocks.{l}.hook_mlp_in`` (as receiver);
``a{l}.{h}.q`` -> ``blocks.{l}.hook_q_input[h]`` (k, v alike); ``logits`` ->
``blocks.{n_layers-1}.hook_resid_post``. Residual edges are ``addition`` edges. The internal edge
``a{l}.{h}.q->a{l}.{h}`` is ACDC's ``direct_computation`` edge ``hook_q <- hook_q_input`` (the one
ACDC gates and the paper counts; ``evaluate`` uses the same identity); in a graph without internal
edges it is present when the input has a kept incoming edge (score null). The ``placeholder`` edges
(``hook_result <- hook_q|k|v``, ``hook_mlp_out <- hook_mlp_in``) carry no gate in ACDC (it never
removes them) or here; they are present for every head and MLP that a kept edge touches, as in
ACDC's saved tracr circuits (``a0.0``'s ``hook_result <- hook_q`` is there without
``hook_q <- hook_q_input``).
Per-head graphs: an edge into ``a{l}.{h}`` becomes three edges (q, k and v inputs), ACDC's graph
having no per-head input. Reading: ``hook_embed``, ``hook_pos_embed`` and ``blocks.0.hook_resid_pre``
all become ``embed`` (present if any is, score the larger); placeholders are skipped;
``direct_computation`` edges are read only into graphs with internal edges. A bare list of edge
keys (``acdc_edges``) reads as a circuit without scores (pass ``graph=``).

**autocircuit** (``to_autocircuit``): auto-circuit's factorized graph (``factorized_src_nodes`` /
``factorized_dest_nodes`` of its TransformerLens utilities). Sources ``Resid Start``
(``blocks.0.hook_resid_pre``), ``A{l}.{h}`` (``blocks.{l}.attn.hook_result``, head h), ``MLP {l}``
(``blocks.{l}.hook_mlp_out``); their ``idx`` is our source order. Destinations ``A{l}.{h}.Q|K|V``
(``blocks.{l}.hook_q|k|v_input``, head h), per-head ``A{l}.{h}`` (``blocks.{l}.hook_attn_in``),
``MLP {l}`` (``blocks.{l}.hook_mlp_in``), ``Resid End`` (``blocks.{n_layers-1}.hook_resid_post``).
Edges are ``"A0.1->A2.3.Q"``. ``prune_scores`` is auto-circuit's ``PruneScores``: per destination
module an array ``[n_heads, n_earlier_sources]`` (the head axis only when the module holds more
than one destination, as auto-circuit shapes its patch masks: tracr's one-head models have none),
indexed by source ``idx``; null = never scored (NaN). ``edges`` holds the same scores by edge name,
``circuit`` the kept edges (auto-circuit itself keeps top-k sets, not a flag).
``{k: torch.tensor(np.array(v, float)) for k, v in d["prune_scores"].items()}`` loads it there.

**mib** (``to_mib``): the EAP-IG ``Graph.to_json`` layout that the MIB circuit-localization track
reads (``Graph.from_json``): ``cfg`` (``n_layers``, ``n_heads``, ``parallel_attn_mlp``,
``d_model``), ``nodes`` (``input``, ``a{l}.h{h}``, ``m{l}``, ``logits``: ``in_graph``, and
``score`` for node-level circuits) and ``edges`` (``"a0.h1->a3.h2<q>"``, ``"input->m0"``,
``"m11->logits"``: ``score`` and ``in_graph``). Untested edges (NaN) are written as score 0.0, as
MIB ranks scores and NaN would sort first; the ``acdc_jax`` block lists them so our reader restores
NaN. Node ``in_graph``: the node has a kept edge in or out (``logits`` always). Per-head edges are
written as their q, k and v edges. Node-level circuits write node scores and, on edges, the edge
set and scores ``evaluate.edges_from_nodes`` / ``edge_scores_from_nodes`` derive (an edge is in
when both its nodes are; its score is the smaller). EAP-IG's graph always has one MLP per layer
and sequential attention/MLP: attention-only models and ``parallel_attn_mlp`` files are refused.
Grouped-query models: MIB evaluates them ungrouped (TransformerLens's ``ungroup_grouped_query_attention``),
with ``<k>``/``<v>`` edges per query head, this project's default graph; a circuit on the grouped-k/v graph
(``Graph.kv_heads``) is written through ``ungroup_kv`` (each grouped edge's score split evenly over its
group's heads, its kept flag copied) and read back through ``regroup_kv`` when the file's block says so.

**MIB submissions** (``write_mib_submission``): one folder per task and model,
``{method}_patching_edge/{task}_{model}/``, as MIB's ``run_attribution.py`` writes and its leaderboard reads
them, holding either ``importances.json`` (``to_mib`` of the circuit) or nine ``circuit_{k}.json``, the top
``int(k * n_edges)`` edges at MIB's fractions up to 50% (MIB adds the full model). MIB's evaluator takes every
file in a task folder for a circuit, so nothing else may be there. Names must not contain ``_`` (MIB splits
folder and results names there).

**Positions** (position-aware circuits, ``circuit.positions``): only auto-circuit has a position
axis (its ``seq_len`` models give every patch mask a leading token axis). ``to_autocircuit``
writes a circuit whose position units are single token positions (``positions="each"``) with
``seq_len``, every ``prune_scores`` array ``[seq_len, ...]``, ``edges`` as ``name -> [score per
position]`` and ``circuit`` as ``{"edge", "seq_idx"}`` entries; ``from_autocircuit`` reads them
back (the position labels come from the ``acdc_jax`` block, else ``"0"``, ``"1"``, ...). Spans of
several tokens, and the acdc and mib formats (no position axis), are refused with an
``ExportError``; ``merge_positions`` (CLI: ``--merge-positions``) is the documented per-edge
aggregation for them: each edge's score summed over positions (for the gradient methods, the
position-free score), kept when it is kept at any position.

Lossy points: the ACDC split embedding (see above); per-head edges written as q/k/v triples (a
foreign reader sees three equal edges); internal edges and node-level circuits need converting
for auto-circuit (``fold_internal_edges``, ``edge_circuit_from_nodes``) and internal edges for MIB,
and nothing but the kept set survives those conversions; ``seconds``, ``settings`` and ``extra`` of
a circuit are not exported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from .evaluate import edge_scores_from_nodes, edges_from_nodes
from .graph import Graph, GraphError
from .methods._circuit import Circuit
from .models import GPT2_SHAPES

FORMATS = ("acdc", "autocircuit", "mib")
FORMAT_VERSION = 1
ACDC_FORMAT = "acdc edges"
AUTOCIRCUIT_FORMAT = "auto-circuit prune scores"
EMBED_MODES = ("auto", "resid_pre", "split")

_QKV = ("q", "k", "v")
_HEAD = re.compile(r"^a(\d+)\.(\d+)$")
_HEAD_INPUT = re.compile(r"^a(\d+)\.(\d+)\.([qkv])$")
_MLP = re.compile(r"^mlp(\d+)$")

# Graphs have tens of thousands of edges and every function in the package may run under a runtime
# type checker, so per-edge work goes through tables computed once per graph (or per name, cached)
# and plain loops, not through a function call per edge.


class ExportError(ValueError):
    """A circuit that a format cannot hold as it is, or a file that is not in the format named."""


# ---------------------------------------------------------------------------------------- names


def parse_node(name: str) -> tuple[str, int, int | None, str | None]:
    """``(kind, layer, head, letter)`` of one of our node or input names.

    kind: ``embed`` (layer -1), ``head`` (``a{l}.{h}``), ``head_input`` (``a{l}.{h}.q|k|v``),
    ``mlp`` or ``logits`` (layer -1 here; the caller knows ``n_layers``).
    """
    if name == "embed":
        return "embed", -1, None, None
    if name == "logits":
        return "logits", -1, None, None
    if m := _HEAD.match(name):
        return "head", int(m[1]), int(m[2]), None
    if m := _HEAD_INPUT.match(name):
        return "head_input", int(m[1]), int(m[2]), m[3]
    if m := _MLP.match(name):
        return "mlp", int(m[1]), None, None
    raise GraphError(f"{name!r} is not a node name (embed, a{{l}}.{{h}}, a{{l}}.{{h}}.q|k|v, mlp{{l}}, logits)")


def owner(node: str) -> str:
    """The node an input belongs to: ``a3.0.q`` -> ``a3.0``; other names are their own owner."""
    kind, layer, head, _ = parse_node(node)
    return f"a{layer}.{head}" if kind == "head_input" else node


_parse = functools.lru_cache(maxsize=None)(parse_node)
_owner = functools.lru_cache(maxsize=None)(owner)


@functools.lru_cache(maxsize=32)
def edge_endpoints(graph: Graph) -> tuple[tuple[str, str], ...]:
    """``(source, destination input)`` of every edge of ``graph``, in its order (computed once per graph)."""
    return tuple((src, dst) for src, _, dst in (e.partition("->") for e in graph.edges))


@functools.lru_cache(maxsize=32)
def _edge_position(graph: Graph) -> dict[str, int]:
    """Edge name -> index (shared: do not change it)."""
    return {name: i for i, name in enumerate(graph.edges)}


@functools.lru_cache(maxsize=32)
def _internal_flags(graph: Graph) -> tuple[bool, ...]:
    internal = set(graph.internal_edge_names)
    return tuple(name in internal for name in graph.edges)


def _json_scores(scores: np.ndarray) -> list:
    """Scores as JSON values: floats, NaN as None (null)."""
    return [None if math.isnan(x) else x for x in np.asarray(scores, np.float64).tolist()]


# ---------------------------------------------------------------------------------------- metadata


def _metadata(circuit: Circuit, **more) -> dict:
    return {
        "version": FORMAT_VERSION,
        "graph": dataclasses.asdict(circuit.graph),
        "method": circuit.method,
        "task": circuit.task,
        "metric": circuit.metric,
        "ablation": circuit.ablation,
        "threshold": circuit.threshold,
        "metric_value": circuit.metric_value,
        **more,
    }


def _graph_from_metadata(meta: dict | None) -> Graph | None:
    if not meta or "graph" not in meta:
        return None
    return Graph(**meta["graph"])


def _assemble(graph: Graph, scores: np.ndarray, kept: np.ndarray, meta: dict | None, source: str) -> Circuit:
    """A circuit from one score and one kept flag per gate unit of ``graph``."""
    meta = meta or {}
    return Circuit(
        method=meta.get("method", f"imported-{source}"),
        task=meta.get("task", "unknown"),
        graph=graph,
        scores=scores,
        kept=tuple(name for name, k in zip(graph.gate_names, kept.tolist()) if k),
        metric=meta.get("metric", "unknown"),
        ablation=meta.get("ablation", "unknown"),
        threshold=meta.get("threshold"),
        metric_value=meta.get("metric_value"),
        extra={"imported_from": source},
    )


def _scatter(graph: Graph, positions: list[int], values: list[float], flags: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Scores and kept flags per edge from (edge, score, flag) entries; several entries for one edge
    (a split embedding, per-head q/k/v triples) merge: the larger score (NaN = none), kept if any is."""
    scores = np.full(graph.n_gates, np.nan)
    kept = np.zeros(graph.n_gates, bool)
    if positions:
        np.fmax.at(scores, np.asarray(positions), np.asarray(values, np.float64))
        np.logical_or.at(kept, np.asarray(positions), np.asarray(flags, bool))
    return scores, kept


def _check_same_graph(declared: Graph, inferred: Graph, source: str) -> None:
    for field in ("n_layers", "n_heads", "has_mlp"):
        if getattr(declared, field) != getattr(inferred, field):
            raise ExportError(
                f"the {source} file's acdc_jax block says {field}={getattr(declared, field)} but its "
                f"contents say {getattr(inferred, field)}; the file was edited or mixed up"
            )


def _unknown_edge(graph: Graph, what: str, ours: str) -> GraphError:
    return GraphError(f"{what} ({ours}) is not in the {graph.describe()}")


# ---------------------------------------------------------------------------------------- conversions


def merge_positions(circuit: Circuit) -> Circuit:
    """The position-free circuit of a position-aware one (``Circuit.merge_positions``): each edge's
    score summed over its position units, kept when kept at any position."""
    return circuit.merge_positions()


def _require_no_positions(circuit: Circuit, what: str, alternative: str = "") -> None:
    if circuit.positions is not None:
        raise ExportError(
            f"{what} has no position axis, and this circuit has {circuit.positions.n_units} position units "
            f"({', '.join(circuit.positions.labels[:6])}{', ...' if circuit.positions.n_units > 6 else ''}); merge them "
            "with acdc_jax.export.merge_positions(circuit) (CLI: --merge-positions): each edge's score summed over "
            f"positions, kept when kept at any position{alternative}"
        )


def _require_edges(circuit: Circuit, fmt: str) -> None:
    if circuit.graph.level != "edge":
        raise ExportError(
            f"the {fmt} format holds edges, and this circuit is node-level ({circuit.graph.describe()}); "
            "convert it with acdc_jax.export.edge_circuit_from_nodes(circuit) (CLI: --nodes-to-edges): an edge "
            "is kept when both its nodes are, with the smaller node score"
        )


def _require_no_internal(circuit: Circuit, fmt: str) -> None:
    if circuit.graph.internal_edges:
        raise ExportError(
            f"the {fmt} graph has no a{{l}}.{{h}}.q|k|v->a{{l}}.{{h}} edges; fold them with "
            "acdc_jax.export.fold_internal_edges(circuit) (CLI: --fold-internal), which drops the residual edges "
            "into inputs whose internal edge is not kept, or export with format 'acdc', which has them"
        )


def _require_per_head_kv(circuit: Circuit, fmt: str) -> None:
    if circuit.graph.kv_grouped:
        raise ExportError(
            f"the {fmt} graph has k and v inputs per query head (TransformerLens ungroups grouped-query attention); "
            "this circuit gates them per key/value head: convert it with acdc_jax.export.ungroup_kv(circuit)")


@functools.lru_cache(maxsize=32)
def _kv_ungrouping(grouped: Graph) -> tuple[Graph, np.ndarray, np.ndarray]:
    """The per-query-head graph of a grouped-k/v graph, and for each of its edges the grouped edge it
    comes from and its share of that edge's score (``1 / heads per group`` for k/v edges, else 1)."""
    per_head = dataclasses.replace(grouped, kv_heads=None)
    position = _edge_position(grouped)
    group = grouped.n_heads // grouped.kv_heads
    index, share = [], []
    for name, (src, dst) in zip(per_head.edges, edge_endpoints(per_head)):
        kind, layer, head, letter = _parse(dst)
        if kind == "head_input" and letter != "q":
            index.append(position[f"{src}->{grouped.input_of(layer, head, letter)}"])
            share.append(1.0 / group)
        else:
            index.append(position[name])
            share.append(1.0)
    return per_head, np.array(index, np.int64), np.array(share)


def ungroup_kv(circuit: Circuit) -> Circuit:
    """A circuit on a grouped-k/v graph (``Graph.kv_heads``) as one on the per-query-head graph, the
    graph MIB (and TransformerLens with ``ungroup_grouped_query_attention``) evaluates: a kept
    ``src->a{l}.g{j}.k`` keeps ``src->a{l}.{h}.k`` for every head h of group j (the group's heads all
    read that key input), and its score is split evenly over them. Splitting, not copying: at all
    gates 1 a grouped edge's EAP score is exactly the sum of its heads' per-head scores (the gradient is
    linear in the gates), and MIB ranks edges and counts circuit sizes in its own per-head edges, so each
    of the group's copies carries its share; copied scores would rank every copy as if it alone did what
    the group does. Other edges are unchanged. ``regroup_kv`` is the inverse on split scores."""
    graph = circuit.graph
    if not graph.kv_grouped:
        return circuit
    per_head, index, share = _kv_ungrouping(graph)
    scores = np.asarray(circuit.scores, np.float64)[index] * share
    kept = circuit.kept_mask()[index]
    return dataclasses.replace(circuit, graph=per_head, scores=scores,
                               kept=tuple(n for n, k in zip(per_head.edges, kept.tolist()) if k),
                               extra={**circuit.extra, "converted": "k/v groups ungrouped (scores split)"})


def regroup_kv(circuit: Circuit, grouped: Graph) -> Circuit:
    """A per-query-head circuit on ``grouped``, the graph with k/v inputs per key/value head: a grouped
    edge's score is the sum of its heads' scores (NaN if any is NaN), and it is kept when any of them
    is (a partly kept group cannot be told apart: the grouped circuit holds all of it)."""
    per_head, index, _ = _kv_ungrouping(grouped)
    if circuit.graph != per_head:
        raise ExportError(f"regroup_kv needs a circuit on the {per_head.describe()}, got the {circuit.graph.describe()}")
    scores = np.zeros(grouped.n_gates)
    np.add.at(scores, index, np.asarray(circuit.scores, np.float64))
    kept = np.zeros(grouped.n_gates, bool)
    np.logical_or.at(kept, index, circuit.kept_mask())
    return dataclasses.replace(circuit, graph=grouped, scores=scores,
                               kept=tuple(n for n, k in zip(grouped.edges, kept.tolist()) if k))


def fold_internal_edges(circuit: Circuit) -> Circuit:
    """The same circuit on the graph without internal edges.

    An internal edge at 0 ablates every edge into that input, so a residual edge stays kept only
    when its input's internal edge is kept too. Residual scores are kept; internal scores are lost.
    """
    _require_no_positions(circuit, "folding internal edges")
    graph = circuit.graph
    if not graph.internal_edges:
        return circuit
    plain = dataclasses.replace(graph, internal_edges=False)
    kept = set(circuit.kept)
    live_inputs = {name.partition("->")[0] for name in graph.internal_edge_names if name in kept}
    folded = tuple(
        name for name, (_, dst) in zip(plain.edges, edge_endpoints(plain))
        if name in kept and (_parse(dst)[0] != "head_input" or dst in live_inputs)
    )
    position = _edge_position(graph)
    scores = circuit.scores[np.array([position[name] for name in plain.edges])]
    return dataclasses.replace(circuit, graph=plain, scores=scores, kept=folded,
                               extra={**circuit.extra, "converted": "internal edges folded"})


def edge_circuit_from_nodes(circuit: Circuit) -> Circuit:
    """A node-level circuit as an edge-level one: an edge is kept when its source node and the node
    it feeds are kept (``logits`` always is), scored by the smaller of the two node scores
    (``evaluate.edges_from_nodes`` / ``edge_scores_from_nodes``, as the ACDC paper converts SP masks)."""
    graph = circuit.graph
    if graph.level != "node":
        return circuit
    _require_no_positions(circuit, "converting nodes to edges")
    edge_graph = dataclasses.replace(graph, level="edge")
    mask = edges_from_nodes(edge_graph, circuit.kept_mask())
    scores = edge_scores_from_nodes(edge_graph, circuit.scores)
    kept = tuple(name for name, m in zip(edge_graph.edges, mask.tolist()) if m)
    return dataclasses.replace(circuit, graph=edge_graph, scores=scores, kept=kept,
                               extra={**circuit.extra, "converted": "node-level circuit as edges"})


# ---------------------------------------------------------------------------------------- ACDC


def _embed_mode(circuit: Circuit, embed: str) -> str:
    if embed not in EMBED_MODES:
        raise ExportError(f"embed must be one of {', '.join(EMBED_MODES)}, got {embed!r}")
    if embed == "auto":  # ACDC's own rule: use_pos_embed = TASK.startswith("tracr")
        return "split" if circuit.task.startswith("tracr") else "resid_pre"
    return embed


def _head_index(h: int) -> tuple:
    return (None, None, h)


@functools.lru_cache(maxsize=None)
def _acdc_senders(src: str, embed_mode: str) -> tuple[tuple[str, tuple], ...]:
    kind, layer, head, _ = parse_node(src)
    if kind == "embed":
        if embed_mode == "split":
            return (("hook_embed", (None,)), ("hook_pos_embed", (None,)))
        return (("blocks.0.hook_resid_pre", (None,)),)
    if kind == "head":
        return ((f"blocks.{layer}.attn.hook_result", _head_index(head)),)
    if kind == "mlp":
        return ((f"blocks.{layer}.hook_mlp_out", (None,)),)
    raise GraphError(f"{src!r} is not a source")


@functools.lru_cache(maxsize=None)
def _acdc_receivers(dst: str, n_layers: int) -> tuple[tuple[str, tuple], ...]:
    kind, layer, head, letter = parse_node(dst)
    if kind == "head_input":
        return ((f"blocks.{layer}.hook_{letter}_input", _head_index(head)),)
    if kind == "head":  # per-head graph: ACDC's graph has only the q, k and v inputs
        return tuple((f"blocks.{layer}.hook_{t}_input", _head_index(head)) for t in _QKV)
    if kind == "mlp":
        return ((f"blocks.{layer}.hook_mlp_in", (None,)),)
    if kind == "logits":
        return ((f"blocks.{n_layers - 1}.hook_resid_post", (None,)),)
    raise GraphError(f"{dst!r} is not a destination")


def _acdc_row(receiver: str, receiver_index: tuple, sender: str, sender_index: tuple, kind: str,
              present: bool, score: float | None) -> dict:
    return {"receiver": receiver, "receiver_index": list(receiver_index), "sender": sender,
            "sender_index": list(sender_index), "type": kind, "present": present, "score": score}


def to_acdc(circuit: Circuit, *, embed: str = "auto") -> dict:
    """The circuit as ACDC edge keys with scores and present flags (module docstring: layout, names)."""
    _require_no_positions(circuit, "ACDC's edge format", "; or export with format 'autocircuit', which has positions")
    _require_edges(circuit, "acdc")
    _require_per_head_kv(circuit, "acdc")
    graph = circuit.graph
    mode = _embed_mode(circuit, embed)
    kept = circuit.kept_mask().tolist()
    scores = _json_scores(circuit.scores)
    rows, live_inputs, touched = [], set(), set()
    for (src, dst), present, score, internal in zip(edge_endpoints(graph), kept, scores, _internal_flags(graph)):
        if present:
            touched.add(_owner(src))
            touched.add(_owner(dst))
        if internal:
            continue
        if present:
            live_inputs.add(dst)
        for r_hook, r_index in _acdc_receivers(dst, graph.n_layers):
            for s_hook, s_index in _acdc_senders(src, mode):
                rows.append({"receiver": r_hook, "receiver_index": list(r_index), "sender": s_hook,
                             "sender_index": list(s_index), "type": "addition", "present": present, "score": score})
    position = _edge_position(graph)
    for layer in range(graph.n_layers):
        for h in range(graph.n_heads):
            head = f"a{layer}.{h}"
            for t in _QKV:
                inp = f"{head}.{t}" if graph.qkv_split else head
                if graph.internal_edges:
                    i = position[f"{inp}->{head}"]
                    present, score = kept[i], scores[i]
                else:
                    present, score = inp in live_inputs, None
                rows.append(_acdc_row(f"blocks.{layer}.attn.hook_{t}", _head_index(h), f"blocks.{layer}.hook_{t}_input",
                                      _head_index(h), "direct_computation", present, score))
                rows.append(_acdc_row(f"blocks.{layer}.attn.hook_result", _head_index(h), f"blocks.{layer}.attn.hook_{t}",
                                      _head_index(h), "placeholder", head in touched, None))
        if graph.has_mlp:
            rows.append(_acdc_row(f"blocks.{layer}.hook_mlp_out", (None,), f"blocks.{layer}.hook_mlp_in", (None,),
                                  "placeholder", f"mlp{layer}" in touched, None))
    return {
        "format": ACDC_FORMAT,
        "edge_key": "receiver hook, receiver index, sender hook, sender index (ACDC's (child, child_index, parent, "
                    "parent_index)); index [null] = whole hook, [null, null, h] = head h",
        "model": {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "attn_only": not graph.has_mlp},
        "embed": "hook_embed + hook_pos_embed" if mode == "split" else "blocks.0.hook_resid_pre",
        "edges": rows,
        "acdc_jax": _metadata(circuit),
    }


def acdc_edge_keys(data: dict | list, *, present_only: bool = True) -> list[tuple]:
    """ACDC's edge keys ``(receiver, receiver_index, sender, sender_index)`` of an acdc-format document
    (or a bare list such as ``acdc_edges``), indices as tuples, as ACDC's ``TorchIndex.hashable_tuple``."""
    rows = data if isinstance(data, list) else data["edges"]
    return [(r["receiver"], tuple(r["receiver_index"]), r["sender"], tuple(r["sender_index"]))
            for r in rows if r.get("present", True) or not present_only]


_ACDC_HOOK = re.compile(
    r"^(?:blocks\.(?P<layer>\d+)\.)?(?P<attn>attn\.)?(?P<hook>hook_resid_pre|hook_embed|hook_pos_embed|hook_result|"
    r"hook_mlp_out|hook_mlp_in|hook_resid_post|hook_[qkv]_input|hook_[qkv])$"
)


@functools.lru_cache(maxsize=None)
def _from_acdc_node(hook: str, index: tuple, n_layers: int) -> tuple[str, str]:
    """(role, our name) of an ACDC hook and index; role: source, input or activation (hook_q|k|v),
    placeholder-only nodes never reaching here as both ends of a gated edge."""
    m = _ACDC_HOOK.match(hook)
    if not m:
        raise ExportError(f"unknown ACDC hook {hook!r}")
    name, layer, attn = m["hook"], m["layer"], bool(m["attn"])
    head = index[2] if len(index) == 3 else None
    if name in ("hook_embed", "hook_pos_embed") or (name == "hook_resid_pre" and layer == "0"):
        return "source", "embed"
    if layer is None:
        raise ExportError(f"ACDC hook {hook!r} needs a block number")
    if name == "hook_result" and attn and head is not None:
        return "source", f"a{layer}.{head}"
    if name == "hook_mlp_out":
        return "source", f"mlp{layer}"
    if name == "hook_mlp_in":
        return "input", f"mlp{layer}"
    if name == "hook_resid_post" and int(layer) == n_layers - 1:
        return "input", "logits"
    if name.endswith("_input") and head is not None and not attn:
        return "input", f"a{layer}.{head}.{name[5]}"
    if attn and len(name) == 6 and head is not None:  # hook_q, hook_k, hook_v
        return "activation", f"a{layer}.{head}.{name[5]}"
    raise ExportError(f"ACDC hook {hook!r} with index {list(index)} is not a node of a {n_layers}-layer model's ACDC graph")


def from_acdc(data: dict | list, *, graph: Graph | None = None) -> Circuit:
    """A circuit from an acdc-format document, or from a bare list of ACDC edge keys (``acdc_edges``;
    every listed edge present, no scores). The graph comes from ``graph``, else the file's
    ``acdc_jax`` block, else its ``model`` block (q/k/v-split edge graph, no internal edges)."""
    if isinstance(data, list):
        rows, meta = data, None
        if graph is None:
            raise ExportError("a bare list of ACDC edges does not say the model's shape: pass graph=Graph(n_layers, n_heads, has_mlp)")
    else:
        if data.get("format") != ACDC_FORMAT:
            raise ExportError(f"not an acdc-format document (missing 'format': {ACDC_FORMAT!r})")
        rows, meta = data["edges"], data.get("acdc_jax")
        declared = _graph_from_metadata(meta)
        model = data.get("model")
        inferred = None if model is None else Graph(model["n_layers"], model["n_heads"], not model["attn_only"])
        if declared is not None and inferred is not None:
            _check_same_graph(declared, inferred, "acdc")
        graph = graph or declared or inferred
        if graph is None:
            raise ExportError("the acdc document has neither an acdc_jax nor a model block: pass graph=Graph(...)")
    if graph.level != "edge":
        raise ExportError("ACDC edges read into an edge-level graph; convert afterwards if you need nodes")
    position = _edge_position(graph)
    positions, values, flags = [], [], []
    for row in rows:
        r_role, receiver = _from_acdc_node(row["receiver"], tuple(row["receiver_index"]), graph.n_layers)
        s_role, sender = _from_acdc_node(row["sender"], tuple(row["sender_index"]), graph.n_layers)
        if r_role == "input" and s_role == "source":
            name = f"{sender}->{receiver if graph.qkv_split else _owner(receiver)}"
        elif r_role == "activation" and s_role == "input":  # direct computation: our internal edge
            if not graph.internal_edges:
                continue
            name = f"{sender}->{_owner(sender)}"
        else:  # placeholders carry no gate
            continue
        if name not in position:
            raise _unknown_edge(graph, f"ACDC edge {row['sender']}{row['sender_index']} -> "
                                       f"{row['receiver']}{row['receiver_index']}", name)
        positions.append(position[name])
        values.append(math.nan if row.get("score") is None else float(row["score"]))
        flags.append(bool(row.get("present", True)))
    scores, kept = _scatter(graph, positions, values, flags)
    return _assemble(graph, scores, kept, meta, "acdc")


# ---------------------------------------------------------------------------------------- auto-circuit


@functools.lru_cache(maxsize=None)
def _ac_source(src: str) -> tuple[str, str, int | None]:
    kind, layer, head, _ = parse_node(src)
    if kind == "embed":
        return "Resid Start", "blocks.0.hook_resid_pre", None
    if kind == "head":
        return f"A{layer}.{head}", f"blocks.{layer}.attn.hook_result", head
    return f"MLP {layer}", f"blocks.{layer}.hook_mlp_out", None


@functools.lru_cache(maxsize=None)
def _ac_dest(dst: str, n_layers: int) -> tuple[str, str, int | None]:
    kind, layer, head, letter = parse_node(dst)
    if kind == "head_input":
        return f"A{layer}.{head}.{letter.upper()}", f"blocks.{layer}.hook_{letter}_input", head
    if kind == "head":
        return f"A{layer}.{head}", f"blocks.{layer}.hook_attn_in", head
    if kind == "mlp":
        return f"MLP {layer}", f"blocks.{layer}.hook_mlp_in", None
    return "Resid End", f"blocks.{n_layers - 1}.hook_resid_post", None


@dataclasses.dataclass(frozen=True)
class _AutoCircuitTables:
    srcs: tuple[dict, ...]
    dests: tuple[dict, ...]
    shapes: dict[str, tuple[int, ...]]  # destination module -> PruneScores shape
    edges: tuple[tuple[str, tuple[int, ...], str], ...]  # per edge: module, index into its array, name


@functools.lru_cache(maxsize=32)
def _ac_tables(graph: Graph) -> _AutoCircuitTables:
    srcs = tuple({"name": n, "module": m, "head": h, "idx": i}
                 for i, (n, m, h) in enumerate(_ac_source(s) for s in graph.sources))
    dests, count, width = [], {}, {}
    for i, dst in enumerate(graph.destinations):
        name, module, head = _ac_dest(dst, graph.n_layers)
        dests.append({"name": name, "module": module, "head": head, "idx": i})
        count[module] = count.get(module, 0) + 1
        width[module] = len(graph.sources_of(dst))  # the same for every destination of a module
    # auto-circuit gives a module's mask a head axis only when it holds more than one destination
    shapes = {m: ((count[m],) if count[m] > 1 else ()) + (width[m],) for m in count}
    src_index = {s: i for i, s in enumerate(graph.sources)}
    src_names = {s: _ac_source(s)[0] for s in graph.sources}
    edges = []
    for src, dst in edge_endpoints(graph):
        name, module, head = _ac_dest(dst, graph.n_layers)
        index = (head, src_index[src]) if len(shapes[module]) == 2 else (src_index[src],)
        edges.append((module, index, f"{src_names[src]}->{name}"))
    return _AutoCircuitTables(srcs, tuple(dests), shapes, tuple(edges))


def to_autocircuit(circuit: Circuit) -> dict:
    """The circuit in auto-circuit's naming and ``PruneScores`` layout (module docstring)."""
    _require_edges(circuit, "autocircuit")
    _require_no_internal(circuit, "autocircuit")
    _require_per_head_kv(circuit, "autocircuit")
    graph = circuit.graph
    tables = _ac_tables(graph)
    if circuit.positions is not None:
        return _to_autocircuit_per_token(circuit, tables)
    arrays = {m: np.full(shape, np.nan) for m, shape in tables.shapes.items()}
    for (module, index, _), score in zip(tables.edges, circuit.scores.tolist()):
        arrays[module][index] = score
    scores = _json_scores(circuit.scores)
    kept = circuit.kept_mask().tolist()
    return {
        **_ac_header(graph, tables),
        "prune_scores": {m: _nested_none(a) for m, a in arrays.items()},
        "edges": {name: score for (_, _, name), score in zip(tables.edges, scores)},
        "circuit": [name for (_, _, name), k in zip(tables.edges, kept) if k],
        "acdc_jax": _metadata(circuit),
    }


def _ac_header(graph: Graph, tables: _AutoCircuitTables) -> dict:
    return {
        "format": AUTOCIRCUIT_FORMAT,
        "model": {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "attn_only": not graph.has_mlp,
                  "separate_qkv": graph.qkv_split, "factorized": True},
        "srcs": [dict(s) for s in tables.srcs],
        "dests": [dict(d) for d in tables.dests],
    }


def _to_autocircuit_per_token(circuit: Circuit, tables: _AutoCircuitTables) -> dict:
    """A position-aware circuit with one token per position unit, on auto-circuit's ``seq_len`` axis."""
    units = circuit.positions
    wide = [label for label, span in zip(units.labels, units.spans) if len(span) > 1]
    if wide:
        raise ExportError(
            f"auto-circuit's position axis is per token, and the position units {wide[:4]} span several tokens; "
            "run the method with positions='each', or merge the positions (acdc_jax.export.merge_positions, CLI: "
            "--merge-positions)"
        )
    per_token = circuit.scores[units.unit_of]  # [seq_len, n_gates]; unit_of is a permutation here
    kept = circuit.kept_mask()[units.unit_of]
    seq_len = units.n_pos
    arrays = {m: np.full((seq_len,) + shape, np.nan) for m, shape in tables.shapes.items()}
    for i, (module, index, _) in enumerate(tables.edges):
        arrays[module][(slice(None),) + index] = per_token[:, i]
    return {
        **_ac_header(circuit.graph, tables),
        "seq_len": seq_len,
        "prune_scores": {m: _nested_lists(a) for m, a in arrays.items()},
        "edges": {name: _json_scores(per_token[:, i]) for i, (_, _, name) in enumerate(tables.edges)},
        "circuit": [{"edge": tables.edges[i][2], "seq_idx": int(p)} for p, i in zip(*np.nonzero(kept))],
        "acdc_jax": _metadata(circuit, positions=units.to_dict()),
    }


def _nested_lists(array: np.ndarray):
    """Nested lists of any rank, NaN as None."""
    if array.ndim <= 2:
        return _nested_none(array)
    return [_nested_lists(a) for a in array]


def _nested_none(array: np.ndarray) -> list:
    """Nested lists of the array's values, NaN as None (JSON null)."""
    flat = _json_scores(array.reshape(-1))
    if array.ndim == 1:
        return flat
    n = array.shape[-1]
    return [flat[i : i + n] for i in range(0, len(flat), n)]


_AC_SRC = re.compile(r"^(?:Resid Start|A(?P<al>\d+)\.(?P<ah>\d+)|MLP (?P<ml>\d+))$")
_AC_DEST = re.compile(r"^(?:Resid End|A(?P<al>\d+)\.(?P<ah>\d+)(?:\.(?P<t>[QKV]))?|MLP (?P<ml>\d+))$")


@functools.lru_cache(maxsize=None)
def _from_ac_src(name: str) -> str:
    m = _AC_SRC.match(name)
    if not m:
        raise ExportError(f"unknown auto-circuit source {name!r} (Resid Start, A{{l}}.{{h}}, MLP {{l}})")
    return f"a{m['al']}.{m['ah']}" if m["al"] else (f"mlp{m['ml']}" if m["ml"] else "embed")


@functools.lru_cache(maxsize=None)
def _from_ac_dest(name: str) -> str:
    m = _AC_DEST.match(name)
    if not m:
        raise ExportError(f"unknown auto-circuit destination {name!r} (A{{l}}.{{h}}.Q|K|V, A{{l}}.{{h}}, MLP {{l}}, Resid End)")
    if m["al"]:
        return f"a{m['al']}.{m['ah']}" + (f".{m['t'].lower()}" if m["t"] else "")
    return f"mlp{m['ml']}" if m["ml"] else "logits"


def _ac_names_to_ours(names) -> list[str]:
    """Our edge names for auto-circuit edge names ('A0.1->A2.3.Q', 'Resid Start->MLP 0')."""
    out = []
    for name in names:
        src, sep, dst = name.partition("->")
        if not sep:
            raise ExportError(f"{name!r} is not an auto-circuit edge name ('SRC->DEST')")
        out.append(f"{_from_ac_src(src)}->{_from_ac_dest(dst)}")
    return out


_AC_MODULE = re.compile(r"^blocks\.(\d+)\.(hook_q_input|hook_k_input|hook_v_input|hook_attn_in|hook_mlp_in|hook_resid_post)$")


def _graph_from_prune_scores(arrays: dict[str, np.ndarray]) -> Graph:
    layers, has_mlp, qkv, n_heads = set(), False, None, None
    for module, array in arrays.items():
        m = _AC_MODULE.match(module)
        if not m:
            raise ExportError(f"unknown auto-circuit destination module {module!r}")
        layers.add(int(m[1]))
        has_mlp |= m[2] == "hook_mlp_in"
        if m[2] in ("hook_q_input", "hook_attn_in"):
            if array.ndim > 2:
                raise ExportError(f"prune scores for {module} have shape {array.shape}: a position axis? Sum "
                                  "per-position scores over positions first")
            qkv = m[2] == "hook_q_input"
            n_heads = array.shape[0] if array.ndim == 2 else 1
    if qkv is None:
        raise ExportError("the prune scores have no attention destinations (blocks.{l}.hook_q_input or hook_attn_in)")
    return Graph(max(layers) + 1, n_heads, has_mlp, qkv_split=qkv)


def from_autocircuit(data: dict) -> Circuit:
    """A circuit from an autocircuit-format document. Scores come from ``edges`` (by name) or, when a
    file has only ``prune_scores``, from those; the kept set from ``circuit`` (empty without it)."""
    if "prune_scores" not in data and "edges" not in data:
        raise ExportError("not an autocircuit document: it has neither 'prune_scores' nor 'edges'")
    meta = data.get("acdc_jax")
    graph = _graph_from_metadata(meta)
    seq_len = data.get("seq_len")
    if seq_len is not None:
        return _from_autocircuit_per_token(data, graph, meta, int(seq_len))
    arrays = None
    if "prune_scores" in data:
        arrays = {m: np.array(v, dtype=np.float64) for m, v in data["prune_scores"].items()}  # null -> NaN
    graph = _autocircuit_graph(graph, arrays)
    position = _edge_position(graph)
    scores = np.full(graph.n_gates, np.nan)
    if "edges" in data:
        for name, ours, value in zip(data["edges"], _ac_names_to_ours(data["edges"]), data["edges"].values()):
            if ours not in position:
                raise _unknown_edge(graph, f"auto-circuit edge {name!r}", ours)
            scores[position[ours]] = math.nan if value is None else value
    else:
        tables = _ac_tables(graph)
        for module, array in arrays.items():
            if module in tables.shapes and array.shape != tables.shapes[module]:
                raise ExportError(f"prune scores for {module} have shape {array.shape}; this graph needs "
                                  f"{tables.shapes[module]} (no position axis: sum per-position scores over positions first)")
        for i, (module, index, _) in enumerate(tables.edges):
            if module in arrays:
                scores[i] = arrays[module][index]
    kept = np.zeros(graph.n_gates, bool)
    for name, ours in zip(data.get("circuit", []), _ac_names_to_ours(data.get("circuit", []))):
        if ours not in position:
            raise _unknown_edge(graph, f"kept auto-circuit edge {name!r}", ours)
        kept[position[ours]] = True
    return _assemble(graph, scores, kept, meta, "autocircuit")


def _autocircuit_graph(graph: Graph | None, arrays: dict | None) -> Graph:
    """The graph of an autocircuit document: the one given (checked against the prune scores' shapes,
    ``arrays`` for one token), or the one those shapes imply."""
    if arrays is not None:
        inferred = _graph_from_prune_scores(arrays)
        if graph is not None:
            _check_same_graph(graph, inferred, "autocircuit")
        graph = graph or inferred
    if graph is None:
        raise ExportError("an autocircuit document with only 'edges' needs its acdc_jax block to know the graph")
    if graph.level != "edge" or graph.internal_edges:
        raise ExportError(f"auto-circuit files hold edges without internal edges, not a {graph.describe()}")
    return graph


def _from_autocircuit_per_token(data: dict, graph: Graph | None, meta: dict | None, seq_len: int) -> Circuit:
    """A position-aware circuit from an autocircuit document with ``seq_len`` (one unit per token)."""
    from .methods._positions import PositionUnits

    arrays = None
    if "prune_scores" in data:
        arrays = {m: np.array(v, dtype=np.float64) for m, v in data["prune_scores"].items()}
        bad = [m for m, a in arrays.items() if a.ndim < 2 or a.shape[0] != seq_len]
        if bad:
            raise ExportError(f"seq_len is {seq_len} but the prune scores of {bad[:3]} have no leading axis of that length")
    graph = _autocircuit_graph(graph, None if arrays is None else {m: a[0] for m, a in arrays.items()})
    units = PositionUnits.from_dict(meta["positions"]) if meta and meta.get("positions") else PositionUnits.each(seq_len)
    if units.n_pos != seq_len or any(len(span) != 1 for span in units.spans):
        raise ExportError(f"the acdc_jax block's position units do not match seq_len {seq_len} (one token each)")
    position = _edge_position(graph)
    per_token = np.full((seq_len, graph.n_gates), np.nan)
    if "edges" in data:
        for name, ours, values in zip(data["edges"], _ac_names_to_ours(data["edges"]), data["edges"].values()):
            if ours not in position:
                raise _unknown_edge(graph, f"auto-circuit edge {name!r}", ours)
            if not isinstance(values, list) or len(values) != seq_len:
                raise ExportError(f"auto-circuit edge {name!r} needs one score per position ({seq_len}), got {values!r}")
            per_token[:, position[ours]] = [math.nan if v is None else v for v in values]
    else:
        for i, (module, index, _) in enumerate(_ac_tables(graph).edges):
            if module in arrays:
                per_token[:, i] = arrays[module][(slice(None),) + index]
    kept = np.zeros((seq_len, graph.n_gates), bool)
    for entry in data.get("circuit", []):
        if not isinstance(entry, dict) or "edge" not in entry or "seq_idx" not in entry:
            raise ExportError(f"a per-position auto-circuit circuit lists {{'edge', 'seq_idx'}} entries, got {entry!r}")
        ours = _ac_names_to_ours([entry["edge"]])[0]
        if ours not in position:
            raise _unknown_edge(graph, f"kept auto-circuit edge {entry['edge']!r}", ours)
        kept[int(entry["seq_idx"]), position[ours]] = True
    token_of_unit = np.array([span[0] for span in units.spans])
    scores, kept = per_token[token_of_unit], kept[token_of_unit]
    names = units.unit_names(graph.gate_names)
    meta = meta or {}
    return Circuit(
        method=meta.get("method", "imported-autocircuit"), task=meta.get("task", "unknown"), graph=graph, scores=scores,
        kept=tuple(n for n, k in zip(names, kept.reshape(-1)) if k), metric=meta.get("metric", "unknown"),
        ablation=meta.get("ablation", "unknown"), threshold=meta.get("threshold"), metric_value=meta.get("metric_value"),
        extra={"imported_from": "autocircuit"}, positions=units,
    )


# ---------------------------------------------------------------------------------------- MIB / EAP-IG


@functools.lru_cache(maxsize=None)
def _mib_node(node: str) -> str:
    kind, layer, head, _ = parse_node(node)
    if kind == "embed":
        return "input"
    if kind == "head":
        return f"a{layer}.h{head}"
    if kind == "mlp":
        return f"m{layer}"
    if kind == "logits":
        return "logits"
    raise GraphError(f"{node!r} is not a node")


@functools.lru_cache(maxsize=None)
def _mib_children(dst: str) -> tuple[str, ...]:
    """The MIB child names an edge into ``dst`` is written with (a per-head input: three)."""
    kind, layer, head, letter = parse_node(dst)
    if kind == "head_input":
        return (f"a{layer}.h{head}<{letter}>",)
    if kind == "head":
        return tuple(f"a{layer}.h{head}<{t}>" for t in _QKV)
    return (_mib_node(dst),)


def infer_d_model(circuit: Circuit) -> int | None:
    """``d_model`` of the circuit's model when its shape or task names a known one: a GPT-2 size with
    this many layers and heads, or a shipped model (tracr, induction) named like the task."""
    graph = circuit.graph
    if graph.has_mlp:
        for n_layers, n_heads, d_model in GPT2_SHAPES.values():
            if (n_layers, n_heads) == (graph.n_layers, graph.n_heads):
                return d_model
    from .models import load_model, shipped_model_names

    if circuit.task in shipped_model_names():
        config = load_model(circuit.task).config
        if (config.n_layers, config.n_heads, config.has_mlp) == (graph.n_layers, graph.n_heads, graph.has_mlp):
            return config.d_model
    return None


MIB_SCORE_CONVENTION = (
    "EAP-IG library / MIB: score = (corrupted - clean activation) . d(-metric)/d(input), the metric being MIB's "
    "loss (minus the logit or probability difference) averaged over each batch, summed over batches and divided by "
    "the number of prompts: this project's score (~ metric(full) - metric(edge ablated), same sign) divided by the "
    "prompts per batch"
)


def to_mib(circuit: Circuit, *, d_model: int | None = None, prompts_per_batch: int = 1) -> dict:
    """The circuit as an EAP-IG graph JSON for MIB's circuit-localization track (module docstring).

    **Scores are written in MIB's sign and scale.** The EAP-IG library that MIB runs gives its
    attribution a loss (``loss=True``: minus the logit difference, the metric negated) averaged
    over each batch, accumulates ``(x~ - x) . grad`` over batches and divides by the number of
    prompts. Its sign is therefore this project's (positive = the edge supports the clean
    behaviour, ~ ``metric(full) - metric(without edge)``) and its scale is ours divided by the
    prompts per batch (MIB's ``run_attribution`` uses batches of 20; one batch of all prompts:
    their number). ``mib_score = score / prompts_per_batch``; the factor is recorded in the
    ``acdc_jax`` block (``score_convention``), and ``from_mib`` multiplies it back.
    """
    _require_no_positions(circuit, "MIB's graph format", "; or export with format 'autocircuit', which has positions")
    if int(prompts_per_batch) < 1:
        raise ExportError(f"prompts_per_batch must be a positive int, got {prompts_per_batch!r}")
    divisor = float(int(prompts_per_batch))
    graph = circuit.graph
    if not graph.has_mlp:
        raise ExportError("MIB's graph (EAP-IG) has an MLP in every layer; an attention-only model cannot be written in it")
    _require_no_internal(circuit, "mib")
    if d_model is None:
        d_model = infer_d_model(circuit)
        if d_model is None:
            raise ExportError(
                f"MIB's graph JSON records d_model, and this circuit's model ({graph.n_layers} layers, {graph.n_heads} heads, "
                f"task {circuit.task!r}) is not one whose d_model is known here: pass d_model= (CLI: --d-model)"
            )
    node_level = graph.level == "node"
    edge_circuit = edge_circuit_from_nodes(circuit) if node_level else ungroup_kv(circuit)  # MIB's k/v: per query head
    edge_graph = edge_circuit.graph
    endpoints = edge_endpoints(edge_graph)
    kept = edge_circuit.kept_mask().tolist()
    touched = {"logits"}
    for (src, dst), k in zip(endpoints, kept):
        if k:
            touched.add(src)
            touched.add(_owner(dst))
    unscored: list[str] = []
    nodes = {}
    node_kept = circuit.kept_mask().tolist()
    for node, score, k in zip(graph.sources, circuit.scores.tolist(), node_kept):
        entry = {"in_graph": k if node_level else node in touched}
        if node_level:
            entry["score"] = 0.0 if math.isnan(score) else score / divisor
            if math.isnan(score):
                unscored.append(node)
        nodes[_mib_node(node)] = entry
    nodes["logits"] = {"in_graph": True}
    edges = {}
    for name, (src, dst), score, k in zip(edge_graph.edges, endpoints, edge_circuit.scores.tolist(), kept):
        if math.isnan(score):
            if not node_level:
                unscored.append(name)
            score = 0.0  # MIB ranks scores, and NaN would rank first
        score = score / divisor
        parent = _mib_node(src)
        for child in _mib_children(dst):
            edges[f"{parent}->{child}"] = {"score": score, "in_graph": k}
    return {
        "cfg": {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": False, "d_model": int(d_model)},
        "nodes": nodes,
        "edges": edges,
        "acdc_jax": _metadata(circuit, unscored=unscored, score_convention={
            "scores": "MIB", "prompts_per_batch": int(prompts_per_batch), "mib_score": "score / prompts_per_batch",
            "description": MIB_SCORE_CONVENTION}),
    }


_MIB_NODE = re.compile(r"^(?:input|logits|a(?P<al>\d+)\.h(?P<ah>\d+)|m(?P<ml>\d+))$")
_MIB_EDGE = re.compile(r"^(?P<parent>[^<>]+?)->(?P<child>[^<>]+?)(?:<(?P<t>[qkv])>)?$")


@functools.lru_cache(maxsize=None)
def _from_mib_node(name: str) -> str:
    m = _MIB_NODE.match(name)
    if not m:
        raise ExportError(f"unknown MIB node {name!r}")
    if m["al"] is not None:
        return f"a{m['al']}.{m['ah']}"
    if m["ml"] is not None:
        return f"mlp{m['ml']}"
    return "embed" if name == "input" else "logits"


def from_mib(data: dict, *, level: str | None = None, prompts_per_batch: int | None = None) -> Circuit:
    """A circuit from an EAP-IG / MIB graph JSON. ``level`` (``"edge"`` or ``"node"``; default: the
    file's acdc_jax block, else ``"edge"``) says whether edge or node scores make the circuit.

    Scores come back in this project's convention: the file's MIB scores times ``prompts_per_batch``
    (default: the factor our block records, else 1; see ``to_mib``; the sign is the same)."""
    missing = [k for k in ("cfg", "nodes", "edges") if k not in data]
    if missing:
        raise ExportError(f"not a MIB / EAP-IG graph JSON: missing {', '.join(missing)}")
    cfg = data["cfg"]
    if cfg.get("parallel_attn_mlp"):
        raise ExportError("this MIB graph has parallel attention and MLP; acdc-jax graphs run the MLP after attention")
    if level not in (None, "edge", "node"):
        raise ExportError(f"level must be 'edge' or 'node', got {level!r}")
    meta = data.get("acdc_jax")
    inferred = Graph(int(cfg["n_layers"]), int(cfg["n_heads"]), True)
    declared = _graph_from_metadata(meta)
    if declared is not None:
        _check_same_graph(declared, inferred, "mib")
    graph = declared or inferred
    grouped = graph if graph.kv_grouped and level in (None, "edge") else None  # written ungrouped: read so, regroup
    if graph.kv_grouped:
        graph = dataclasses.replace(graph, kv_heads=None)
    if level is not None and level != graph.level:
        graph = dataclasses.replace(graph, level=level)
    if graph.internal_edges:
        raise ExportError("MIB graphs have no internal edges")
    unscored = set((meta or {}).get("unscored", []))
    if prompts_per_batch is None:
        prompts_per_batch = int(((meta or {}).get("score_convention") or {}).get("prompts_per_batch", 1))
    factor = float(prompts_per_batch)
    if graph.level == "node":
        scores, kept = [], []
        for node in graph.sources:
            entry = data["nodes"].get(_mib_node(node), {})
            score = entry.get("score")
            scores.append(math.nan if node in unscored or score is None else float(score) * factor)
            kept.append(bool(entry.get("in_graph", False)))
        return _assemble(graph, np.array(scores), np.array(kept), meta, "mib")
    position = _edge_position(graph)
    positions, values, flags = [], [], []
    for name, entry in data["edges"].items():
        m = _MIB_EDGE.match(name)
        if not m:
            raise ExportError(f"{name!r} is not a MIB edge name ('parent->child' or 'parent->a{{l}}.h{{h}}<q|k|v>')")
        parent, child = _from_mib_node(m["parent"]), _from_mib_node(m["child"])
        if m["t"] and graph.qkv_split:
            child = f"{child}.{m['t']}"
        ours = f"{parent}->{child}"
        if ours not in position:
            raise _unknown_edge(graph, f"MIB edge {name!r}", ours)
        positions.append(position[ours])
        values.append(math.nan if entry.get("score") is None else float(entry["score"]) * factor)
        flags.append(bool(entry.get("in_graph", False)))
    scores, kept = _scatter(graph, positions, values, flags)
    for name in unscored:
        scores[position[name]] = np.nan
    circuit = _assemble(graph, scores, kept, meta, "mib")
    return circuit if grouped is None else regroup_kv(circuit, grouped)


# ---------------------------------------------------------------------------------------- MIB submissions

MIB_SUBMISSION_FORMATS = ("scores", "circuits")
MIB_RANKINGS = ("signed", "absolute")
MIB_IMPORTANCES = "importances.json"
# MIB's task and model names of a submission folder (MIB_circuit_track/utils.py: TASKS_TO_HF_NAMES with "_"
# written "-", MODEL_NAME_TO_FULLNAME) and the task/model pairs its leaderboard scores (COL_MAPPING)
MIB_MODELS = ("gpt2", "qwen2.5", "gemma2", "llama3")
MIB_LEADERBOARD = (
    "ioi_gpt2", "ioi_qwen2.5", "ioi_gemma2", "ioi_llama3", "mcqa_qwen2.5", "mcqa_gemma2", "mcqa_llama3",
    "arithmetic-addition_llama3", "arithmetic-subtraction_llama3", "arc-easy_gemma2", "arc-easy_llama3",
    "arc-challenge_llama3",
)  # fmt: skip


# (n_layers, n_heads, d_model, vocabulary) of the models MIB evaluates, by MIB's name; gemma2 does not load here yet
MIB_MODEL_SHAPES = {
    "gpt2": (12, 12, 768, 50257),
    "qwen2.5": (24, 14, 896, 151936),
    "gemma2": (26, 8, 2304, 256000),
    "llama3": (32, 32, 4096, 128256),
}


def mib_model_name(config) -> str | None:
    """MIB's name for a model of this shape (``gpt2``, ``qwen2.5``, ``gemma2``, ``llama3``), else None."""
    shape = (config.n_layers, config.n_heads, config.d_model, config.d_vocab)
    return next((name for name, known in MIB_MODEL_SHAPES.items() if known == shape), None)


def mib_method_folder(method: str, ablation: str = "patching", level: str = "edge") -> str:
    """MIB's name for a method's folder: ``{method}_{ablation}_{level}`` (``run_attribution.py``)."""
    return f"{method}_{ablation}_{level}"


def mib_circuit_file(fraction: float) -> str:
    return f"circuit_{fraction:g}.json"


def check_mib_name(kind: str, name: str) -> str:
    """``name`` if it can name an MIB submission folder (MIB splits folder and results names at ``_``)."""
    if not name or "_" in name or "/" in name or name.strip() != name:
        raise ExportError(
            f"MIB's {kind} name {name!r} cannot name a submission folder: MIB splits folder and results names at '_', "
            "so a name must be non-empty, without '_', '/' or surrounding spaces (write '-' for '_')"
        )
    return name


def mib_task_folder(out: str | os.PathLike, method: str, task: str, model: str) -> Path:
    """``out/{method}_patching_edge/{task}_{model}``: one task/model folder of an MIB submission."""
    method_folder = mib_method_folder(check_mib_name("method", method))
    return Path(out) / method_folder / f"{check_mib_name('task', task)}_{check_mib_name('model', model)}"


def _mib_files() -> set[str]:
    from .evaluate import MIB_FRACTIONS

    return {MIB_IMPORTANCES} | {mib_circuit_file(k) for k in MIB_FRACTIONS[:-1]}


def mib_foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files in a task folder that ``write_mib_submission`` did not write (MIB would read them as circuits)."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.name not in _mib_files()) if folder.is_dir() else []


def write_mib_submission(
    circuit: Circuit,
    out: str | os.PathLike,
    *,
    task: str,
    model: str,
    fmt: str = "scores",
    ranking: str = "signed",
    d_model: int | None = None,
    prompts_per_batch: int = 1,
) -> list[Path]:
    """Write a circuit as one task/model folder of an MIB submission: ``out/{method}_patching_edge/{task}_{model}/``.

    ``fmt="scores"``: one ``importances.json``, every edge's score (``to_mib``: MIB's names, sign and
    scale); MIB ranks them itself. ``fmt="circuits"``: nine files ``circuit_{k}.json``, the top
    ``int(k * n_edges)`` edges by score (``ranking="signed"``) or ``|score|`` (``"absolute"``) for each
    fraction k of ``MIB_FRACTIONS`` up to 0.5, ranked as MIB would rank the importances file
    (``evaluate.mib_scores``); MIB adds the full model at 100%. MIB's evaluator takes every file in a
    task folder for a circuit, so nothing else may be there: files this function writes are replaced,
    any other file is an error. Returns the files written.
    """
    from .evaluate import MIB_FRACTIONS, mib_scores
    from .evaluate import ranking as rank_units

    if fmt not in MIB_SUBMISSION_FORMATS:
        raise ExportError(f"the MIB submission format must be one of {', '.join(MIB_SUBMISSION_FORMATS)}, got {fmt!r}")
    if ranking not in MIB_RANKINGS:
        raise ExportError(f"the ranking must be one of {', '.join(MIB_RANKINGS)}, got {ranking!r}")
    if circuit.graph.level != "edge" or not circuit.graph.qkv_split:
        raise ExportError(f"an MIB edge submission needs a q/k/v-split edge circuit; this one is on the {circuit.graph.describe()}")
    circuit = ungroup_kv(circuit)  # MIB ranks and counts per-query-head k/v edges
    folder = mib_task_folder(out, circuit.method, task, model)
    foreign = mib_foreign_files(folder)
    if foreign:
        raise ExportError(
            f"{folder} holds {', '.join(foreign)}; MIB's evaluator reads every file of a task folder as a circuit, "
            "so move them out or write to another --out"
        )
    for name in _mib_files():
        (folder / name).unlink(missing_ok=True)
    documents: dict[str, dict] = {}
    if fmt == "scores":
        documents[MIB_IMPORTANCES] = to_mib(circuit, d_model=d_model, prompts_per_batch=prompts_per_batch)
    else:
        order = rank_units(mib_scores(circuit.scores, prompts_per_batch), absolute=ranking == "absolute")
        names = np.array(circuit.graph.gate_names)
        for k in MIB_FRACTIONS[:-1]:
            top = dataclasses.replace(circuit, kept=tuple(names[order < int(k * circuit.graph.n_gates)].tolist()))
            documents[mib_circuit_file(k)] = to_mib(top, d_model=d_model, prompts_per_batch=prompts_per_batch)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in documents.items():
        (folder / name).write_text(json.dumps(document, allow_nan=False))
        written.append(folder / name)
    return written


# ---------------------------------------------------------------------------------------- files


def export_circuit(circuit: Circuit, fmt: str, **options) -> dict:
    """The document of ``circuit`` in format ``fmt`` (``acdc``, ``autocircuit`` or ``mib``)."""
    writers = {"acdc": to_acdc, "autocircuit": to_autocircuit, "mib": to_mib}
    if fmt not in writers:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return writers[fmt](circuit, **options)


def write_circuit(circuit: Circuit, path: str | os.PathLike, fmt: str, **options) -> Path:
    """Write ``circuit`` as a JSON document in format ``fmt`` (strict JSON: no NaN literals)."""
    document = export_circuit(circuit, fmt, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, allow_nan=False))
    return path


def detect_format(data: dict | list) -> str:
    """``acdc``, ``autocircuit`` or ``mib``, from a parsed document's keys."""
    if isinstance(data, list) or data.get("format") == ACDC_FORMAT:
        return "acdc"
    if data.get("format") == AUTOCIRCUIT_FORMAT or "prune_scores" in data:
        return "autocircuit"
    if {"cfg", "nodes", "edges"} <= set(data):
        return "mib"
    raise ExportError("cannot tell the format: expected an acdc edge list, auto-circuit prune scores or a MIB graph JSON")


def import_circuit(data: dict | list, fmt: str | None = None, **options) -> Circuit:
    """A circuit from a parsed document in format ``fmt`` (detected when None)."""
    fmt = fmt or detect_format(data)
    readers = {"acdc": from_acdc, "autocircuit": from_autocircuit, "mib": from_mib}
    if fmt not in readers:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return readers[fmt](data, **options)


def read_circuit(path: str | os.PathLike, fmt: str | None = None, **options) -> Circuit:
    """Read a file written by ``write_circuit`` or by the other tool (format detected when None)."""
    return import_circuit(json.loads(Path(path).read_text()), fmt, **options)


__all__ = [
    "EMBED_MODES",
    "FORMATS",
    "MIB_LEADERBOARD",
    "MIB_MODELS",
    "MIB_RANKINGS",
    "MIB_SUBMISSION_FORMATS",
    "ExportError",
    "acdc_edge_keys",
    "detect_format",
    "edge_circuit_from_nodes",
    "edge_endpoints",
    "regroup_kv",
    "ungroup_kv",
    "export_circuit",
    "fold_internal_edges",
    "from_acdc",
    "from_autocircuit",
    "from_mib",
    "import_circuit",
    "infer_d_model",
    "check_mib_name",
    "merge_positions",
    "mib_circuit_file",
    "mib_foreign_files",
    "mib_method_folder",
    "mib_model_name",
    "mib_task_folder",
    "owner",
    "parse_node",
    "read_circuit",
    "to_acdc",
    "to_autocircuit",
    "to_mib",
    "write_circuit",
    "write_mib_submission",
]
