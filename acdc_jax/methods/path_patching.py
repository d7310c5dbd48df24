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
``.q``, ``.k`` and ``.v`` inputs. With k/v inputs per key/value head (``Graph.kv_heads``) a head's
keys and values are its group's inputs ``a{l}.g{j}.k|v``: a patch there is carried along the found
edges through the node's own heads only (the path goes through them), and, a destination input
being measured once, a group input is measured through the first of its heads the search reaches.

**The circuit is per position.** What is measured and kept is an (edge, destination position)
pair; ``circuit.extra["kept_positions"]`` lists them and ``metric_value`` evaluates exactly them
(per-position gates: 1 on a kept pair, 0 everywhere else). ``kept`` is the position-free
projection (an edge kept at any position), evaluated at every position in
``extra["metric_value_projected"]``. Scores rank edges by ``|effect|`` (the signed effects are in
``extra["signed_scores"]``); a destination input is measured once, however many times its head
was reached. ``max_nodes`` truncation is recorded in ``extra["truncated"]`` (and warned about).

Two additions address the limitations of plain top-down path patching:
- ``grouped=True``: effects spread thinly over many components can each stay below the threshold.
  A second search patches, into every input, each sender alone and each layer's heads jointly (those
  that pass alone taken out first, so opposite-signed strong heads are never cancelled inside a
  group). A group that passes is a node of its own: its members' inputs (q at its position, k and v
  at earlier positions, each kind apart) are patched together, and their outputs are recomputed
  together and carried along the found edges, recursively down to the embedding. The circuit is
  the union of this search's pairs and the plain search's, so grouped mode keeps everything plain
  mode keeps. Each edge of a jointly patched unit is credited an equal share of its effect.
- Heads that do the same job are grouped afterwards: heads whose effect signatures (effect on each
  receiver input at each position) point the same way (cosine >= ``similarity``) form a class. The
  summary (``extra["summary"]``, rows in ``extra["summary_rows"]``) lists at most
  ``summary_lines`` connections between classes, strongest first, each with its position, its
  composition (Q, K, V, direct, MLP) and its effect **measured by patching all of the connection's
  found edges at once** (not a sum of single-edge effects).
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
    """A kept direct connection: ``senders`` (patched jointly) into ``receiver`` at ``position``;
    ``receiver`` is one destination input, or a group's inputs of one kind joined by ``+``."""

    senders: tuple[str, ...]
    receiver: str  # a destination input: "logits", "mlp3", "a9.9.q", ...
    position: int
    label: str
    effect: float
    search: str = "plain"  # which search found it: "plain", or "grouped" (layer groups patched jointly)

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
def _pass_one(problem: Problem, gates, receivers, chunk: int):
    """Loss, and the receivers' outputs (``receivers``: source indices), for each per-position gating
    in ``gates`` [K, P, n]."""
    run = problem.run

    def one(g):
        logits, deltas = gated_forward(run.model, run.graph.dense(g), run.ablation, run.tokens, positions=run.positions, return_deltas=True)
        out = deltas[receivers] + run.ablation.values[receivers]
        return problem.metric.loss(logits, problem.inputs), out

    return chunked_vmap(one, gates, chunk)


@eqx.filter_jit
def _pass_two(problem: Problem, clean_values, receivers, outputs, gates, chunk: int):
    """Loss when the receivers' outputs are replaced by each of ``outputs`` along the found edges only."""
    run = problem.run
    dense = run.graph.dense(gates)

    def one(out):
        ablation = Ablation.from_values(run.model, clean_values.at[receivers].set(out))
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
    summary_lines: int = 12,
    chunk_size: int | None = None,
) -> Circuit:
    """Top-down automatic path patching (see the module docstring).

    - ``threshold``: minimum ``|effect|`` to keep a connection; with ``relative=True`` a fraction
      of ``|loss(fully ablated) - loss(clean)|``.
    - ``grouped``: also search with layer groups patched jointly and expanded as groups (the
      circuit is the union with the plain search's).
    - ``positions``: the task labels whose positions keys and values are searched at (default:
      every label; without labels, every position).
    - ``similarity``: cosine threshold for grouping heads with alike effects.
    - ``summary_lines``: the most connections the readable summary lists.
    """
    started = time.perf_counter()
    graph = problem.graph
    if graph.level != "edge" or not graph.qkv_split or graph.internal_edges:
        raise ValueError("path patching reports Q, K and V composition separately: use the q/k/v-split edge graph "
                         "without internal edges (Graph.from_model(model, qkv_split=True))")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    run = problem.run
    n_pos = run.tokens.shape[1]
    labels = _aligned_labels(problem, positions)
    read_positions = _aligned_read_positions(run)
    chunk = chunk_size or max(1, min(16, auto_chunk_size(run, 16)))
    search = _Search(problem, labels, chunk)
    gap = abs(problem.evaluate(graph.gates(0.0, run.model.dtype)) * (-1 if problem.metric.higher_is_better else 1)
              - search.ref_loss)
    cut = threshold * gap if relative else threshold

    results = [search.run(read_positions, cut, grouped=False, max_nodes=max_nodes)]
    if grouped:
        results.append(search.run(read_positions, cut, grouped=True, max_nodes=max_nodes))
    found = _merge([r.found for r in results])
    tested = _merge([r.tested for r in results])
    paths = _unique_paths([p for r in results for p in r.paths])
    truncated = any(r.truncated for r in results)
    if truncated:
        warnings.warn(f"path patching stopped after max_nodes={max_nodes} expanded nodes; the circuit is truncated "
                      "(circuit.extra['truncated'])", stacklevel=2)

    # An edge's score is its largest |effect| (a strongly negative edge matters as much as a strongly
    # positive one; the signed value is in extra["signed_scores"]): over the patches of it alone, and,
    # for a kept edge, its equal share of the kept patch it was part of.
    signed = np.full(graph.n_gates, np.nan)
    for table in (tested, found):
        for (e, _), effect in table.items():
            if np.isnan(signed[e]) or abs(effect) > abs(signed[e]):
                signed[e] = effect
    # The circuit is the (edge, position) pairs that were measured and kept; ``kept`` is its
    # position-free projection.
    pairs = sorted(found)
    per_position = np.zeros((n_pos, graph.n_gates), np.float32)
    for e, p in pairs:
        per_position[p, e] = 1.0
    kept = tuple(graph.edges[e] for e in sorted({e for e, _ in pairs}))
    projected = np.zeros(graph.n_gates, np.float32)
    projected[[graph.edge_index(e) for e in kept]] = 1.0
    groups = _group_heads(paths, similarity)
    rows = _class_effects(search, found, paths, groups, limit=2 * summary_lines)
    return Circuit.of(
        problem,
        "path-patching",
        scores=np.abs(signed),
        kept=kept,
        threshold=float(threshold),
        metric_value=problem.evaluate(jnp.asarray(per_position)),
        seconds=time.perf_counter() - started,
        settings={"threshold": threshold, "relative": relative, "grouped": grouped, "cut": cut,
                  "labels": labels, "similarity": similarity},
        extra={
            "truncated": truncated,
            "nodes_expanded": {r.mode: r.n_expanded for r in results},
            "signed_scores": {graph.edges[e]: float(signed[e]) for e in range(graph.n_gates) if not np.isnan(signed[e])},
            "kept_positions": [{"edge": graph.edges[e], "position": int(p), "label": search.label(p)}
                               for e, p in pairs],
            "metric_value_projected": problem.evaluate(jnp.asarray(projected)),
            "paths": [p.to_dict() for p in paths],
            "composition": {c: sum(p.composition == c for p in paths) for c in ("direct", "q", "k", "v", "mlp")},
            "head_groups": groups,
            "summary_rows": rows,
            "summary": _summary(rows, groups, summary_lines),
        },
    )


Node = tuple[tuple[str, ...], int]  # (receiver components, position): one component, or a group of heads


@dataclasses.dataclass
class _Result:
    mode: str
    found: dict  # (edge, destination position) -> its share of the kept patch's effect
    tested: dict  # (edge, destination position) -> effect of patching it alone
    paths: list
    truncated: bool
    n_expanded: int


class _Search:
    """The measurements of one path-patching problem: patch candidate (edge, position) sets into a
    receiver (one component or a group) and measure the loss through a given set of found edges."""

    def __init__(self, problem: Problem, labels: dict[str, int], chunk: int):
        run = problem.run
        self.problem, self.graph, self.labels, self.chunk = problem, problem.graph, labels, chunk
        self.causal = run.model.config.causal
        self.n_pos = run.tokens.shape[1]
        self.ones = np.ones((self.n_pos, self.graph.n_gates), np.float32)
        self.ref_loss = float(_pass_one(problem, jnp.asarray(self.ones[None]), jnp.zeros(1, jnp.int32), 1)[0][0])
        self.clean_values = source_values(run.model, run.tokens)
        self.src_index = {name: i for i, name in enumerate(self.graph.sources)}
        self.edge_src = np.array([self.src_index[self.graph.split_edge(e)[0]] for e in self.graph.edges])
        self.topo = {**self.src_index, "logits": len(self.graph.sources)}
        self._label_of = {p: name for name, p in labels.items()}

    def label(self, position: int) -> str:
        """The task's label of an absolute position, or ``pos{position}``."""
        return self._label_of.get(position, f"pos{position}")

    def effects(self, members: tuple[str, ...], found: dict, candidates: list[list[tuple[int, int]]]) -> np.ndarray:
        """``loss(patched) - loss(clean)`` for each candidate set of (edge, position) pairs: pass 1
        recomputes the receivers with the patch, pass 2 carries their outputs along ``found`` only."""
        problem, chunk = self.problem, self.chunk
        direct = members == ("logits",)
        receivers = jnp.asarray([0] if direct else [self.src_index[m] for m in members], jnp.int32)
        if not direct:
            second = jnp.asarray(_found_gates(found, self.edge_src, np.asarray(receivers), self.ones.shape))
            reference = float(_pass_two(problem, self.clean_values, receivers, self.clean_values[receivers][None], second, 1)[0])
        effects = []
        for start in range(0, len(candidates), chunk):  # fixed-size calls: one compilation per pass
            part = candidates[start : start + chunk]
            gates = np.repeat(self.ones[None], chunk, axis=0)
            for k, pairs in enumerate(part):
                for e, p in pairs:
                    gates[k, p, e] = 0.0
            losses, outputs = _pass_one(problem, jnp.asarray(gates), receivers, chunk)
            if direct:
                effects.append(np.asarray(losses, np.float64)[: len(part)] - self.ref_loss)
            else:
                losses = _pass_two(problem, self.clean_values, receivers, outputs, second, chunk)
                effects.append(np.asarray(losses, np.float64)[: len(part)] - reference)
        return np.concatenate(effects) if effects else np.zeros(0)

    def inputs_of(self, members: tuple[str, ...], pos: int) -> list[tuple[tuple[str, ...], int]]:
        """The destination inputs of a node, each as (the members' inputs of one kind, position)."""
        if members[0] == "logits" or members[0].startswith("mlp"):
            return [(members, pos)]
        earlier = sorted({p for p in self.labels.values() if p <= pos or not self.causal})
        def inputs(t):  # a group's heads share their k/v inputs when the graph groups them
            return tuple(dict.fromkeys(self.graph.input_of(*map(int, h[1:].split(".")), t) for h in members))

        return [(inputs("q"), pos)] + [(inputs(t), p) for t in ("k", "v") for p in earlier]

    def pairs(self, senders, dsts, p) -> list[tuple[int, int]]:
        return [(self.graph.edge_index(f"{s}->{d}"), p) for s in senders for d in dsts]

    def run(self, read_positions, cut: float, *, grouped: bool, max_nodes: int) -> _Result:
        """The top-down search. Plain: every sender into every input alone. Grouped: also each
        layer's heads jointly (after taking out the heads that pass alone); a group that passes is a
        node of its own, expanded as a group (its members' inputs patched together)."""
        found: dict = {}
        tested: dict = {}
        paths: list[Path] = []
        frontier: list[Node] = [(("logits",), p) for p in read_positions]
        expanded: set[Node] = set()
        evaluated: set = set()  # destination inputs already measured (a path is measured once)
        truncated = False
        mode = "grouped" if grouped else "plain"
        while frontier:
            # Exact reverse topological order: a node is expanded only after every node that reads it
            # (the MLP of a layer reads that layer's heads, so it goes first), so all of its found
            # out-edges are known when its inputs are measured; later positions first.
            frontier.sort(key=lambda node: (-max(self.topo[m] for m in node[0]), -node[1], node[0]))
            node = frontier.pop(0)
            if node in expanded:
                continue
            if len(expanded) >= max_nodes:
                truncated = True
                break
            expanded.add(node)
            members = node[0]
            for dsts, p in self.inputs_of(*node):
                if (dsts, p) in evaluated:
                    continue
                evaluated.add((dsts, p))
                sources = self.graph.sources_of(dsts[0])
                singles = self.effects(members, found, [self.pairs([s], dsts, p) for s in sources])
                kept = []
                for s, effect in zip(sources, singles):
                    for pair in self.pairs([s], dsts, p):
                        tested[pair] = float(effect) / len(dsts)
                    if abs(effect) >= cut:
                        kept.append(([s], float(effect)))
                if grouped:
                    strong = {s for (s,), _ in kept}
                    rests = [[s for s in g if s not in strong] for g in _layer_groups(sources)]
                    rests = [r for r in rests if len(r) > 1]
                    joint = self.effects(members, found, [self.pairs(r, dsts, p) for r in rests])
                    kept += [(r, float(e)) for r, e in zip(rests, joint) if abs(e) >= cut]
                for unit, effect in kept:
                    share = effect / (len(unit) * len(dsts))
                    for pair in self.pairs(unit, dsts, p):
                        if pair not in found or abs(share) > abs(found[pair]):
                            found[pair] = share
                    if unit != ["embed"]:
                        frontier.append((tuple(unit), p))
                    paths.append(Path(tuple(unit), "+".join(dsts), int(p), self.label(p), effect, mode))
        return _Result(mode, found, tested, paths, truncated, len(expanded))


def _layer_groups(sources) -> list[list[str]]:
    """The senders patched jointly in grouped mode: each layer's heads (embed and MLPs are single)."""
    groups: dict[str, list[str]] = {}
    for s in sources:
        if s.startswith("a"):
            groups.setdefault(s.split(".")[0], []).append(s)
    return list(groups.values())


def _merge(tables: list[dict]) -> dict:
    """The union of (edge, position) tables, keeping the larger |value| where both have one."""
    out: dict = {}
    for table in tables:
        for key, value in table.items():
            if key not in out or abs(value) > abs(out[key]):
                out[key] = value
    return out


def _unique_paths(paths: list[Path]) -> list[Path]:
    """One path per (senders, receiver, position): the plain search's, where both searches found it."""
    seen: dict = {}
    for p in paths:
        seen.setdefault((p.senders, p.receiver, p.position), p)
    return list(seen.values())


def _found_gates(found, edge_src, receivers, shape) -> np.ndarray:
    """Pass-2 gating: the receivers' found out-edges read their patched outputs (gate 0 on a clean
    ablation carrying them), their other out-edges read their clean outputs (gate 1); everywhere else
    found edges are live (1) and all other edges are frozen at their clean value (0)."""
    is_receiver = np.isin(edge_src, receivers)
    gates = np.zeros(shape, np.float32)
    gates[:, is_receiver] = 1.0
    for (e, p) in found:
        gates[p, e] = 0.0 if is_receiver[e] else 1.0
    return gates


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


def _class_effects(search: _Search, found: dict, paths: list[Path], groups, limit: int) -> list[dict]:
    """Each connection between classes (alike heads form one class, any other component is its
    own), measured by patching all of its found edges at once into the receiving class (through the
    found edges, as every path effect): the rows of the summary, largest |effect| first. Only the
    ``limit`` connections with the largest summed path effects are measured."""
    unit = {h: f"G{i + 1}" for i, g in enumerate(g for g in groups if len(g) > 1) for h in g}
    name = lambda component: unit.get(component, component)  # noqa: E731
    fed = lambda d: search.graph.heads_fed(d) or (d,)  # noqa: E731  (mlp and logits are their own)
    connections: dict = {}
    for p in paths:
        dsts = p.receiver.split("+")
        key = ("+".join(sorted({name(s) for s in p.senders})), "+".join(sorted({name(h) for d in dsts for h in fed(d)})),
               p.composition, p.position)
        entry = connections.setdefault(key, {"pairs": set(), "receivers": set(), "paths": 0, "weight": 0.0})
        entry["pairs"].update(pair for pair in search.pairs(p.senders, dsts, p.position) if pair in found)
        entry["receivers"].update(h for d in dsts for h in fed(d))
        entry["paths"] += 1
        entry["weight"] += abs(p.effect)
    measured = sorted(connections.items(), key=lambda kv: -kv[1]["weight"])[:limit]
    rows = []
    for (src, dst, composition, position), entry in measured:
        receivers = tuple(sorted(entry["receivers"], key=lambda m: search.topo[m]))
        effect = float(search.effects(receivers, found, [sorted(entry["pairs"])])[0])
        rows.append({"sender": src, "receiver": dst, "composition": composition, "position": int(position),
                     "label": search.label(position), "effect": effect,
                     "n_edges": len(entry["pairs"]), "n_paths": entry["paths"]})
    return sorted(rows, key=lambda r: -abs(r["effect"]))


def _summary(rows: list[dict], groups: list[list[str]], lines: int) -> str:
    """A few lines a person reads: the classes of alike heads, then the strongest connections between
    classes (at which position, by which composition) with their effect patched as a class."""
    shown = rows[:lines]
    named = {f"G{i + 1}": g for i, g in enumerate(g for g in groups if len(g) > 1)}
    used = {c for r in shown for side in (r["sender"], r["receiver"]) for c in side.split("+")}
    out = [f"{c} = {{{', '.join(g)}}}" for c, g in named.items() if c in used]
    for r in shown:
        via = "" if r["composition"] in ("direct", "mlp") else f" via {r['composition'].upper()}"
        out.append(f"{r['sender']} -> {r['receiver']}{via} at {r['label']}: effect {r['effect']:+.4g}"
                   + (f" ({r['n_edges']} edges patched together)" if r["n_edges"] > 1 else ""))
    if len(rows) > lines:
        out.append(f"... {len(rows) - lines} weaker connections in extra['summary_rows']")
    return "\n".join(out)
