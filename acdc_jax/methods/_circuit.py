"""The one result type of every discovery method, and its JSON form."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..graph import Graph
from ._positions import PositionUnits, split_unit_name

FORMAT_VERSION = 2  # 2: position-aware circuits ("positions"); version-1 files (no positions) still load


@dataclasses.dataclass
class Circuit:
    """Scores for every gate unit of a graph, the units kept, and how they were found.

    ``scores[i]`` belongs to ``graph.gate_names[i]`` (edges, or nodes for node-level methods).
    Each method documents what its score means; by convention a larger score means the unit
    matters more to the clean behaviour. Units a method never tested carry NaN.
    ``metric_value`` is the task metric of the pruned model: kept units at 1, everything else
    ablated (``ablation``).

    **Position-aware circuits** (``positions`` set, see ``methods._positions``): a unit is a gate unit
    at one position unit, and ``scores`` is ``[n_positions, n_gates]``: ``scores[u, i]`` belongs to
    ``graph.gate_names[i]`` at the token positions ``positions.spans[u]`` (label
    ``positions.labels[u]``). Unit names are ``"{edge}@{label}"`` (``"a0.1->logits@3"``, or
    ``"a1.0->logits@END"``), unit-major (``names[k]`` is ``scores.reshape(-1)[k]``), and ``kept``
    holds such names; ``gates()`` is then ``[n_pos, n_gates]``, the graph's per-position gates.
    ``merge_positions()`` is the position-free circuit (scores summed over positions, an edge kept
    at any position).
    """

    method: str
    task: str
    graph: Graph
    scores: np.ndarray
    kept: tuple[str, ...]
    metric: str
    ablation: str
    threshold: float | None = None
    metric_value: float | None = None
    seconds: float = 0.0
    settings: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    positions: PositionUnits | None = None

    def __post_init__(self):
        self.scores = np.asarray(self.scores, np.float64)
        shape = (self.graph.n_gates,) if self.positions is None else (self.positions.n_units, self.graph.n_gates)
        if self.scores.shape != shape:
            per = "" if self.positions is None else f" at each of {self.positions.n_units} position units"
            raise ValueError(f"a circuit needs one score per gate unit ({self.graph.n_gates}){per}: shape {shape}, "
                             f"got {self.scores.shape}")
        self.kept = tuple(self.kept)
        self.indices(self.kept)  # unknown names fail here, with close matches

    @classmethod
    def of(cls, problem, method: str, scores, kept, **fields) -> "Circuit":
        """A circuit of ``problem`` (a ``Problem``): its task, graph, metric and ablation filled in."""
        return cls(method=method, task=problem.task_name, graph=problem.graph, scores=scores, kept=kept,
                   metric=problem.metric.name, ablation=problem.ablation, **fields)

    @property
    def names(self) -> tuple[str, ...]:
        """Every unit's name, in the order of ``scores.reshape(-1)``."""
        if self.positions is None:
            return self.graph.gate_names
        return self.positions.unit_names(self.graph.gate_names)

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    def index(self, name: str) -> int:
        """Position of a unit in ``scores.reshape(-1)``."""
        if self.positions is None:
            return self.graph.index(name)
        gate, label = split_unit_name(name)
        if label not in self.positions.labels:
            raise KeyError(f"unknown position label {label!r} in {name!r}; this circuit's are {list(self.positions.labels)}")
        return self.positions.labels.index(label) * self.graph.n_gates + self.graph.index(gate)

    def indices(self, names) -> np.ndarray:
        return np.array([self.index(n) for n in names], dtype=np.int64)

    def score(self, name: str) -> float:
        return float(self.scores.reshape(-1)[self.index(name)])

    def kept_mask(self) -> np.ndarray:
        """Where the kept units are, in the shape of ``scores``."""
        mask = np.zeros(self.scores.size, bool)
        mask[self.indices(self.kept)] = True
        return mask.reshape(self.scores.shape)

    def gates(self, dtype=jnp.float32):
        """1 on the kept units, 0 elsewhere; ``[n_pos, n_gates]`` (per token position) when position-aware."""
        mask = self.kept_mask()
        if self.positions is not None:
            mask = self.positions.expand(mask)
        return jnp.asarray(mask, dtype)

    def top(self, n: int) -> list[tuple[str, float]]:
        """The ``n`` highest-scoring units (NaN scores last)."""
        flat = self.scores.reshape(-1)
        order = np.argsort(-np.nan_to_num(flat, nan=-np.inf), kind="stable")[:n]
        names = self.names
        return [(names[i], float(flat[i])) for i in order]

    def merge_positions(self) -> "Circuit":
        """The position-free circuit: each gate unit's score summed over its position units (for the
        gradient methods exactly the position-free score, up to rounding; NaN where no position was
        scored), and a gate unit kept when it is kept at any position. ``metric_value`` is dropped (the
        merged set is another circuit); the position units stay in ``extra["merged_positions"]``."""
        if self.positions is None:
            return self
        scores = np.where(np.isnan(self.scores).all(0), np.nan, np.nansum(self.scores, axis=0))
        kept_any = self.kept_mask().any(0)
        extra = dict(self.extra)
        signed = np.asarray(extra.get("signed", []), np.float64)
        if signed.shape == self.scores.shape:
            extra["signed"] = signed.sum(0)
        extra["merged_positions"] = self.positions.to_dict()
        return dataclasses.replace(
            self, scores=scores, kept=tuple(n for n, k in zip(self.graph.gate_names, kept_any) if k), positions=None,
            metric_value=None, extra=extra,
        )

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        key = "edges" if self.graph.level == "edge" else "nodes"
        return {
            "format": "acdc-jax circuit",
            "version": FORMAT_VERSION,
            "method": self.method,
            "task": self.task,
            "metric": self.metric,
            "ablation": self.ablation,
            "threshold": self.threshold,
            "graph": dataclasses.asdict(self.graph),
            "level": self.graph.level,
            f"n_{key}_total": self.graph.n_gates,
            **({} if self.positions is None else {"positions": self.positions.to_dict()}),
            key: {name: _json_float(s) for name, s in zip(self.names, self.scores.reshape(-1))},
            "circuit": list(self.kept),
            "n_kept": self.n_kept,
            "metric_value": self.metric_value,
            "seconds": self.seconds,
            "settings": _jsonable(self.settings),
            **_jsonable(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Circuit":
        if data.get("format") != "acdc-jax circuit":
            raise ValueError("not an acdc-jax circuit JSON (missing 'format': 'acdc-jax circuit')")
        if data.get("version", 1) > FORMAT_VERSION:
            raise ValueError(f"the circuit JSON has format version {data['version']}; this acdc-jax reads up to "
                             f"{FORMAT_VERSION}: upgrade acdc-jax")
        graph = Graph(**data["graph"])
        key = "edges" if graph.level == "edge" else "nodes"
        table = data[key]
        positions = PositionUnits.from_dict(data["positions"]) if data.get("positions") else None
        names = graph.gate_names if positions is None else positions.unit_names(graph.gate_names)
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(f"the circuit JSON lacks scores for {len(missing)} units, e.g. {missing[:3]}")
        scores = np.array([np.nan if table[n] is None else table[n] for n in names], np.float64)
        if positions is not None:
            scores = scores.reshape(positions.n_units, graph.n_gates)
        known = {"format", "version", "method", "task", "metric", "ablation", "threshold", "graph", "level",
                 f"n_{key}_total", key, "circuit", "n_kept", "metric_value", "seconds", "settings", "positions"}
        return cls(
            method=data["method"],
            task=data["task"],
            graph=graph,
            scores=scores,
            kept=tuple(data["circuit"]),
            metric=data["metric"],
            ablation=data["ablation"],
            threshold=data.get("threshold"),
            metric_value=data.get("metric_value"),
            seconds=data.get("seconds", 0.0),
            settings=data.get("settings", {}),
            extra={k: v for k, v in data.items() if k not in known},
            positions=positions,
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self, n: int = 10) -> str:
        unit = "edges" if self.graph.level == "edge" else "nodes"
        of = (f"{self.graph.n_gates} {unit}" if self.positions is None
              else f"{self.scores.size} units ({self.graph.n_gates} {unit} x {self.positions.n_units} position units)")
        lines = [
            f"{self.method} on {self.task}: kept {self.n_kept} of {of}"
            + (f" at threshold {self.threshold:g}" if self.threshold is not None else ""),
            f"  {self.metric} of the circuit ({self.ablation} ablation): "
            + ("n/a" if self.metric_value is None else f"{self.metric_value:.6g}"),
            f"  {self.seconds:.2f} s",
        ]
        shown = sorted(self.kept, key=lambda name: -np.nan_to_num(self.score(name), nan=-np.inf))[:n]
        for name in shown:
            lines.append(f"  {name:<28} {self.score(name): .4g}")
        if self.n_kept > n:
            lines.append(f"  ... and {self.n_kept - n} more")
        return "\n".join(lines)


def _json_float(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, jnp.ndarray)):
        return _jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.floating, float)):
        return _json_float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)
