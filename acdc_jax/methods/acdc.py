"""ACDC (Conmy et al. 2023): greedy pruning of edges in reverse topological order, exactly, in batches.

The algorithm, as in ACDC's ``TLACDCExperiment.step``: visit destination inputs from ``logits``
backwards; for each incoming edge (latest source first) tentatively ablate it and compute
``result = loss(after) - loss(before)`` on a lower-is-better metric (``abs`` of it with
``abs_value=True``); the edge stays ablated when ``result < threshold``, otherwise it is restored.
A destination whose node no longer feeds anything (all its outgoing edges ablated) has all its
incoming edges ablated without evaluation, as ACDC does. The score recorded for an edge is its
signed ``result`` (0 for edges ablated without evaluation).

**Visit order** is that of ACDC's ``TLACDCExperiment`` with its default settings, derived from its
code (see :func:`visit_order`): ``logits``, then layer by layer from the last, the MLP input, the
internal ``a.h.v->a.h`` edges of all heads (last head first, when the graph lists them), then the
``k`` and the ``q`` internal edges, then the ``a.h.v`` inputs of all heads (last head first), the
``k`` inputs, the ``q`` inputs. Within one destination the latest block is tried first (the MLP of
the layer below, then that layer's heads in ascending order, head 0 first, and so on down to
``embed``).

**The default graph and the original.** ACDC's graph always has the internal edges. Without them
(``internal_edges=False``, the default for ``acdc``) there are two differences: the internal edge
``a.h.v->a.h`` is never tested on its own (in the original its removal corrupts the head's whole v
input at once, and once it is gone the ``a.h.v`` input node is disconnected, so its incoming edges
are removed without evaluation), and consequently the residual edges into ``a.h.v`` are all tested
one by one here, where the original may skip them. The circuits then agree whenever no internal edge
would have been removed; to reproduce the original exactly, build the problem with
``internal_edges=True``.

**The search runs on the device.** The visit order becomes arrays (``_Plan``) and a jitted
``while_loop`` (``_search``) takes the steps: at a group's start it checks on the device whether the
destination's node still feeds anything, and otherwise evaluates the next ``width`` undecided edges
as cumulative removals {e1}, {e1,e2}, ... in one vmapped call, walks them as ACDC decides them one
by one, and stops the step at the first kept edge (the rows after it are discarded). The loss
before a removal is carried from the last decision, as ACDC's ``cur_metric`` is, and recomputed
only when the start layer changes. Every evaluation starts at the destination's layer on cached
clean differences: layers below it still have their starting gates (all 1, so their sources are
clean; or, with ``nodes``, the out-of-scope edges at 0, and then the cache comes from that gated
run). The host calls the loop for a growing number of steps at a time (while a call takes under half a
second, or under a quarter of ``checkpoint_every``: four times as many below an eighth of that,
twice as many above) and between calls reports
progress and writes checkpoints, so a step costs no host round trip and a resumed run makes the
same decisions. ``width`` (``max_batch``, at most ``chunk_size``) trades evaluations for steps: 1
evaluates each edge exactly once (the cheapest on a CPU, where configurations cost in sequence),
more fills an accelerator whose batch of configurations costs about what one does. Decisions do
not depend on it.

**Positions** (``positions=``, see ``methods._positions``): every edge gets one gate per position
unit (a token position, or a labelled span), and the units visited are (edge, position unit) pairs:
the destinations and, within one, the edges in the order above, and for each edge its position
units from the last to the first (later positions read earlier ones, so the last comes first, in
the spirit of the reverse topological order), each removed when the metric moves by less than the
threshold. A destination counts as feeding something while any edge out of its node is kept at any
position unit (and its internal edge, when listed, at any position unit); the search state is one
gate per (position unit, edge), and every evaluation runs the gates expanded to every token position.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..graph import Graph
from ..metrics import Metric, get_metric
from ..models import gated_forward
from ..patching import auto_chunk_size
from ._circuit import Circuit
from ._positions import PositionUnits, resolve_positions
from ._problem import Problem

CHECKPOINT_VERSION = 2


class CheckpointMismatch(ValueError):
    """A checkpoint written by a different run (other task, model, graph or settings)."""


@dataclasses.dataclass(frozen=True)
class _Group:
    """Gate units decided together: the incoming edges of one destination (or one node-level sweep)."""

    name: str
    units: np.ndarray  # gate indices, in visit order
    layers: np.ndarray  # start layer for evaluating each unit's removal
    consumer: int | tuple[int, ...] = -1  # source(s) that must still feed something (-1: always connected)
    via: int = -1  # internal edge that must still be kept too (-1: none)


def visit_order(graph: Graph) -> list[_Group]:
    """ACDC's visit order for ``graph``, as ``TLACDCExperiment`` (default settings) visits it.

    How the original orders its work, read from its code:

    - ``TLACDCCorrespondence.setup_from_model`` creates the nodes layer by layer from the last: the
      MLP (``hook_mlp_out``, ``hook_mlp_in``), then the heads from the last to the first, each with
      ``hook_q``/``hook_q_input``, ``k``, ``v``; the embedding last. A node's edges from the residual
      stream are added as each source is created, so a destination's incoming edges are stored
      latest block first: the MLP of the layer below, that layer's heads (last head first), the MLP
      of the layer below that, ..., the embedding. They are kept in nested dicts keyed by sender hook
      name, then by sender index (one index per head of ``attn.hook_result``).
    - ``reverse_topologically_sort_corr`` reorders the hook names by the reverse of TransformerLens's
      execution order. Within a block that runs ``hook_q_input``, ``hook_k_input``, ``hook_v_input``,
      ``attn.hook_q``, ``hook_k``, ``hook_v``, ``attn.hook_result``, ``hook_mlp_in``,
      ``hook_mlp_out``; reversed: the MLP, the head outputs (placeholder edges only, nothing tested),
      ``hook_v``, ``hook_k``, ``hook_q`` (whose one incoming edge each is the internal edge
      ``a.h.t->a.h``), then ``hook_v_input``, ``hook_k_input``, ``hook_q_input``.
      ``find_next_node`` walks the indices of one hook name in insertion order (last head first)
      before the next name.
    - ``step`` tries the incoming edges sender name by sender name in stored order (``names_mode``
      "normal"), and within a name the indices reversed (``indices_mode`` defaults to "reverse" in
      ``TLACDCExperiment``): so the heads of one layer are tried head 0 first. (ACDC's ``main.py``
      passes ``--indices-mode``, default "normal", which would try the last head first; the paper's
      runs mostly pass "reverse".)

    Each group's units are gate indices in that order; node-level graphs keep their own order
    (latest node first). With k/v inputs per key/value head (``graph.kv_heads``, no ACDC original to
    follow) a layer's v inputs, then its k inputs, go last group first, then its q inputs as above;
    a grouped input is settled unvisited only when no head of its group feeds anything.
    """
    if graph.level == "node":
        units = np.arange(graph.n_gates)[::-1]
        layers = np.array([_source_layer(graph, graph.gate_names[u]) for u in units], np.int32)
        return [_Group("nodes", units, layers)]
    src_index = {name: i for i, name in enumerate(graph.sources)}
    edge_of = graph._edge_index

    def into(dst: str, layer: int, consumer: int | tuple[int, ...], via: int = -1) -> _Group:
        srcs = [edge_of[f"{src}->{dst}"] for src in _incoming_order(graph.sources_of(dst))]
        units = np.array(srcs, np.int32)
        return _Group(dst, units, np.full(len(units), layer, np.int32), consumer, via)

    groups = [into("logits", graph.n_layers, -1)]
    for layer in reversed(range(graph.n_layers)):
        if graph.has_mlp:
            groups.append(into(f"mlp{layer}", layer, src_index[f"mlp{layer}"]))
        heads = list(reversed(range(graph.n_heads)))
        kinds = ("v", "k", "q") if graph.qkv_split else (None,)
        if graph.kv_grouped:  # v, k per key/value group (last first; used while any head of the group is), then q
            for t in ("v", "k"):
                for j in reversed(range(graph.kv_heads)):
                    dst = f"a{layer}.g{j}.{t}"
                    groups.append(into(dst, layer, tuple(src_index[h] for h in graph.heads_fed(dst))))
            kinds = ("q",)
        if graph.internal_edges:
            for t in kinds:
                for h in heads:
                    name = f"a{layer}.{h}.{t}->a{layer}.{h}"
                    groups.append(_Group(name, np.array([edge_of[name]], np.int32),
                                         np.array([layer], np.int32), src_index[f"a{layer}.{h}"]))
        for t in kinds:
            for h in heads:
                dst = f"a{layer}.{h}.{t}" if t else f"a{layer}.{h}"
                via = edge_of[f"{dst}->a{layer}.{h}"] if graph.internal_edges else -1
                groups.append(into(dst, layer, src_index[f"a{layer}.{h}"], via))
    return groups


def _incoming_order(sources: tuple[str, ...]) -> list[str]:
    """A destination's sources in the order ACDC tries them: blocks latest first (``mlp{l}``, the
    heads of layer ``l``, ``mlp{l-1}``, ..., ``embed``), the heads of one layer in ascending order."""
    blocks: list[list[str]] = []
    for src in sources:  # topological order: embed, a0.*, mlp0, a1.*, ...
        block = src.split(".")[0]
        if blocks and blocks[-1][0].split(".")[0] == block:
            blocks[-1].append(src)
        else:
            blocks.append([src])
    return [src for block in reversed(blocks) for src in block]


def _source_layer(graph: Graph, source: str) -> int:
    if source == "embed":
        return 0
    return int(source[1:].split(".")[0]) if source.startswith("a") else int(source[3:])


# --------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """The visit order as arrays, for the search on the device (``G`` groups, ``U`` slots each).

    ``units[g, :length[g]]`` are group g's in-scope gate indices in visit order (edges outside the
    search scope are never tested), ``layers`` their start layers (padding: a large number),
    ``outgoing[g]`` the residual edges out of the group's consumer (padding: ``n_gates``, which
    reads as 0), ``has_consumer[g]`` whether the group needs its consumer connected at all, and
    ``via[g]`` the internal edge that must still be kept at some position unit (-1: none).
    With positions, gate indices are ``unit * n_gates + edge`` and ``unit_of`` maps token
    positions to position units (None without positions)."""

    units: jax.Array
    layers: jax.Array
    length: jax.Array
    outgoing: jax.Array
    has_consumer: jax.Array
    via: jax.Array
    unit_of: jax.Array | None = None


class _Carry(NamedTuple):
    """The search state between steps: where it is, the gates, the scores, the current loss and
    the layer it was computed from, and counters."""

    group: jax.Array
    position: jax.Array
    gates: jax.Array
    scores: jax.Array
    loss: jax.Array
    loss_layer: jax.Array
    steps: jax.Array
    evaluations: jax.Array
    work: jax.Array  # gated forwards' worth of layers run (a run from layer l costs (L + 1 - l) / (L + 1))
    needed: jax.Array  # the same for one evaluation per tested edge: the floor of the work


_NO_LAYER = 1 << 30


def _plan(graph: Graph, groups: list[_Group], out_of_scope: np.ndarray, units: PositionUnits | None = None) -> _Plan:
    n_units = 1 if units is None else units.n_units
    n = graph.n_gates * n_units
    at_every_unit = (np.arange(n_units) * graph.n_gates)[:, None]
    outgoing = {s: (at_every_unit + e[None, :]).reshape(-1) for s, e in _outgoing_edges(graph).items()}
    width = max([1] + [int((~out_of_scope[g.units]).sum()) for g in groups])
    fan_out = max([1] + [len(_consumer_edges(outgoing, g.consumer)) for g in groups])
    units_ = np.zeros((len(groups), width), np.int32)
    layers = np.full((len(groups), width), _NO_LAYER, np.int32)
    length = np.zeros(len(groups), np.int32)
    out = np.full((len(groups), fan_out), n, np.int32)
    for i, group in enumerate(groups):
        scope = ~out_of_scope[group.units]
        k = int(scope.sum())
        units_[i, :k], layers[i, :k], length[i] = group.units[scope], group.layers[scope], k
        edges = _consumer_edges(outgoing, group.consumer)
        out[i, : len(edges)] = edges
    has_consumer = np.array([isinstance(g.consumer, tuple) or g.consumer >= 0 for g in groups])
    via = np.array([[-1] * n_units if g.via < 0 else (at_every_unit[:, 0] + g.via).tolist() for g in groups], np.int32)
    unit_of = None if units is None else jnp.asarray(units.unit_of)
    return _Plan(*(jnp.asarray(a) for a in (units_, layers, length, out, has_consumer, via)), unit_of)


def _with_positions(groups: list[_Group], n_gates: int, n_units: int) -> list[_Group]:
    """The groups over (edge, position unit) pairs: each edge's position units from the last to the first."""
    order = np.arange(n_units)[::-1] * n_gates
    return [dataclasses.replace(g, units=(g.units[:, None] + order[None, :]).reshape(-1).astype(np.int32),
                                layers=np.repeat(g.layers, n_units)) for g in groups]


def _token_gates(gates, unit_of, n_gates: int):
    """Search gates (one per position unit and edge, flat) as the graph's per-position gates."""
    if unit_of is None:
        return gates
    return gates.reshape(-1, n_gates)[unit_of]


@eqx.filter_jit
def _search(problem: Problem, deltas, plan: _Plan, carry: _Carry, threshold, max_steps, abs_value: bool, width: int):
    """Up to ``max_steps`` steps of ACDC's search, on the device (a ``while_loop``; no host round trip).

    A step either settles a group whose consumer feeds nothing any more (all its edges ablated
    without evaluation, score 0, as ACDC does), or evaluates the next ``width`` undecided edges of
    the current group as cumulative removals (row r removes the next r + 1 edges) in one vmapped
    call, from the group's layer on the cached differences. The removals are then walked as
    ACDC decides them one at a time: each result is the loss after the removal minus the loss
    before it (the current loss, carried), the edge stays ablated when the result is below the
    threshold, and the first kept edge ends the step; rows after it are discarded. The current
    loss is recomputed when the start layer changes, so that an edge that changes nothing has a
    result of exactly 0.
    """
    n_gates = carry.gates.shape[0]
    n_groups, n_slots = plan.units.shape
    cols = jnp.arange(width)
    n_layers = problem.model.config.n_layers
    n_edges = problem.graph.n_gates  # per position unit: the search's gates are [n_units * n_edges]

    def losses_of(start, rows):
        def one(gates):
            return problem.loss_from(start, deltas, _token_gates(gates, plan.unit_of, n_edges))

        return jax.vmap(one)(rows).astype(carry.loss.dtype)

    def connected(c):
        g = c.group
        feeds = jnp.any(jnp.concatenate([c.gates, jnp.zeros(1, c.gates.dtype)])[plan.outgoing[g]] > 0)
        via = plan.via[g]  # the internal edge at every position unit (-1: none)
        via_kept = (via[0] < 0) | jnp.any(c.gates[jnp.maximum(via, 0)] > 0)
        return ~plan.has_consumer[g] | (feeds & via_kept)

    def settle(c):
        index = jnp.where(jnp.arange(n_slots) < plan.length[c.group], plan.units[c.group], n_gates)
        return c._replace(gates=c.gates.at[index].set(0.0, mode="drop"), scores=c.scores.at[index].set(0.0, mode="drop"),
                          group=c.group + 1, position=jnp.int32(0), steps=c.steps + 1)

    def evaluate(c):
        g, length = c.group, plan.length[c.group]
        slot = c.position + cols
        valid = slot < length
        slot = jnp.minimum(slot, n_slots - 1)
        units = plan.units[g, slot]
        start = jnp.min(jnp.where(valid, plan.layers[g, slot], _NO_LAYER))
        cost = (n_layers + 1 - start).astype(jnp.float32) / (n_layers + 1)
        fresh = start != c.loss_layer
        # the same vmapped program as the candidates, so that equal gates give equal losses to the bit
        before = lax.cond(fresh, lambda: losses_of(start, jnp.broadcast_to(c.gates, (width, n_gates)))[0], lambda: c.loss)
        removed = (cols[None, :] <= cols[:, None]) & valid[None, :]  # row r: the first r + 1 edges
        rows = jnp.broadcast_to(c.gates, (width, n_gates)).at[cols[:, None], jnp.where(removed, units[None, :], n_gates)]
        losses = losses_of(start, rows.set(0.0, mode="drop"))
        result = losses - jnp.concatenate([before[None], losses[:-1]])
        kept = valid & ~((jnp.abs(result) if abs_value else result) < threshold)  # NaN: kept
        first = jnp.where(kept.any(), jnp.argmax(kept), width)
        n_valid = valid.sum()
        pruned = (cols < first) & valid
        decided = (cols <= first) & valid
        last = jnp.where(kept.any(), first, n_valid) - 1  # the last removal that stays
        position = c.position + jnp.where(kept.any(), first + 1, n_valid)
        done = position >= length
        return c._replace(
            gates=c.gates.at[jnp.where(pruned, units, n_gates)].set(0.0, mode="drop"),
            scores=c.scores.at[jnp.where(decided, units, n_gates)].set(result.astype(c.scores.dtype), mode="drop"),
            loss=jnp.where(last >= 0, losses[jnp.maximum(last, 0)], before),
            loss_layer=start,
            group=jnp.where(done, g + 1, g),
            position=jnp.where(done, 0, position).astype(jnp.int32),
            steps=c.steps + 1,
            evaluations=c.evaluations + width + fresh.astype(jnp.int32),
            work=c.work + (width + fresh.astype(jnp.float32)) * cost,
            needed=c.needed + decided.sum().astype(jnp.float32) * cost,
        )

    def step(c):
        at_start = c.position == 0
        return lax.cond(at_start & (~connected(c) | (plan.length[c.group] == 0)), settle, evaluate, c)

    return lax.while_loop(lambda c: (c.group < n_groups) & (c.steps < max_steps), step, carry)


def _fingerprint(problem: Problem, settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(dataclasses.asdict(problem.graph), sort_keys=True).encode())
    digest.update(json.dumps(problem.model.config.to_dict(), sort_keys=True).encode())
    for leaf in jax.tree.leaves(problem.model) + [problem.run.tokens, problem.run.positions, problem.run.ablation.values]:
        arr = np.asarray(leaf)
        digest.update(str(arr.shape).encode())
        digest.update(np.ascontiguousarray(arr).tobytes()[:1 << 20])
        digest.update(np.float64(arr.astype(np.float64).sum()).tobytes())
    return digest.hexdigest()


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class _SignalGuard:
    """SIGINT/SIGTERM during a checkpointed run: note the signal, let ACDC finish the batch it is in,
    write the checkpoint at the next consistent point (``stop_if_signalled``), then exit:
    ``KeyboardInterrupt`` for SIGINT, ``SystemExit(143)`` for SIGTERM. A second signal exits at once.
    The handlers are the run's own: the previous ones come back when ``acdc`` returns or raises."""

    def __init__(self) -> None:
        self.pending: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.pending is not None:  # asked twice: stop now (the last checkpoint stays)
            self._exit(signum)
        self.pending = signum

    @staticmethod
    def _exit(signum: int, saved: str = "") -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt(f"ACDC interrupted{saved}")
        raise SystemExit(128 + signum)

    def stop_if_signalled(self, save: Callable[[], None], where: str) -> None:
        if self.pending is not None:
            save()
            self._exit(self.pending, f"; checkpoint written to {where}")


def _saves_on_signal(fn):
    @functools.wraps(fn)
    def run(problem, *args, **kwargs):
        if kwargs.get("checkpoint") is None or threading.current_thread() is not threading.main_thread():
            return fn(problem, *args, **kwargs)
        guard = _SignalGuard()
        previous = {sig: signal.signal(sig, guard._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return fn(problem, *args, _guard=guard, **kwargs)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return run


@_saves_on_signal
def acdc(
    problem: Problem,
    *,
    threshold: float,
    metric: str | Metric | None = None,
    abs_value: bool = False,
    max_batch: int | None = None,
    chunk_size: int | None = None,
    nodes: set[str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 30.0,
    progress: Callable[[dict], None] | None = None,
    _guard: _SignalGuard | None = None,
    node_prepass: float | None = None,
    positions=None,
) -> Circuit:
    """Run ACDC on ``problem`` and return the pruned circuit.

    - ``threshold``: tau >= 0; an edge is pruned when ablating it changes the loss by less.
    - ``metric``: the pruning metric (default: the problem's); it is used lower-is-better.
    - ``abs_value``: compare ``|result|`` with tau (ACDC's ``abs_value_threshold``).
    - ``max_batch``: configurations per step (the speculative cumulative removals, see the module
      docstring; default 1 on a CPU, 16 on an accelerator); ``chunk_size``: at most this many (default:
      what fits in memory).
    - ``nodes``: restrict the search to edges between these nodes (``embed`` and ``logits`` are
      always included); other edges are ablated up front without evaluation (score NaN). Use the
      kept nodes of a node-level run to prune the search space.
    - ``checkpoint``: a JSON file written every ``checkpoint_every`` seconds and at the end; if it
      exists from the same run, the run resumes from it. SIGINT or SIGTERM during the run writes
      it at the end of the current batch and then exits (``KeyboardInterrupt``; exit code 143).
    - ``progress``: called after every call of the search with ``edges_done``, ``n_edges``, ``kept``,
      ``metric`` and ``forward_equivalents`` (the work so far).
    - ``node_prepass``: first run ACDC over nodes at this threshold and search only the edges
      between the nodes it keeps (a cheaper, non-exact first pass); its result is in
      ``circuit.extra["node_prepass"]``.
    - ``positions``: ``None`` (edges), ``"each"`` (every edge at every token position), ``"labels"``
      (at each of the task's labelled positions, the rest as ``other``) or a mapping
      ``label -> positions``: the units are (edge, position unit) pairs, visited as the module
      docstring says; the circuit's scores are ``[n_positions, n_gates]`` and its kept names
      ``"edge@label"``.
    """
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold}")
    if max_batch is None:
        max_batch = 1 if jax.default_backend() == "cpu" else 16
    if metric is not None:
        problem = problem.with_metric(_resolve(problem, metric))
    started = time.perf_counter()
    prepass = None
    if node_prepass is not None:
        if nodes is not None:
            raise ValueError("give either nodes or node_prepass, not both")
        node_graph = Graph.from_model(problem.model, problem.graph.qkv_split, level="node")
        prepass = acdc(problem.with_graph(node_graph), threshold=node_prepass, max_batch=max_batch, chunk_size=chunk_size)
        nodes = set(prepass.kept)
    graph = problem.graph
    units = resolve_positions(problem, positions)
    n_units = 1 if units is None else units.n_units
    groups = visit_order(graph)
    if units is not None:
        groups = _with_positions(groups, graph.n_gates, n_units)
    n = graph.n_gates * n_units
    gates = np.ones(n, np.float32)
    scores = np.full(n, np.nan)

    out_of_scope = np.zeros(n, bool)
    if nodes is not None:
        out_of_scope = np.tile(_outside(graph, set(nodes) | {"embed", "logits"}), n_units)
        gates[out_of_scope] = 0.0

    settings = {
        "threshold": float(threshold),
        "metric": problem.metric.name,
        "metric_options": [list(o) for o in problem.metric.options],
        "abs_value": bool(abs_value),
        "ablation": problem.ablation,
        "nodes": sorted(nodes) if nodes is not None else None,
        "max_batch": int(max_batch),
        **({} if units is None else {"positions": units.to_dict()}),
    }
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    state = {"group": 0, "position": 0, "evaluations": 0, "batches": 0}
    starting_gates = gates.copy()  # the cache below follows these, also on resume (same floats as an uninterrupted run)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    fingerprint = _fingerprint(problem, settings) if ckpt_path is not None else ""
    if ckpt_path is not None and ckpt_path.exists():
        saved = json.loads(ckpt_path.read_text())
        if saved.get("version") != CHECKPOINT_VERSION or saved.get("fingerprint") != fingerprint:
            raise CheckpointMismatch(
                f"{ckpt_path} was written by a different ACDC run (task, model, graph or settings differ); "
                "delete it or pass another checkpoint path"
            )
        gates = np.asarray(saved["gates"], np.float32)
        scores = np.array([np.nan if s is None else s for s in saved["scores"]], np.float64)
        state = saved["state"]
    elapsed_before = float(state.get("seconds", 0.0))

    deltas = _starting_deltas(problem, starting_gates if units is None else units.expand(starting_gates.reshape(n_units, -1)))
    if chunk_size is None:
        chunk_size = auto_chunk_size(problem.run, max_batch)
    width = int(max(1, min(max_batch, chunk_size)))
    plan = _plan(graph, groups, out_of_scope, units)
    n_groups = len(groups)
    if "loss" not in state:  # a fresh run: the loss of the starting gates, computed at the first group's layer
        state |= {"loss": float("nan"), "loss_layer": -1}
    last_save = time.perf_counter()
    cur_loss = state["loss"]
    steps_per_call = 1
    # with a checkpoint every few seconds, a call should last a fraction of that; progress wants a few calls too
    target_seconds = min(0.5, checkpoint_every / 4) if ckpt_path is not None else 0.5

    def report(done: int):
        if progress is not None:
            progress({"edges_done": done, "n_edges": n, "kept": int(gates.sum()), "metric": _shown(problem, cur_loss),
                      "forward_equivalents": state.get("work", 0.0)})
        if _guard is not None:  # gates, scores and state agree here: a signal saves and exits
            _guard.stop_if_signalled(save, str(ckpt_path))

    def save(final: bool = False):
        if ckpt_path is None:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(ckpt_path, {
            "version": CHECKPOINT_VERSION,
            "fingerprint": fingerprint,
            "settings": settings,
            "state": {**state, "seconds": elapsed_before + time.perf_counter() - started},
            "gates": gates.tolist(),
            "scores": [None if np.isnan(s) else float(s) for s in scores],
            "finished": final,
        })

    while state["group"] < n_groups:
        # host (numpy) values: the call transfers them at once (a jnp scalar each is a dispatch of its own)
        carry = _Carry(
            group=np.int32(state["group"]), position=np.int32(state["position"]), gates=gates,
            scores=scores.astype(np.float32), loss=np.float32(state["loss"]),
            loss_layer=np.int32(state["loss_layer"]), steps=np.int32(0), evaluations=np.int32(0),
            work=np.float32(0), needed=np.float32(0),
        )
        called = time.perf_counter()
        carry = _search(problem, deltas, plan, carry, np.float32(threshold), np.int32(steps_per_call), bool(abs_value), width)
        carry = jax.device_get(carry)
        seconds = time.perf_counter() - called
        gates = np.array(carry.gates, np.float32)
        scores = np.array(carry.scores, np.float64)  # computed in float32 on the device; NaN: not tested
        state |= {"group": int(carry.group), "position": int(carry.position), "loss": float(carry.loss),
                  "loss_layer": int(carry.loss_layer)}
        state["evaluations"] += int(carry.evaluations)
        state["batches"] += int(carry.steps)
        state["work"] = state.get("work", 0.0) + float(carry.work)
        state["needed"] = state.get("needed", 0.0) + float(carry.needed)
        cur_loss = state["loss"]
        report(_count_done(groups, state["group"], state["position"]))
        if time.perf_counter() - last_save >= checkpoint_every:
            save()
            last_save = time.perf_counter()
        if seconds < target_seconds:  # four times as many steps while a call is short, twice near the target
            steps_per_call *= 4 if seconds < target_seconds / 8 else 2

    save(final=True)
    names = graph.gate_names if units is None else units.unit_names(graph.gate_names)
    kept = tuple(names[i] for i in np.flatnonzero(gates > 0))
    final_gates = jnp.asarray(gates if units is None else units.expand(gates.reshape(n_units, -1)))
    circuit = Circuit.of(
        problem,
        "acdc",
        scores=scores if units is None else scores.reshape(n_units, -1),
        kept=kept,
        threshold=float(threshold),
        metric_value=problem.evaluate(final_gates),
        seconds=elapsed_before + time.perf_counter() - started,
        settings=settings,
        extra={"evaluations": state["evaluations"], "batches": state["batches"],
               "forward_equivalents": round(state.get("work", 0.0), 3), "floor_forward_equivalents": round(state.get("needed", 0.0), 3)},
        positions=units,
    )
    if prepass is not None:
        circuit.extra["node_prepass"] = {"threshold": node_prepass, "kept": list(prepass.kept), "seconds": prepass.seconds}
    return circuit


def _starting_deltas(problem: Problem, gates: np.ndarray):
    """The difference buffer every batch resumes from: the sources of a run under ``gates``.

    During the search the gates below the destination being visited are still the starting ones, so
    this buffer is exact for every source below it. With all gates at 1 that is the clean run; when
    edges start at 0 (``nodes``, ``node_prepass``) it is the
    gated run, so that the ablations below the current layer take effect from the first batch.
    """
    if np.all(gates == 1):
        return problem.run.clean_deltas()
    run = problem.run
    _, deltas = eqx.filter_jit(gated_forward)(
        run.model, run.graph.dense(jnp.asarray(gates)), run.ablation, run.tokens, positions=run.positions, return_deltas=True
    )
    return deltas


def _resolve(problem: Problem, metric: str | Metric) -> Metric:
    """A metric by name; the problem's own options carry over when it is the same metric."""
    if isinstance(metric, Metric):
        return metric
    if metric == problem.metric.name:
        return problem.metric
    return get_metric(metric)


def _shown(problem: Problem, loss: float) -> float:
    """A loss back on the metric's own scale (negated again for higher-is-better metrics)."""
    return -loss if problem.metric.higher_is_better else loss


def _count_done(groups: list[_Group], group_index: int, position: int) -> int:
    return int(sum(len(g.units) for g in groups[:group_index]) + position)


def _outgoing_edges(graph: Graph) -> dict[int, np.ndarray]:
    """Residual edges out of each source, as gate indices (edge-level graphs)."""
    if graph.level == "node":
        return {}
    _, kind, _, srcs = graph._edge_table
    return {s: np.flatnonzero((kind == 0) & (srcs == s)) for s in range(graph.n_sources)}


def _consumer_edges(outgoing: dict[int, np.ndarray], consumer: int | tuple[int, ...]) -> np.ndarray:
    """Residual edges out of a group's consumer: one source, or every head of a key/value group."""
    consumers = consumer if isinstance(consumer, tuple) else (consumer,)
    return np.concatenate([outgoing[c] for c in consumers if c >= 0] + [np.zeros(0, np.int64)])


def _outside(graph: Graph, nodes: set[str]) -> np.ndarray:
    """Edges with an endpoint outside ``nodes`` (destinations count by the node they feed)."""
    if graph.level == "node":
        return np.array([name not in nodes for name in graph.gate_names])
    out = np.zeros(graph.n_gates, bool)
    for i, name in enumerate(graph.edges):
        src, dst = graph.split_edge(name)
        fed = graph.heads_fed(dst) or (dst,)  # a grouped k/v input: in while any head of its group is
        out[i] = src not in nodes or not any(owner in nodes for owner in fed)
    return out
