"""Pictures of circuits: the graph drawn layer by layer with matplotlib (no graphviz binary needed),
the same picture as Graphviz DOT source, and heat maps of scores per head, per MLP and per edge.

**Layout** (``draw_circuit``, ``to_dot``): one row per kind of node, bottom to top: ``embed``, then
for each layer a row of its heads (side by side) and a row for its MLP, and ``logits`` at the top.
Each layer's rows sit on a shaded band labelled ``layer l``. By default only the nodes a kept edge
touches (its source, and the head, MLP or logits it feeds) are drawn and each row is packed and
centred; ``hide_unused=False`` draws every node, heads at fixed columns by head index, untouched
ones greyed. Heads that path patching grouped (``circuit.extra["head_groups"]``, groups of two or
more heads, numbered G1, G2, ... as in its summary) sit next to each other in a row (packed layout)
and each run of neighbouring members shares one labelled, tinted box; the legend lists the members.

**Edges**: a kept edge runs from the top of its source to the input it feeds. A head's box has
three input ports on its bottom edge, q (left), k (middle) and v (right); edges into them are
coloured by input, in the Okabe-Ito colour-blind-safe palette: **q blue ``#0072B2``, k green
``#009E73``, v vermillion ``#D55E00``** (Q, K and V composition told apart by colour as in the IOI
paper's circuit figures; the exact hues are ours). Edges into MLPs and logits, and into a head of a
per-head graph (centre of its bottom edge), are **dark grey ``#4D4D4D``**. Width is linear in
``|score|``: ``min_width + (max_width - min_width) * |score| / max |score|`` over the drawn edges
(points); a negative score is dashed, a missing one (NaN) dotted at ``min_width``. Internal edges
(``a.q->a``) are not lines: a port is filled in its colour when that input is in the circuit
(a kept edge into it, or its kept internal edge), hollow otherwise. Node-level circuits are drawn
as their kept nodes only, without edges.

**Positions as columns**: a position-aware circuit (``circuit.positions``) is drawn as one panel
per position unit that keeps something, left to right in position order, titled ``position
{label}``. An edge at a position unit is the destination reading its source at those token
positions, so each kept edge lies within its column; what attention carries across positions is
not an edge and is not drawn. Every column has the same layout (the nodes any position touches),
a node untouched at that position greyed; widths share one scale over all columns. ``to_dot``
draws position-free circuits only; the heat maps sum (or take the largest) ``|score|`` over
positions too.

**Heat map** (``plot_scores``): a layer x head grid (layer 0 at the bottom, as in the picture),
with the MLP of each layer in an extra column. A node's score (``node_scores``) is the sum
(``reduce="sum"``, default) or the largest (``reduce="max"``) ``|score|`` over every edge that
touches it: the edges out of it and the edges into its inputs, internal edges included, NaN
ignored (NaN when it has no scored edge). For node-level circuits it is ``|node score|``. Nodes
the circuit keeps are ringed. ``per_edge=True`` adds the signed edge scores as a destination x
source matrix (destinations in graph order, internal edges in a last column; ``coolwarm``, symmetric about 0;
white where there is no such edge, dark grey where an edge has no score).

Output is deterministic: SVGs are written with a fixed ``svg.hashsalt`` and no date, and text
stays text (``svg.fonttype="none"``), so labels can be searched in the file.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from pathlib import Path

import numpy as np

from .export import _owner, _parse, edge_endpoints, ungroup_kv
from .graph import Graph
from .methods._circuit import Circuit

EDGE_COLORS = {"q": "#0072B2", "k": "#009E73", "v": "#D55E00", "other": "#4D4D4D"}
GROUP_COLORS = ("#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#999999", "#8DD3C7", "#BEBADA", "#FB8072")
LAYER_SHADES = ("#F3F3F3", "#E8EEF5")
UNUSED_COLOR = "#BDBDBD"
NO_SCORE_COLOR = "#6E6E6E"
NODE_FILLS = {"embed": "#FFF4CC", "logits": "#FFF4CC", "head": "#FFFFFF", "mlp": "#F1EAF7"}
REDUCTIONS = ("sum", "max")
_PORT_OFFSET = {"q": -1 / 3, "k": 0.0, "v": 1 / 3}
_SVG_SALT = "acdc-jax"


# ----------------------------------------------------------------------------------- what is drawn


@dataclasses.dataclass(frozen=True)
class _DrawnEdge:
    name: str
    src: str
    dst: str  # the input: a3.0.q, a3.0 (per-head), mlp2, logits
    score: float

    @property
    def letter(self) -> str:
        kind, _, _, letter = _parse(self.dst)
        return letter if kind == "head_input" else "other"


def _drawn_edges(circuit: Circuit) -> list[_DrawnEdge]:
    if circuit.graph.level != "edge":
        return []
    internal = set(circuit.graph.internal_edge_names)
    out = []
    for name in circuit.kept:
        if name in internal:
            continue
        src, dst = Graph.split_edge(name)
        out.append(_DrawnEdge(name, src, dst, circuit.score(name)))
    return out


def touched_nodes(circuit: Circuit) -> set[str]:
    """Nodes the circuit uses: endpoints of kept edges (an input counts as its head), or the kept
    nodes of a node-level circuit; ``logits`` always."""
    nodes = {"logits"}
    circuit = circuit.merge_positions()
    if circuit.graph.level == "node":
        return nodes | set(circuit.kept)
    for name in circuit.kept:
        src, _, dst = name.partition("->")
        nodes |= {_owner(src), _owner(dst)}
    return nodes


def live_inputs(circuit: Circuit) -> set[str]:
    """Head inputs in the circuit: a kept edge into them, or their kept internal edge."""
    if circuit.graph.level != "edge":
        return set()
    circuit = circuit.merge_positions()
    live = set()
    for name in circuit.kept:
        src, _, dst = name.partition("->")
        if _parse(dst)[0] == "head_input":
            live.add(dst)
        elif _parse(src)[0] == "head_input":  # internal edge a.q->a
            live.add(src)
    return live


def head_groups(circuit: Circuit) -> list[list[str]]:
    """Path patching's groups of similar heads with two or more members (G1, G2, ... in order)."""
    groups = circuit.extra.get("head_groups") or []
    return [list(g) for g in groups if isinstance(g, (list, tuple)) and len(g) > 1]


# ----------------------------------------------------------------------------------- layout


@dataclasses.dataclass
class _Layout:
    positions: dict[str, tuple[float, float]]
    rows: list[list[str]]  # visible nodes per drawn row, bottom to top
    row_y: list[float]
    bands: list[tuple[int, float, float]]  # (layer, y_low, y_high)
    x_range: tuple[float, float]
    group_of: dict[str, int]


def _layout(circuit: Circuit, hide_unused: bool) -> _Layout:
    graph = circuit.graph
    touched = touched_nodes(circuit)
    groups = head_groups(circuit)
    group_of = {h: i for i, g in enumerate(groups) for h in g}
    candidates: list[tuple[int | None, list[str]]] = [(None, ["embed"])]
    for layer in range(graph.n_layers):
        heads = [f"a{layer}.{h}" for h in range(graph.n_heads)]
        if hide_unused:  # packed rows: members of a group side by side
            heads = sorted((h for h in heads if h in touched), key=lambda h: (group_of.get(h, len(groups)), _head_number(h)))
        candidates.append((layer, heads))
        if graph.has_mlp:
            candidates.append((layer, [f"mlp{layer}"]))
    candidates.append((None, ["logits"]))
    positions, rows, row_y, layer_rows = {}, [], [], {}
    for layer, members in candidates:
        visible = [m for m in members if not hide_unused or m in touched]
        if not visible:
            continue
        y = float(len(rows))
        for i, node in enumerate(visible):
            if not hide_unused and _parse(node)[0] == "head":
                x = _head_number(node) - (graph.n_heads - 1) / 2
            else:
                x = i - (len(visible) - 1) / 2
            positions[node] = (float(x), y)
        rows.append(visible)
        row_y.append(y)
        if layer is not None:
            layer_rows.setdefault(layer, []).append(y)
    xs = [p[0] for p in positions.values()]
    x_range = (min(xs) - 1.6, max(xs) + 0.8)
    bands = [(layer, min(ys) - 0.5, max(ys) + 0.5) for layer, ys in sorted(layer_rows.items())]
    return _Layout(positions, rows, row_y, bands, x_range, group_of)


def _head_number(head: str) -> int:
    return _parse(head)[2]


def _edge_widths(edges: list[_DrawnEdge], min_width: float, max_width: float, top: float | None = None) -> list[float]:
    """Widths linear in ``|score|`` up to ``top`` (default: the largest over ``edges``)."""
    if top is None:
        top = max([abs(e.score) for e in edges if not math.isnan(e.score)], default=0.0)
    widths = []
    for e in edges:
        if math.isnan(e.score) or top == 0:
            widths.append(min_width)
        else:
            widths.append(min_width + (max_width - min_width) * abs(e.score) / top)
    return widths


def _line_style(score: float) -> str:
    if math.isnan(score):
        return ":"
    return "--" if score < 0 else "-"


def _default_title(circuit: Circuit) -> str:
    unit = "edges" if circuit.graph.level == "edge" else "nodes"
    at = "" if circuit.positions is None else f" x {circuit.positions.n_units} positions"
    return f"{circuit.method} on {circuit.task}: {circuit.n_kept} of {circuit.graph.n_gates} {unit}{at}"


# ----------------------------------------------------------------------------------- matplotlib


_BOX_W, _BOX_H, _WIDE_W = 0.78, 0.34, 1.1


def _box_width(node: str) -> float:
    return _WIDE_W if node in ("embed", "logits") else _BOX_W


def _port(node_input: str, layout: _Layout) -> tuple[float, float]:
    kind, _, _, letter = _parse(node_input)
    x, y = layout.positions[_owner(node_input)]
    dx = _PORT_OFFSET[letter] * _BOX_W if kind == "head_input" else 0.0
    return x + dx, y - _BOX_H / 2


def _source_anchors(edges: list[_DrawnEdge], layout: _Layout) -> dict[str, tuple[float, float]]:
    """Where each drawn edge leaves its source: spread along the top of the box, ordered by where
    the edges go, so that edges from one node do not all start at one point."""
    by_source: dict[str, list[tuple[tuple[float, float], str]]] = {}
    for edge in edges:
        if edge.src in layout.positions and _owner(edge.dst) in layout.positions:
            by_source.setdefault(edge.src, []).append((_port(edge.dst, layout), edge.name))
    anchors = {}
    for src, targets in by_source.items():
        x, y = layout.positions[src]
        targets.sort()
        n = len(targets)
        gap = min(0.1, 0.8 * _box_width(src) / max(n, 1))
        for i, (_, name) in enumerate(targets):
            anchors[name] = (x + (i - (n - 1) / 2) * gap, y + _BOX_H / 2)
    return anchors


def _per_query_head(circuit: Circuit) -> Circuit:
    """The pictures have one box per query head: a grouped-k/v circuit is drawn ungrouped."""
    return ungroup_kv(circuit) if circuit.graph.kv_grouped else circuit


def draw_circuit(
    circuit: Circuit,
    path: str | os.PathLike,
    *,
    hide_unused: bool = True,
    title: str | None = None,
    min_width: float = 0.6,
    max_width: float = 4.0,
    dpi: int = 150,
) -> Path:
    """Draw the circuit to ``path`` (``.svg``, ``.png`` or ``.pdf``); conventions in the module docstring.

    A position-aware circuit is drawn with its positions as columns, one panel per position unit that
    keeps something (see the module docstring). A circuit on a grouped-k/v graph is drawn per query
    head (``export.ungroup_kv``: a group's key or value input appears at each of its heads)."""
    from .evaluate import _figure

    circuit = _per_query_head(circuit)

    if min_width < 0 or max_width < min_width:
        raise ValueError(f"need 0 <= min_width <= max_width, got {min_width} and {max_width}")
    panels = _position_panels(circuit)
    layout = _layout(circuit.merge_positions(), hide_unused)  # one layout: rows line up across the columns
    all_edges = [e for _, sub in panels for e in _drawn_edges(sub)]
    top = max([abs(e.score) for e in all_edges if not math.isnan(e.score)], default=0.0)
    x0, x1 = layout.x_range
    n_rows = len(layout.rows)
    span = 0.95 * (x1 - x0)
    fig = _figure(figsize=(max(4.5, span * len(panels) + 1.0), max(3.0, 0.62 * n_rows + 1.4 + 0.2 * (len(panels) > 1))))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    handles: dict[str, object] = {}
    for i, (ax, (label, sub)) in enumerate(zip(axes, panels)):
        handles |= _draw_panel(ax, sub, layout, hide_unused, min_width, max_width, top,
                               suffix="" if label is None else f"@{label}", layer_labels=i == 0)
        if label is not None:
            ax.set_title(f"position {label}", fontsize=8)
    if handles:
        axes[-1].legend(handles=list(handles.values()), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7,
                        frameon=False)
    heading = title if title is not None else _default_title(circuit)
    if len(panels) == 1 and panels[0][0] is None:
        axes[0].set_title(heading, fontsize=9)
    else:
        fig.suptitle(heading, fontsize=9)
    return _save(fig, path, dpi)


def _position_panels(circuit: Circuit) -> list[tuple[str | None, Circuit]]:
    """``[(None, circuit)]``, or for a position-aware circuit one position-free circuit per position
    unit that keeps something (all units when none does), in position order."""
    units = circuit.positions
    if units is None:
        return [(None, circuit)]
    mask = circuit.kept_mask()
    panels = []
    for u, label in enumerate(units.labels):
        kept = tuple(name for name, k in zip(circuit.graph.gate_names, mask[u]) if k)
        sub = dataclasses.replace(circuit, scores=circuit.scores[u], kept=kept, positions=None)
        panels.append((label, sub))
    shown = [(label, sub) for label, sub in panels if sub.kept]
    return shown or panels


def _draw_panel(ax, circuit: Circuit, layout: _Layout, hide_unused: bool, min_width: float, max_width: float,
                top: float, *, suffix: str = "", layer_labels: bool = True) -> dict:
    """One layered picture of a position-free circuit on ``ax``; returns its legend entries by label."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle

    touched = touched_nodes(circuit)
    edges = _drawn_edges(circuit)
    widths = _edge_widths(edges, min_width, max_width, top)
    live = live_inputs(circuit)
    groups = head_groups(circuit)
    x0, x1 = layout.x_range
    n_rows = len(layout.rows)
    ax.set_xlim(x0, x1)
    ax.set_ylim(-0.6, n_rows - 0.4)
    ax.axis("off")

    for i, (layer, lo, hi) in enumerate(layout.bands):
        shade = LAYER_SHADES[i % 2]
        ax.add_patch(Rectangle((x0, lo), x1 - x0, hi - lo, facecolor=shade, edgecolor="none", zorder=0,
                               gid=f"layer_{layer}{suffix}"))
        if layer_labels:
            ax.text(x0 + 0.08, (lo + hi) / 2, f"layer {layer}", ha="left", va="center", fontsize=7, color="#555555", zorder=1)
    for row in layout.rows:  # one tinted, labelled box per run of same-group heads in a row
        for g, run in itertools.groupby(row, key=layout.group_of.get):
            if g is None:
                continue
            run = list(run)
            xs = [layout.positions[n][0] for n in run]
            y = layout.positions[run[0]][1]
            color = GROUP_COLORS[g % len(GROUP_COLORS)]
            ax.add_patch(FancyBboxPatch(
                (min(xs) - _BOX_W / 2 - 0.06, y - _BOX_H / 2 - 0.07), max(xs) - min(xs) + _BOX_W + 0.12, _BOX_H + 0.14,
                boxstyle="round,pad=0,rounding_size=0.08", facecolor=color, alpha=0.35, edgecolor=color, lw=1.2,
                zorder=1, gid=f"group_G{g + 1}_{run[0]}{suffix}"))
            ax.text(min(xs) - _BOX_W / 2 - 0.04, y + _BOX_H / 2 + 0.09, f"G{g + 1}", ha="left", va="bottom",
                    fontsize=6.5, color="#333333", fontweight="bold", zorder=4)

    anchors = _source_anchors(edges, layout)
    for edge, width in zip(edges, widths):
        if edge.name not in anchors:
            continue
        start = anchors[edge.name]
        end = _port(edge.dst, layout)
        rows_spanned = end[1] - start[1]
        rad = 0.0 if rows_spanned < 1.5 else (0.18 if end[0] >= start[0] else -0.18)
        ax.add_patch(FancyArrowPatch(
            start, end, arrowstyle="-|>", mutation_scale=6 + width, lw=width, color=EDGE_COLORS[edge.letter],
            linestyle=_line_style(edge.score), connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=1, alpha=0.9,
            zorder=2, gid=f"edge_{edge.src}_to_{edge.dst}{suffix}"))

    for row in layout.rows:
        for node in row:
            x, y = layout.positions[node]
            kind = _parse(node)[0]
            used = node in touched
            w = _box_width(node)
            ax.add_patch(FancyBboxPatch(
                (x - w / 2, y - _BOX_H / 2), w, _BOX_H, boxstyle="round,pad=0,rounding_size=0.06",
                facecolor=NODE_FILLS[kind] if used else "#F5F5F5", edgecolor="#222222" if used else UNUSED_COLOR,
                lw=1.0 if used else 0.6, zorder=3, gid=f"node_{node}{suffix}"))
            ax.text(x, y + (0.03 if kind == "head" and circuit.graph.qkv_split else 0), node, ha="center", va="center",
                    fontsize=7, color="#111111" if used else UNUSED_COLOR, zorder=4)
            if kind == "head" and circuit.graph.qkv_split and circuit.graph.level == "edge":
                for t in ("q", "k", "v"):
                    px, py = _port(f"{node}.{t}", layout)
                    on = f"{node}.{t}" in live
                    ax.plot([px], [py], ls="none", color=EDGE_COLORS[t], marker="o", ms=3.2, mfc=EDGE_COLORS[t] if on else "white",
                            mec=EDGE_COLORS[t] if used else UNUSED_COLOR, mew=0.7, zorder=5, gid=f"port_{node}.{t}{suffix}")

    handles = []
    if circuit.graph.level == "edge":
        if circuit.graph.qkv_split:
            handles += [Line2D([], [], color=EDGE_COLORS[t], lw=2, label=f"into {name}")
                        for t, name in (("q", "query (q)"), ("k", "key (k)"), ("v", "value (v)"))]
        other = "into MLP / logits" if circuit.graph.qkv_split else "into head / MLP / logits"
        handles.append(Line2D([], [], color=EDGE_COLORS["other"], lw=2, label=other))
        if any(e.score < 0 for e in edges):
            handles.append(Line2D([], [], color="#777777", lw=1.2, ls="--", label="negative score"))
        if any(math.isnan(e.score) for e in edges):
            handles.append(Line2D([], [], color="#777777", lw=1.2, ls=":", label="no score"))
    for g, members in enumerate(groups):
        handles.append(Patch(facecolor=GROUP_COLORS[g % len(GROUP_COLORS)], alpha=0.35,
                             label=f"G{g + 1}: {', '.join(members)}"))
    return {h.get_label(): h for h in handles}


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Save with reproducible output: fixed SVG ids, no dates, text kept as text."""
    import matplotlib

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None, "ModDate": None}, "png": {}}
    if fmt not in metadata:
        raise ValueError(f"save pictures as .svg, .png or .pdf, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": _SVG_SALT, "svg.fonttype": "none"}):
        fig.savefig(path, format=fmt, bbox_inches="tight", dpi=dpi, metadata=metadata[fmt])
    return path


# ----------------------------------------------------------------------------------- DOT


def _dot_attrs(**attrs) -> str:
    parts = []
    for key, value in attrs.items():
        if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
            parts.append(f"{key}={value}")  # an HTML-like label
        elif isinstance(value, float):
            parts.append(f"{key}={value:.3f}")
        else:
            text = str(value).replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'{key}="{text}"')
    return ", ".join(parts)


def to_dot(circuit: Circuit, *, hide_unused: bool = True, title: str | None = None,
           min_width: float = 0.6, max_width: float = 4.0) -> str:
    """The picture of ``draw_circuit`` as Graphviz DOT source (``dot -Tsvg``): the same nodes, colours,
    widths and styles; layers are shaded clusters, heads of a layer one rank, and a head of a q/k/v
    graph an HTML-like label with ports ``q``, ``k``, ``v`` that edges enter from below. Grouped k/v
    circuits are drawn per query head, as in ``draw_circuit``."""
    circuit = _per_query_head(circuit)
    graph = circuit.graph
    if circuit.positions is not None:
        raise ValueError("to_dot draws position-free circuits; draw a position-aware one with draw_circuit (positions "
                         "as columns) or merge its positions first (circuit.merge_positions())")
    layout = _layout(circuit, hide_unused)
    touched = touched_nodes(circuit)
    live = live_inputs(circuit)
    edges = _drawn_edges(circuit)
    widths = _edge_widths(edges, min_width, max_width)
    qkv_ports = graph.qkv_split and graph.level == "edge"
    label = title if title is not None else _default_title(circuit)
    lines = [
        "digraph circuit {",
        "  rankdir=BT; newrank=true; splines=true; nodesep=0.25; ranksep=0.35;",
        f"  graph [{_dot_attrs(label=label, labelloc='t', fontname='Helvetica', fontsize=11)}];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, penwidth=1.0];',
        "  edge [arrowsize=0.5];",
    ]

    def node_line(node: str) -> str:
        kind = _parse(node)[0]
        used = node in touched
        color = "#222222" if used else UNUSED_COLOR
        fill = NODE_FILLS[kind] if used else "#F5F5F5"
        font = "#111111" if used else UNUSED_COLOR
        group = layout.group_of.get(node)
        halo = GROUP_COLORS[group % len(GROUP_COLORS)] if group is not None else None
        extra = {"xlabel": f"G{group + 1}"} if group is not None else {}
        if kind == "head" and qkv_ports:
            cells = "".join(
                f'<td port="{t}" bgcolor="{EDGE_COLORS[t] if f"{node}.{t}" in live else "white"}">'
                f'<font color="{"white" if f"{node}.{t}" in live else EDGE_COLORS[t]}" point-size="7">{t}</font></td>'
                for t in ("q", "k", "v"))
            html = (f'<<table border="1" cellborder="1" cellspacing="0" color="{halo or color}" bgcolor="{fill}">'
                    f'<tr><td colspan="3"><font color="{font}">{node}</font></td></tr><tr>{cells}</tr></table>>')
            return f'    "{node}" [{_dot_attrs(shape="plain", style="solid", label=html, **extra)}];'
        attrs = dict(label=node, color=halo or color, fillcolor=fill, fontcolor=font, **extra)
        if halo:
            attrs["penwidth"] = 3.0
        return f'    "{node}" [{_dot_attrs(**attrs)}];'

    layer_of_row = {}
    for layer, lo, hi in layout.bands:
        for y in layout.row_y:
            if lo < y < hi:
                layer_of_row[y] = layer
    shade_index = {layer: i for i, (layer, _, _) in enumerate(layout.bands)}
    current_layer = None
    for row, y in zip(layout.rows, layout.row_y):
        layer = layer_of_row.get(y)
        if layer != current_layer and current_layer is not None:
            lines.append("  }")
        if layer is not None and layer != current_layer:
            shade = LAYER_SHADES[shade_index[layer] % 2]
            lines.append(f"  subgraph cluster_layer{layer} {{")
            lines.append(f"    {_dot_attrs(label=f'layer {layer}', style='filled', color=shade, fillcolor=shade, fontsize=9)};")
        current_layer = layer
        lines.append("    { rank=same;")
        lines.extend("  " + node_line(node) for node in row)
        lines.append("    }")
        if len(row) > 1:  # keep the row in the picture's order
            chain = " -> ".join(f'"{n}"' for n in row)
            lines.append(f"    {chain} [style=invis];")
    if current_layer is not None:
        lines.append("  }")
    for edge, width in zip(edges, widths):
        if edge.src not in layout.positions or _owner(edge.dst) not in layout.positions:
            continue
        kind, _, _, letter = _parse(edge.dst)
        head = f'"{_owner(edge.dst)}":{letter}:s' if kind == "head_input" and qkv_ports else f'"{_owner(edge.dst)}"'
        style = {"-": "solid", "--": "dashed", ":": "dotted"}[_line_style(edge.score)]
        score = "nan" if math.isnan(edge.score) else f"{edge.score:.4g}"
        attrs = _dot_attrs(color=EDGE_COLORS[edge.letter], penwidth=float(width), style=style,
                           tooltip=f"{edge.name} score {score}")
        lines.append(f'  "{edge.src}" -> {head} [{attrs}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- heat maps


def node_scores(circuit: Circuit, reduce: str = "sum") -> np.ndarray:
    """One score per source node (``graph.sources``): ``reduce`` (``"sum"`` or ``"max"``) of ``|score|``
    over the edges out of the node and into its inputs (NaN ignored; NaN if none is scored).
    Node-level circuits: ``|node score|``."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    graph = circuit.graph
    magnitudes = np.abs(circuit.scores)
    if circuit.positions is not None:  # a unit's |score| over its positions, combined as over edges
        combined = np.nansum(magnitudes, axis=0) if reduce == "sum" else np.nanmax(np.nan_to_num(magnitudes, nan=-np.inf), axis=0)
        magnitudes = np.where(np.isnan(magnitudes).all(0), np.nan, combined)
    if graph.level == "node":
        return magnitudes
    index = {n: i for i, n in enumerate(graph.sources)}
    values: list[list[float]] = [[] for _ in graph.sources]
    for (src, dst), score in zip(edge_endpoints(graph), magnitudes.tolist()):
        if math.isnan(score):
            continue
        for node in {_owner(src), _owner(dst)} - {"logits"}:
            values[index[node]].append(abs(score))
    combine = np.sum if reduce == "sum" else np.max
    return np.array([float(combine(v)) if v else math.nan for v in values])


def plot_scores(
    circuit: Circuit,
    path: str | os.PathLike,
    *,
    reduce: str = "sum",
    per_edge: bool = False,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """Heat map of node scores on a layer x head grid, MLPs in an extra column; with ``per_edge``,
    also the signed edge scores by destination (rows) and source (columns). Grouped k/v circuits are
    shown per query head (``export.ungroup_kv``)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D

    from .evaluate import _figure

    circuit = _per_query_head(circuit)

    graph = circuit.graph
    if per_edge and graph.level != "edge":
        raise ValueError("per-edge scores need an edge-level circuit; this one is node-level")
    if per_edge and circuit.positions is not None:
        raise ValueError("per-edge scores of a position-aware circuit: merge its positions first (circuit.merge_positions())")
    scores = node_scores(circuit, reduce)
    by_name = dict(zip(graph.sources, scores))
    L, H = graph.n_layers, graph.n_heads
    n_cols = H + (2 if graph.has_mlp else 0)  # heads, a spacer, the MLP
    grid = np.full((L, n_cols), np.nan)
    for layer in range(L):
        for h in range(H):
            grid[layer, h] = by_name[f"a{layer}.{h}"]
        if graph.has_mlp:
            grid[layer, H + 1] = by_name[f"mlp{layer}"]
    width = 1.2 + 0.42 * n_cols
    height = 1.6 + 0.36 * L
    if per_edge:
        fig = _figure(figsize=(width + max(6.0, 0.05 * graph.n_sources + 3), max(height, 6.0)))
        ax, ax_edges = fig.subplots(1, 2, gridspec_kw={"width_ratios": [width, max(6.0, 0.05 * graph.n_sources + 3)]})
    else:
        fig = _figure(figsize=(width + 1.4, height))
        ax = fig.add_subplot()
    fig.set_layout_engine("constrained")
    cmap = _colormap("viridis").with_extremes(bad="#E0E0E0")
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap=cmap, aspect="auto",
                      vmin=0.0, vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    if graph.has_mlp:  # the spacer column is blank, not "no score"
        ax.axvspan(H - 0.5, H + 0.5, color="white", zorder=2)
    kept = touched_nodes(circuit)
    ring_x, ring_y = [], []
    for layer in range(L):
        for h in range(H):
            if f"a{layer}.{h}" in kept:
                ring_x.append(h), ring_y.append(layer)
        if graph.has_mlp and f"mlp{layer}" in kept:
            ring_x.append(H + 1), ring_y.append(layer)
    ax.scatter(ring_x, ring_y, s=28, facecolors="none", edgecolors="white", linewidths=1.4, zorder=3)
    ax.scatter(ring_x, ring_y, s=28, facecolors="none", edgecolors="black", linewidths=0.6, zorder=4)
    head_ticks = list(range(0, H, max(1, H // 12)))
    mlp_tick = [H + 1] if graph.has_mlp else []
    ax.set_xticks(head_ticks + mlp_tick, [str(h) for h in head_ticks] + ["MLP"] * len(mlp_tick), fontsize=7)
    ax.set_yticks(range(0, L, max(1, L // 24)))
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    what = "|node score|" if graph.level == "node" else f"{reduce} of |edge score| over its edges"
    bar = fig.colorbar(image, ax=ax, fraction=0.06, pad=0.03)
    bar.set_label(what, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    embed = by_name["embed"]
    ax.set_title((title if title is not None else _default_title(circuit))
                 + f"\nembed: {'n/a' if math.isnan(embed) else f'{embed:.3g}'}", fontsize=8)
    ax.legend(handles=[Line2D([], [], ls="", marker="o", mfc="none", mec="black", label="in the circuit")],
              loc="upper left", bbox_to_anchor=(0.0, -0.12), fontsize=6, frameon=False)
    if per_edge:
        _plot_edge_matrix(fig, ax_edges, circuit, ListedColormap)
    return _save(fig, path, dpi)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].copy()


def _plot_edge_matrix(fig, ax, circuit: Circuit, listed_colormap) -> None:
    """Signed edge scores: destinations (rows, graph order) x sources (columns); white where there is
    no edge, dark grey where an edge has no score; internal edges in a last column."""
    graph = circuit.graph
    dests, sources = graph.destinations, list(graph.sources)
    internal = bool(graph.internal_edges)
    columns = sources + (["(internal)"] if internal else [])
    d_index = {d: i for i, d in enumerate(dests)}
    s_index = {s: i for i, s in enumerate(columns)}
    values = np.full((len(dests), len(columns)), np.nan)
    exists = np.zeros_like(values, dtype=bool)
    internal_names = set(graph.internal_edge_names)
    for name, (src, dst), score in zip(graph.edges, edge_endpoints(graph), circuit.scores.tolist()):
        r, c = (d_index[src], s_index["(internal)"]) if name in internal_names else (d_index[dst], s_index[src])
        values[r, c] = score
        exists[r, c] = True
    ax.imshow(np.where(exists, 1.0, np.nan), cmap=listed_colormap([NO_SCORE_COLOR]), aspect="auto", interpolation="nearest")
    finite = np.abs(values[np.isfinite(values)])
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    # coolwarm is light grey at 0, so a zero score stays apart from the white of "no such edge"
    image = ax.imshow(np.ma.masked_invalid(values), cmap=_colormap("coolwarm"), vmin=-top, vmax=top, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(*_tick_labels(columns, 50))
    ax.set_yticks(*_tick_labels(list(dests), 60))
    ax.tick_params(axis="x", labelrotation=90, labelsize=5)
    ax.tick_params(axis="y", labelsize=5)
    ax.set_xlabel("source", fontsize=8)
    ax.set_ylabel("destination input", fontsize=8)
    ax.set_title("edge scores (white: no such edge; dark grey: no score)", fontsize=8)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("edge score", fontsize=7)
    bar.ax.tick_params(labelsize=6)


def _tick_labels(names: list[str], limit: int) -> tuple[list[int], list[str]]:
    """All names when there are few; else the first name of each layer."""
    if len(names) <= limit:
        return list(range(len(names))), names
    ticks, labels, seen = [], [], set()
    for i, name in enumerate(names):
        key = name.split(".")[0].replace("mlp", "a") if name not in ("embed", "logits", "(internal)") else name
        if key not in seen:
            seen.add(key)
            ticks.append(i)
            labels.append(name)
    return ticks, labels


__all__ = [
    "EDGE_COLORS",
    "GROUP_COLORS",
    "REDUCTIONS",
    "draw_circuit",
    "head_groups",
    "live_inputs",
    "node_scores",
    "plot_scores",
    "to_dot",
    "touched_nodes",
]
