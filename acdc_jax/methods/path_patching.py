"""Top-down automatic path patching: from the logits at the read positions back through the heads
and MLPs whose direct connections matter, position by position.

Nodes of the search are (component, position) pairs, starting at ``logits`` at each read position.
For a node, every direct connection into one of its inputs is patched in turn: the edge
``src->input`` at one destination position takes the ablated (corrupted) value of ``src``. The
inputs of a head found at position p are its query at p and its keys and values at every
labelled position up to p (all positions up to p when the task has no labels; every position for
non-causal models); an MLP's input is at its own position. The effect of a patch is measured on
the task metric *through the paths found so far only* (the path-patching semantics of the IOI
paper): the receiver is recomputed with the patched input (pass 1), and its new output reaches the
logits only along already-found edges, every other edge frozen at its clean value (pass 2, a gated
run whose "ablation" is the clean run, except the receiver, which carries its pass-1 output).
A connection is kept when ``|effect| >= threshold`` (absolute, or relative to the metric gap
between the clean and the fully ablated model), and the search recurses from each kept sender.

Effects are ``loss(patched) - loss(clean)`` on the metric turned lower-is-better, so a positive
effect means the connection supports the clean behaviour (for a logit difference, patching it
lowers the logit difference). Q, K and V composition are kept apart: they are edges into the
``.q``, ``.k`` and ``.v`` inputs.

Two additions address the limitations of plain top-down path patching:
- ``grouped=True``: effects spread thinly over many components can each stay below the threshold.
  Senders are first patched jointly by group (``embed``, each layer's heads, each MLP); in a group
  that matters, members that pass on their own are kept individually and the other members,
  patched jointly, are kept as one distributed unit if they still pass.
- Heads that do the same job are grouped afterwards: heads whose effect signatures (effect on each
  receiver input at each position) point the same way (cosine >= ``similarity``) form one unit,
  and ``circuit.extra["summary"]`` says in a few lines which units feed which, at which positions.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..models import Ablation, gated_forward
from ..patching import auto_chunk_size, chunked_vmap, source_values
from ._circuit import Circuit
from ._problem import Problem


@dataclasses.dataclass(frozen=True)
class Path:
    """A kept direct connection: ``senders`` into ``receiver`` at ``position``."""

    senders: tuple[str, ...]
    receiver: str  # a destination input: "logits", "mlp3", "a9.9.q", ...
    position: int
    label: str
    effect: float

    @property
    def composition(self) -> str:
        if self.receiver == "logits":
            return "direct"
        if self.receiver.startswith("mlp"):
            return "mlp"
        return self.receiver.rsplit(".", 1)[1]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "composition": self.composition}


# ------------------------------------------------------------------------------------- compiled passes


@eqx.filter_jit
def _pass_one(problem: Problem, gates, receiver, chunk: int):
    """Loss, and the receiver's output, for each per-position gating in ``gates`` [K, P, n]."""
    run = problem.run

    def one(g):
        logits, deltas = gated_forward(run.model, run.graph.dense(g), run.ablation, run.tokens, positions=run.positions, return_deltas=True)
        out = deltas[receiver] + run.ablation.values[receiver]
        return problem.metric.loss(logits, problem.inputs), out

    return chunked_vmap(one, gates, chunk)


@eqx.filter_jit
def _pass_two(problem: Problem, clean_values, receiver, outputs, gates, chunk: int):
    """Loss when the receiver's output is replaced by each of ``outputs`` along the found edges only."""
    run = problem.run
    dense = run.graph.dense(gates)

    def one(out):
        ablation = Ablation.from_values(run.model, clean_values.at[receiver].set(out))
        logits = gated_forward(run.model, dense, ablation, run.tokens, positions=run.positions)
        return problem.metric.loss(logits, problem.inputs)

    return chunked_vmap(one, outputs, chunk)


# ------------------------------------------------------------------------------------- the search


def path_patching(
    problem: Problem,
    *,
    threshold: float = 0.05,
    relative: bool = False,
    grouped: bool = False,
    positions: list[str] | None = None,
    max_nodes: int = 10_000,
    similarity: float = 0.9,
    chunk_size: int | None = None,
) -> Circuit:
    """Top-down automatic path patching (see the module docstring).

    - ``threshold``: minimum ``|effect|`` to keep a connection; with ``relative=True`` a fraction
      of ``|loss(fully ablated) - loss(clean)|``.
    - ``grouped``: patch layer groups jointly first and split the groups that matter.
    - ``positions``: the task labels whose positions keys and values are searched at (default:
      every label; without labels, every position).
    - ``similarity``: cosine threshold for grouping heads with alike effects.
    """
    started = time.perf_counter()
    graph = problem.graph
    if graph.level != "edge" or not graph.qkv_split or graph.internal_edges:
        raise ValueError("path patching reports Q, K and V composition separately: use the q/k/v-split edge graph "
                         "without internal edges (Graph.from_model(model, qkv_split=True))")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    run = problem.run
    cfg = run.model.config
    n_pos = run.tokens.shape[1]
    labels = _aligned_labels(problem, positions)
    read_positions = _aligned_read_positions(run)
    chunk = chunk_size or max(1, min(16, auto_chunk_size(run, 16)))

    ones = np.ones((n_pos, graph.n_gates), np.float32)
    ref_loss = float(_pass_one(problem, jnp.asarray(ones[None]), jnp.int32(0), 1)[0][0])
    gap = abs(problem.evaluate(graph.gates(0.0, run.model.dtype)) * (-1 if problem.metric.higher_is_better else 1) - ref_loss)
    cut = threshold * gap if relative else threshold
    clean_values = source_values(run.model, run.tokens)
    src_index = {name: i for i, name in enumerate(graph.sources)}
    edge_src = np.array([src_index[graph.split_edge(e)[0]] for e in graph.edges])

    found: dict[tuple[int, int], float] = {}  # (edge, destination position) -> effect
    tested: dict[tuple[int, int], float] = {}
    paths: list[Path] = []
    frontier = [("logits", p) for p in read_positions]
    expanded: set[tuple[str, int]] = set()
    label_of = {p: name for name, p in labels.items()}

    def evaluate(receiver: str, candidates: list[list[tuple[int, int]]]) -> np.ndarray:
        """Effects of patching each candidate set of (edge, position) pairs, measured through found edges."""
        effects = []
        r = jnp.int32(0 if receiver == "logits" else src_index[receiver])
        if receiver != "logits":
            second = jnp.asarray(_found_gates(found, edge_src, int(r), ones.shape))
            reference = float(_pass_two(problem, clean_values, r, clean_values[int(r)][None], second, 1)[0])
        for start in range(0, len(candidates), chunk):  # fixed-size calls: one compilation per pass
            part = candidates[start : start + chunk]
            gates = np.repeat(ones[None], chunk, axis=0)
            for k, pairs in enumerate(part):
                for e, p in pairs:
                    gates[k, p, e] = 0.0
            losses, outputs = _pass_one(problem, jnp.asarray(gates), r, chunk)
            if receiver == "logits":
                effects.append(np.asarray(losses, np.float64)[: len(part)] - ref_loss)
            else:
                losses = _pass_two(problem, clean_values, r, outputs, second, chunk)
                effects.append(np.asarray(losses, np.float64)[: len(part)] - reference)
        return np.concatenate(effects)

    # Exact reverse topological order: a node is expanded only after every node that reads it (the
    # MLP of a layer reads that layer's heads, so it goes first), so all of its found out-edges are
    # known when its inputs are measured; within a component, later positions first.
    topo = {name: i for i, name in enumerate(graph.sources)}
    topo["logits"] = len(graph.sources)
    evaluated: set[tuple[str, int]] = set()  # destination inputs already measured (a path is measured once)
    truncated = False
    while frontier:
        frontier.sort(key=lambda node: (-topo[node[0]], -node[1]))
        node, pos = frontier.pop(0)
        if (node, pos) in expanded:
            continue
        if len(expanded) >= max_nodes:
            truncated = True
            break
        expanded.add((node, pos))
        for dst, p in _inputs_of(node, pos, labels, cfg.causal, n_pos):
            if (dst, p) in evaluated:
                continue
            evaluated.add((dst, p))
            sources = graph.sources_of(dst)
            edge_of = {s: graph.edge_index(f"{s}->{dst}") for s in sources}
            kept_groups = _search(
                lambda groups: evaluate(node, [[(edge_of[s], p) for s in g] for g in groups]),
                _initial_groups(sources) if grouped else [[s] for s in sources],
                cut,
                tested_sink=lambda group, effect: tested.__setitem__((edge_of[group[0]], p), effect) if len(group) == 1 else None,
                split=grouped,
            )
            for group, effect in kept_groups:
                for s in group:
                    found[(edge_of[s], p)] = effect / len(group)
                    if s != "embed":
                        frontier.append((s, p))
                paths.append(Path(tuple(group), dst, int(p), label_of.get(p, f"pos{p}"), float(effect)))

    if truncated:
        warnings.warn(f"path patching stopped after max_nodes={max_nodes} expanded nodes; the circuit is truncated "
                      "(circuit.extra['truncated'])", stacklevel=2)
    # An edge's score is its largest |effect| over positions (a strongly negative edge matters as much
    # as a strongly positive one); the signed effect at that position is kept in extra["signed_scores"].
    signed = np.full(graph.n_gates, np.nan)
    for table in (tested, found):
        for (e, _), effect in table.items():
            if np.isnan(signed[e]) or abs(effect) > abs(signed[e]):
                signed[e] = effect
    scores = np.abs(signed)
    kept = tuple(graph.edges[e] for e in sorted({e for e, _ in found}))
    groups = _group_heads(paths, similarity)
    circuit_gates = np.zeros(graph.n_gates, np.float32)
    circuit_gates[[graph.edge_index(e) for e in kept]] = 1.0
    return Circuit.of(
        problem,
        "path-patching",
        scores=scores,
        kept=kept,
        threshold=float(threshold),
        metric_value=problem.evaluate(jnp.asarray(circuit_gates)),
        seconds=time.perf_counter() - started,
        settings={"threshold": threshold, "relative": relative, "grouped": grouped, "cut": cut,
                  "labels": labels, "similarity": similarity},
        extra={
            "truncated": truncated,
            "signed_scores": {graph.edges[e]: float(signed[e]) for e in range(graph.n_gates) if not np.isnan(signed[e])},
            "paths": [p.to_dict() for p in paths],
            "composition": {c: sum(p.composition == c for p in paths) for c in ("direct", "q", "k", "v", "mlp")},
            "head_groups": groups,
            "summary": _summary(paths, groups),
        },
    )


def _search(evaluate, groups, cut, tested_sink, split: bool):
    """Evaluate groups of senders and keep those with ``|effect| >= cut``.

    With ``split``, a group that matters is opened: members that pass on their own are kept
    individually, and the remaining members, patched jointly, are kept as one distributed unit
    when they still pass (dropped otherwise).
    """
    if not groups:
        return []
    kept = []
    for group, effect in zip(groups, evaluate(groups)):
        if len(group) == 1:
            tested_sink(group, float(effect))
        if abs(effect) < cut:
            continue
        if not split or len(group) == 1:
            kept.append((group, float(effect)))
            continue
        alone = evaluate([[m] for m in group])
        strong = []
        for m, e in zip(group, alone):
            tested_sink([m], float(e))
            if abs(e) >= cut:
                strong.append(m)
                kept.append(([m], float(e)))
        rest = [m for m in group if m not in strong]
        if not rest:
            continue
        rest_effect = float(effect) if not strong else float(evaluate([rest])[0])
        if abs(rest_effect) >= cut:
            kept.append((rest, rest_effect))
    return kept


def _initial_groups(sources) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for s in sources:
        key = s.split(".")[0] if s.startswith("a") else s
        groups.setdefault(key, []).append(s)
    return list(groups.values())


def _found_gates(found, edge_src, receiver: int, shape) -> np.ndarray:
    """Pass-2 gating: the receiver's found out-edges read its patched output (gate 0 on a clean
    ablation carrying it), its other out-edges read its clean output (gate 1); everywhere else
    found edges are live (1) and all other edges are frozen at their clean value (0)."""
    gates = np.zeros(shape, np.float32)
    gates[:, edge_src == receiver] = 1.0
    for (e, p) in found:
        gates[p, e] = 0.0 if edge_src[e] == receiver else 1.0
    return gates


def _inputs_of(node: str, pos: int, labels: dict[str, int], causal: bool, n_pos: int):
    if node == "logits" or node.startswith("mlp"):
        return [(node, pos)]
    earlier = sorted({p for p in labels.values() if p <= pos or not causal})
    return [(f"{node}.q", pos)] + [(f"{node}.{t}", p) for t in ("k", "v") for p in earlier]


def _aligned_labels(problem: Problem, wanted) -> dict[str, int]:
    tokens = problem.run.tokens
    n_pos = tokens.shape[1]
    task_labels = problem.labels
    if wanted is not None:
        unknown = [w for w in wanted if w not in (task_labels or {})]
        if unknown:
            raise ValueError(f"unknown position label(s) {unknown}; the task's labels are {sorted(task_labels or {})}"
                             + ("" if task_labels else " (none: every position is searched)"))
    if not task_labels:
        return {f"pos{p}": p for p in range(n_pos)}
    out = {}
    for name, values in task_labels.items():
        if wanted is not None and name not in wanted:
            continue
        values = np.asarray(values)
        if not np.all(values == values[0]):
            raise ValueError(
                f"path patching patches absolute positions, but label {name!r} sits at different positions in "
                "different prompts; build the task from a single template (aligned labels)"
            )
        out[name] = int(values[0])
    return out


def _aligned_read_positions(run) -> list[int]:
    positions = np.asarray(run.positions)
    if not np.all(positions == positions[:1]):
        raise ValueError("path patching needs the read positions to be the same in every prompt (a single template)")
    return sorted(set(positions[0].tolist()))


def _group_heads(paths: list[Path], similarity: float) -> list[list[str]]:
    """Heads whose effect signatures (effect per receiver input and position) are alike."""
    keys = sorted({(p.receiver, p.position) for p in paths})
    index = {k: i for i, k in enumerate(keys)}
    signature: dict[str, np.ndarray] = {}
    for p in paths:
        for s in p.senders:
            if s.startswith("a"):
                vec = signature.setdefault(s, np.zeros(len(keys)))
                vec[index[(p.receiver, p.position)]] += p.effect / len(p.senders)
    heads = sorted(signature, key=lambda h: -np.abs(signature[h]).sum())
    groups: list[list[str]] = []
    for head in heads:
        v = signature[head]
        for group in groups:
            rep = signature[group[0]]
            cos = float(v @ rep / (np.linalg.norm(v) * np.linalg.norm(rep) + 1e-30))
            if cos >= similarity:
                group.append(head)
                break
        else:
            groups.append([head])
    return [sorted(g, key=_head_key) for g in groups]


def _head_key(head: str):
    layer, h = head[1:].split(".")
    return int(layer), int(h)


def _summary(paths: list[Path], groups: list[list[str]]) -> str:
    """A few lines: which units feed which, at which positions, by which composition."""
    named = [g for g in groups if len(g) > 1]
    unit = {h: f"G{i + 1}" for i, g in enumerate(named) for h in g}

    def name(node):
        head = ".".join(node.split(".")[:2]) if node.startswith("a") else node
        return unit.get(head, head)

    totals: dict[tuple[str, str, str, str], float] = {}
    for p in paths:
        senders = sorted({name(s) for s in p.senders})
        key = ("+".join(senders), name(p.receiver), p.composition, p.label)
        totals[key] = totals.get(key, 0.0) + p.effect
    lines = [f"G{i + 1} = {{{', '.join(g)}}}" for i, g in enumerate(named)]
    for (src, dst, comp, label), effect in sorted(totals.items(), key=lambda kv: -abs(kv[1])):
        via = "" if comp in ("direct", "mlp") else f" via {comp.upper()}"
        lines.append(f"{src} -> {dst}{via} at {label}: effect {effect:+.4g}")
    return "\n".join(lines)
