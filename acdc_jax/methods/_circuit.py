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

FORMAT_VERSION = 1


@dataclasses.dataclass
class Circuit:
    """Scores for every gate unit of a graph, the units kept, and how they were found.

    ``scores[i]`` belongs to ``graph.gate_names[i]`` (edges, or nodes for node-level methods).
    Each method documents what its score means; by convention a larger score means the unit
    matters more to the clean behaviour. Units a method never tested carry NaN.
    ``metric_value`` is the task metric of the pruned model: kept units at 1, everything else
    ablated (``ablation``).
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

    def __post_init__(self):
        self.scores = np.asarray(self.scores, np.float64)
        if self.scores.shape != (self.graph.n_gates,):
            raise ValueError(f"a circuit needs one score per gate unit ({self.graph.n_gates}), got {self.scores.shape}")
        self.kept = tuple(self.kept)
        self.graph.indices(self.kept)  # unknown names fail here, with close matches

    @classmethod
    def of(cls, problem, method: str, scores, kept, **fields) -> "Circuit":
        """A circuit of ``problem`` (a ``Problem``): its task, graph, metric and ablation filled in."""
        return cls(method=method, task=problem.task_name, graph=problem.graph, scores=scores, kept=kept,
                   metric=problem.metric.name, ablation=problem.ablation, **fields)

    @property
    def names(self) -> tuple[str, ...]:
        return self.graph.gate_names

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    def score(self, name: str) -> float:
        return float(self.scores[self.graph.index(name)])

    def kept_mask(self) -> np.ndarray:
        mask = np.zeros(self.graph.n_gates, bool)
        mask[self.graph.indices(self.kept)] = True
        return mask

    def gates(self, dtype=jnp.float32):
        """1 on the kept units, 0 elsewhere."""
        return jnp.asarray(self.kept_mask(), dtype)

    def top(self, n: int) -> list[tuple[str, float]]:
        """The ``n`` highest-scoring units (NaN scores last)."""
        order = np.argsort(-np.nan_to_num(self.scores, nan=-np.inf), kind="stable")[:n]
        return [(self.names[i], float(self.scores[i])) for i in order]

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
            key: {name: _json_float(s) for name, s in zip(self.names, self.scores)},
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
        graph = Graph(**data["graph"])
        key = "edges" if graph.level == "edge" else "nodes"
        table = data[key]
        missing = [n for n in graph.gate_names if n not in table]
        if missing:
            raise ValueError(f"the circuit JSON lacks scores for {len(missing)} units, e.g. {missing[:3]}")
        scores = np.array([np.nan if table[n] is None else table[n] for n in graph.gate_names], np.float64)
        known = {"format", "version", "method", "task", "metric", "ablation", "threshold", "graph", "level",
                 f"n_{key}_total", key, "circuit", "n_kept", "metric_value", "seconds", "settings"}
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
        lines = [
            f"{self.method} on {self.task}: kept {self.n_kept} of {self.graph.n_gates} {unit}"
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
