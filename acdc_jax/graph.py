"""The computational graph: node and edge names, their order, and the gate layout.

Names (DESIGN.md): sources ``embed``, ``a{l}.{h}`` (head h's output ``z @ W_O[h]``, no ``b_O``)
and ``mlp{l}``; destination inputs ``a{l}.{h}.q|k|v`` (or ``a{l}.{h}`` with one input per head),
``mlp{l}`` and ``logits``. With grouped-query attention the k and v inputs are per query head by
default (the key/value weights shared within a group, as MIB evaluates such models, ungrouped);
``kv_heads=G`` (``Graph.from_model(model, kv_groups=True)``) gates them once per key/value head
instead: inputs ``a{l}.g{j}.k`` and ``a{l}.g{j}.v`` read by query heads ``j*H/G .. (j+1)*H/G - 1``,
while q stays ``a{l}.{h}.q`` per query head (``export.ungroup_kv`` maps such a circuit to MIB's
per-head edges). An edge ``src->dst`` exists when src is computed before dst reads the residual
stream. With ``internal_edges=True`` the ACDC graph's ``a{l}.{h}.q|k|v->a{l}.{h}`` edges
are listed too; gating one scales all of that input's incoming gates (0 = the whole input ablated).

Edge order (part of the API): destinations in topological order (layer by layer: for each head
its q, k, v inputs, then, if listed, its internal edges; then the layer's MLP; ``logits`` last),
and within a destination the sources in topological order (``embed``, then layer by layer, heads
before the MLP). ACDC visits this list backwards. With grouped k/v inputs a layer lists every
head's q input (``a{l}.0.q .. a{l}.{H-1}.q``), then each group's k and v inputs (``a{l}.g0.k``,
``a{l}.g0.v``, ``a{l}.g1.k``, ...), then its MLP: all of them read the same earlier sources, so
this order is as topological as the per-head one.

Gates are a float vector over ``graph.gate_names``: the edges at ``level="edge"``, the sources
(``embed``, heads, MLPs) at ``level="node"`` (a node gate scales every edge out of that node).
1 = clean, 0 = ablated; all gates 0 is the fully ablated run at every granularity.
A gate vector may carry a leading position axis ``[pos, n_gates]`` (gates per destination token
position, for path patching); batches of gate vectors go through ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Iterable
from typing import Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .models import DenseGates, Transformer, TransformerConfig

Level = Literal["edge", "node"]
_QKV = ("q", "k", "v")
_GROUP_INPUT = re.compile(r"^a(\d+)\.g(\d+)\.([kv])$")


class GraphError(KeyError):
    """An unknown node or edge name, or a gate array of the wrong shape."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Graph:
    """A static, hashable description of a model's computational graph at one granularity."""

    n_layers: int
    n_heads: int
    has_mlp: bool
    qkv_split: bool = True
    level: Level = "edge"
    internal_edges: bool = False
    parallel: bool = False  # attention and MLP read the same residual (GPT-NeoX): no a{l}.h -> mlp{l}
    kv_heads: int | None = None  # None: k/v inputs per query head; G < n_heads: per key/value head (a{l}.g{j}.k|v)

    def __post_init__(self):
        if self.level not in ("edge", "node"):
            raise ValueError(f"level must be 'edge' or 'node', got {self.level!r}")
        if self.internal_edges and not self.qkv_split:
            raise ValueError("internal_edges (a.q|k|v->a) exist only in the q/k/v-split graph; set qkv_split=True")
        if self.kv_heads is not None:
            G = self.kv_heads
            if not isinstance(G, int) or isinstance(G, bool) or not 1 <= G < self.n_heads or self.n_heads % G:
                raise ValueError(
                    f"kv_heads must be a divisor of n_heads={self.n_heads} smaller than it (grouped-query attention), "
                    f"got {G!r}; leave it None for k/v inputs per query head")
            if not self.qkv_split:
                raise ValueError("grouped k/v inputs (kv_heads) exist only in the q/k/v-split graph; set qkv_split=True")
            if self.internal_edges:
                raise ValueError(
                    "internal edges a.q|k|v->a are ACDC's per-head hook edges, and a grouped k/v input feeds several "
                    "heads: use internal_edges=False with kv_heads (or the per-head k/v graph, kv_heads=None)")
            if self.level == "node":
                raise ValueError(
                    "node gates (one per source) do not depend on how k/v inputs are grouped: build the node-level "
                    "graph without kv_heads (Graph.from_model(model, level='node'))")

    @classmethod
    def from_model(
        cls,
        model: Transformer | TransformerConfig,
        qkv_split: bool = True,
        *,
        level: Level = "edge",
        internal_edges: bool = False,
        kv_groups: bool = False,
    ) -> "Graph":
        """The model's graph; ``kv_groups=True`` gates k and v once per key/value head (models with
        grouped-query attention only: elsewhere the per-head graph is already that)."""
        cfg = model.config if isinstance(model, Transformer) else model
        if kv_groups and cfg.kv_heads == cfg.n_heads:
            raise ValueError(
                f"kv_groups=True needs grouped-query attention (n_kv_heads < n_heads); this model has {cfg.n_heads} "
                "key/value heads for its queries, so its per-head k/v inputs are already one per key/value head: "
                "drop kv_groups")
        kv_heads = cfg.kv_heads if kv_groups else None
        return cls(cfg.n_layers, cfg.n_heads, cfg.has_mlp, qkv_split, level, internal_edges, cfg.parallel, kv_heads)

    # ---------------------------------------------------------------- nodes

    @property
    def n_in(self) -> int:
        """Attention destination inputs per layer (rows of one layer's dense gates)."""
        if self.kv_heads is not None:
            return self.n_heads + 2 * self.kv_heads
        return self.n_heads * (3 if self.qkv_split else 1)

    @property
    def kv_grouped(self) -> bool:
        """Whether k and v inputs are per key/value head (``a{l}.g{j}.k|v``)."""
        return self.kv_heads is not None

    def attention_inputs(self, layer: int) -> tuple[str, ...]:
        """A layer's attention destination inputs in edge (and dense row) order."""
        if self.kv_grouped:
            return tuple(f"a{layer}.{h}.q" for h in range(self.n_heads)) + tuple(
                f"a{layer}.g{j}.{t}" for j in range(self.kv_heads) for t in ("k", "v"))
        if self.qkv_split:
            return tuple(f"a{layer}.{h}.{t}" for h in range(self.n_heads) for t in _QKV)
        return tuple(f"a{layer}.{h}" for h in range(self.n_heads))

    def input_of(self, layer: int, head: int, letter: str) -> str:
        """The destination input head ``a{layer}.{head}`` reads its q, k or v from."""
        if letter not in _QKV:
            raise GraphError(f"letter must be q, k or v, got {letter!r}")
        if not self.qkv_split:
            return f"a{layer}.{head}"
        if self.kv_grouped and letter != "q":
            return f"a{layer}.g{head // (self.n_heads // self.kv_heads)}.{letter}"
        return f"a{layer}.{head}.{letter}"

    def heads_fed(self, destination: str) -> tuple[str, ...]:
        """The heads a destination input feeds: its own head, a group's heads for ``a{l}.g{j}.k|v``,
        none for ``mlp{l}`` and ``logits``."""
        match = _GROUP_INPUT.match(destination)
        if match:
            layer, j, group = int(match[1]), int(match[2]), self.n_heads // (self.kv_heads or self.n_heads)
            return tuple(f"a{layer}.{h}" for h in range(j * group, (j + 1) * group))
        if destination == "logits" or destination.startswith("mlp"):
            return ()
        return (".".join(destination.split(".")[:2]),)

    @functools.cached_property
    def sources(self) -> tuple[str, ...]:
        names = ["embed"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.{h}" for h in range(self.n_heads)]
            if self.has_mlp:
                names.append(f"mlp{layer}")
        return tuple(names)

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    def first_source_of_layer(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + int(self.has_mlp))

    @functools.cached_property
    def destinations(self) -> tuple[str, ...]:
        """Destination inputs in topological order."""
        names = []
        for layer in range(self.n_layers):
            names += self.attention_inputs(layer)
            if self.has_mlp:
                names.append(f"mlp{layer}")
        names.append("logits")
        return tuple(names)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The units of node-level gates: every source (``embed``, heads, MLPs)."""
        return self.sources

    @functools.cached_property
    def _dest_info(self) -> dict[str, tuple[int, int]]:
        """destination -> (row in the dense gate layout, number of sources it can read)."""
        info = {}
        L, H = self.n_layers, self.n_heads
        for layer in range(L):
            available = self.first_source_of_layer(layer)
            for i, name in enumerate(self.attention_inputs(layer)):
                info[name] = (layer * self.n_in + i, available)
            if self.has_mlp:
                info[f"mlp{layer}"] = (L * self.n_in + layer, available if self.parallel else available + H)
        info["logits"] = (self._logits_row, self.n_sources)
        return info

    @property
    def _n_rows(self) -> int:
        return self.n_layers * (self.n_in + int(self.has_mlp)) + 1

    @property
    def _logits_row(self) -> int:
        return self._n_rows - 1

    def sources_of(self, destination: str) -> tuple[str, ...]:
        """The sources a destination input can read, in topological order."""
        _, available = self._dest_info[self._check_name(destination, self.destinations, "destination")]
        return self.sources[:available]

    # ---------------------------------------------------------------- edges

    @functools.cached_property
    def _edge_table(self) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
        """(names, kind: 0 residual / 1 internal, dense row, source index) for every edge."""
        names, kind, rows, srcs = [], [], [], []

        def add_residual(dst):
            row, available = self._dest_info[dst]
            for s in range(available):
                names.append(f"{self.sources[s]}->{dst}")
                kind.append(0), rows.append(row), srcs.append(s)

        for layer in range(self.n_layers):
            if self.kv_grouped:  # q per head, then k/v per group; never internal edges
                for dst in self.attention_inputs(layer):
                    add_residual(dst)
            for h in range(0 if self.kv_grouped else self.n_heads):
                head = f"a{layer}.{h}"
                inputs = [f"{head}.{t}" for t in _QKV] if self.qkv_split else [head]
                for dst in inputs:
                    add_residual(dst)
                if self.internal_edges:
                    for dst in inputs:
                        names.append(f"{dst}->{head}")
                        kind.append(1), rows.append(self._dest_info[dst][0]), srcs.append(-1)
            if self.has_mlp:
                add_residual(f"mlp{layer}")
        add_residual("logits")
        return tuple(names), np.array(kind, np.int8), np.array(rows, np.int32), np.array(srcs, np.int32)

    @property
    def edges(self) -> tuple[str, ...]:
        """Every edge name ``"src->dst"`` in the graph's order."""
        return self._edge_table[0]

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @functools.cached_property
    def internal_edge_names(self) -> tuple[str, ...]:
        names, kind, _, _ = self._edge_table
        return tuple(n for n, k in zip(names, kind) if k == 1)

    @functools.cached_property
    def _edge_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edges)}

    def edge_index(self, name: str) -> int:
        return self._edge_index[self._check_name(name, self._edge_index, "edge")]

    def edge_name(self, index: int | np.integer) -> str:
        return self.edges[index]

    @staticmethod
    def split_edge(name: str) -> tuple[str, str]:
        src, sep, dst = name.partition("->")
        if not sep:
            raise GraphError(f"{name!r} is not an edge name; edges are written 'src->dst'")
        return src, dst

    def edge_layers(self) -> np.ndarray:
        """Layer of each edge's destination (``n_layers`` for logits)."""
        return np.array([_layer_of(self.split_edge(e)[1], self.n_layers) for e in self.edges], np.int32)

    # ---------------------------------------------------------------- gates

    @property
    def gate_names(self) -> tuple[str, ...]:
        """What each entry of a gate vector controls: edges (edge level) or nodes (node level)."""
        return self.edges if self.level == "edge" else self.nodes

    @property
    def n_gates(self) -> int:
        return len(self.gate_names)

    @functools.cached_property
    def _gate_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.gate_names)}

    def index(self, name: str) -> int:
        """Position of an edge (edge level) or node (node level) in a gate vector."""
        return self._gate_index[self._check_name(name, self._gate_index, "edge" if self.level == "edge" else "node")]

    def indices(self, names: Iterable[str]) -> np.ndarray:
        return np.array([self.index(n) for n in names], dtype=np.int32)

    def name(self, index: int | np.integer) -> str:
        return self.gate_names[index]

    def gates(self, value: float = 1.0, dtype=jnp.float32) -> Float[Array, " n_gates"]:
        return jnp.full((self.n_gates,), value, dtype)

    def gates_from_names(self, names: Iterable[str], dtype=jnp.float32) -> Float[Array, " n_gates"]:
        """1 on the named edges (or nodes), 0 elsewhere."""
        g = np.zeros(self.n_gates, np.float32)
        g[self.indices(list(names))] = 1.0
        return jnp.asarray(g, dtype)

    def _check_name(self, name, known, what: str) -> str:
        if name in known:
            return name
        close = difflib.get_close_matches(str(name), list(known), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise GraphError(f"unknown {what} {name!r} in this {self.describe()}{hint}")

    def describe(self) -> str:
        kind = "q/k/v-split" if self.qkv_split else "per-head"
        kv = f", k/v per {self.kv_heads} key/value heads" if self.kv_grouped else ""
        return f"{kind} {self.level}-level graph ({self.n_layers} layers, {self.n_heads} heads{kv}, {self.n_gates} gates)"

    # ---------------------------------------------------------------- dense layout

    @functools.cached_property
    def edge_mask(self) -> np.ndarray:
        """Static ``[n_rows, n_sources]`` mask of which (destination row, source) pairs are edges."""
        mask = np.zeros((self._n_rows, self.n_sources), np.float32)
        _, kind, rows, srcs = self._edge_table
        mask[rows[kind == 0], srcs[kind == 0]] = 1.0
        return mask

    def dense(self, gates: Float[Array | np.ndarray, "*gate_pos n_gates"]) -> DenseGates:
        """Scatter a gate vector (optionally ``[pos, n_gates]``) into the layout the forward reads."""
        gates = jnp.asarray(gates)
        if not jnp.issubdtype(gates.dtype, jnp.floating):
            gates = gates.astype(jnp.float32)
        if gates.ndim not in (1, 2) or gates.shape[-1] != self.n_gates:
            raise GraphError(
                f"gates must have shape [{self.n_gates}] or [pos, {self.n_gates}] for this {self.describe()}, "
                f"got {gates.shape}; batch gate configurations with jax.vmap"
            )
        lead = gates.shape[:-1]
        if self.level == "node":
            mask = jnp.asarray(self.edge_mask, gates.dtype).reshape((1,) * len(lead) + self.edge_mask.shape)
            flat = mask * gates[..., None, :]
        else:
            _, kind, rows, srcs = self._edge_table
            residual = np.flatnonzero(kind == 0)
            flat = jnp.zeros(lead + (self._n_rows, self.n_sources), gates.dtype)
            flat = flat.at[..., rows[residual], srcs[residual]].set(gates[..., residual])
            internal = np.flatnonzero(kind == 1)
            if internal.size:
                scale = jnp.ones(lead + (self._n_rows,), gates.dtype).at[..., rows[internal]].set(gates[..., internal])
                flat = flat * scale[..., None]
        L, n_in = self.n_layers, self.n_in
        attn = flat[..., : L * n_in, :].reshape(lead + (L, n_in, self.n_sources))
        mlp = flat[..., L * n_in : L * n_in + L, :] if self.has_mlp else None
        logits = flat[..., self._logits_row, :]
        if lead:  # per-position gates: the layer axis goes first so the forward can index it
            attn = jnp.moveaxis(attn, 1, 0)
            mlp = None if mlp is None else jnp.moveaxis(mlp, 1, 0)
        return DenseGates(attn=attn, mlp=mlp, logits=logits)


def _layer_of(node: str, n_layers: int) -> int:
    if node in ("logits",):
        return n_layers
    if node == "embed":
        return -1
    match = re.match(r"^(?:a|mlp)(\d+)", node)
    if not match:
        raise GraphError(f"cannot read a layer from node name {node!r}")
    return int(match.group(1))
