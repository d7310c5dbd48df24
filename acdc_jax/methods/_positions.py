"""Position units of position-aware circuits: which token positions each unit's gates cover.

A position-aware method gives every gate unit (edge, or node) one gate per *position unit*: a
token position (``positions="each"``), or a labelled span of positions (a mapping ``label ->
positions``, or ``"labels"``: the task's own labels, IOI's ``IO``, ``S1``, ``S2``, ``END``...).
The units partition the prompt: positions no span names form one more unit, ``other``, so
that the units' gates set every token position's gate and the scores of one edge over its
position units add up to the edge's position-free score (gradient methods). The gate of unit
``u`` is the gate at every destination position of its span (the graph's position axis: a
destination input at token p reads ``g[p]``); prompts share positions, so labels must sit at the
same position in every prompt.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

OTHER = "other"
SEPARATOR = "@"


@dataclasses.dataclass(frozen=True)
class PositionUnits:
    """Labelled, disjoint spans of token positions that together cover ``0..n_pos-1``, in the order of
    their first position. ``spans[i]`` are the token positions of unit ``labels[i]``."""

    labels: tuple[str, ...]
    spans: tuple[tuple[int, ...], ...]
    n_pos: int

    def __post_init__(self):
        if len(self.labels) != len(self.spans) or not self.labels:
            raise ValueError(f"position units need one span per label, got {len(self.labels)} labels and {len(self.spans)} spans")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"position labels must be distinct, got {list(self.labels)}")
        bad = [label for label in self.labels if not isinstance(label, str) or not label or SEPARATOR in label]
        if bad:
            raise ValueError(f"position labels must be non-empty strings without {SEPARATOR!r}, got {bad}")
        seen: dict[int, str] = {}
        for label, span in zip(self.labels, self.spans):
            if not span:
                raise ValueError(f"position span {label!r} is empty")
            for p in span:
                if not 0 <= p < self.n_pos:
                    raise ValueError(f"position span {label!r} has position {p}, outside the prompt's 0..{self.n_pos - 1}")
                if p in seen:
                    raise ValueError(f"position {p} is in both spans {seen[p]!r} and {label!r}; spans must be disjoint")
                seen[p] = label
        if len(seen) != self.n_pos:
            missing = sorted(set(range(self.n_pos)) - set(seen))
            raise ValueError(f"position units must cover every position; {missing} are in none")

    @property
    def n_units(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def unit_of(self) -> np.ndarray:
        """``[n_pos]``: the unit each token position belongs to."""
        out = np.zeros(self.n_pos, np.int32)
        for u, span in enumerate(self.spans):
            out[list(span)] = u
        return out

    def membership(self) -> np.ndarray:
        """``[n_units, n_pos]``: 1 where a unit covers a position."""
        return (self.unit_of[None, :] == np.arange(self.n_units)[:, None]).astype(np.float64)

    def expand(self, gates):
        """Unit gates ``[..., n_units, n_gates]`` as token gates ``[..., n_pos, n_gates]`` (jax or numpy)."""
        if isinstance(gates, np.ndarray):
            return np.take(gates, self.unit_of, axis=-2)
        return jnp.take(gates, jnp.asarray(self.unit_of), axis=-2)

    def reduce(self, per_token: np.ndarray) -> np.ndarray:
        """Per-token values ``[..., n_pos, n_gates]`` summed within each unit: ``[..., n_units, n_gates]``."""
        return np.einsum("up,...pg->...ug", self.membership(), np.asarray(per_token, np.float64))

    def unit_names(self, gate_names: Sequence[str]) -> tuple[str, ...]:
        """``"{gate}@{label}"`` for every (unit, gate), unit-major: the order of ``scores.reshape(-1)``."""
        return tuple(f"{name}{SEPARATOR}{label}" for label in self.labels for name in gate_names)

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "spans": [list(s) for s in self.spans], "n_pos": self.n_pos}

    @classmethod
    def from_dict(cls, data: Mapping) -> "PositionUnits":
        return cls(tuple(data["labels"]), tuple(tuple(int(p) for p in s) for s in data["spans"]), int(data["n_pos"]))

    @classmethod
    def from_spans(cls, spans: Mapping[str, int | Sequence[int]], n_pos: int) -> "PositionUnits":
        """Units from ``label -> position(s)``; positions no label names form the unit ``other``."""
        if not isinstance(spans, Mapping) or not spans:
            raise ValueError("position spans must be a non-empty mapping label -> position or list of positions")
        items = []
        for label, value in spans.items():
            values = [value] if isinstance(value, (int, np.integer)) else list(value)
            if not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in values):
                raise ValueError(f"position span {label!r} must be an int or a list of ints, got {value!r}")
            items.append((str(label), tuple(sorted(int(p) for p in values))))
        covered = {p for _, span in items for p in span}
        rest = tuple(p for p in range(n_pos) if p not in covered)
        if rest:
            if OTHER in dict(items):
                raise ValueError(f"positions {list(rest)} are in no span and the label {OTHER!r} is taken; cover every position")
            items.append((OTHER, rest))
        items.sort(key=lambda item: item[1][0] if item[1] else -1)
        return cls(tuple(label for label, _ in items), tuple(span for _, span in items), int(n_pos))

    @classmethod
    def each(cls, n_pos: int) -> "PositionUnits":
        return cls(tuple(str(p) for p in range(n_pos)), tuple((p,) for p in range(n_pos)), int(n_pos))


def split_unit_name(name: str) -> tuple[str, str]:
    """``"a0.1->logits@3"`` -> ``("a0.1->logits", "3")``."""
    gate, sep, label = name.rpartition(SEPARATOR)
    if not sep:
        raise ValueError(f"{name!r} names no position unit; position-aware units are written 'edge@label'")
    return gate, label


def resolve_positions(problem, positions) -> PositionUnits | None:
    """The position units a method's ``positions=`` option asks for on ``problem`` (None: none).

    ``"each"``: one unit per token position, labelled ``"0"``, ``"1"``, ...; ``"labels"``: the task's
    labels (each at one position shared by every prompt); a mapping ``label -> position(s)``; or
    ``PositionUnits`` themselves (for this prompt length).
    """
    if positions is None:
        return None
    n_pos = int(problem.run.tokens.shape[1])
    if isinstance(positions, PositionUnits):
        units = positions
    elif positions == "each":
        units = PositionUnits.each(n_pos)
    elif positions == "labels":
        units = PositionUnits.from_spans(_aligned_labels(problem), n_pos)
    elif isinstance(positions, Mapping):
        units = PositionUnits.from_spans(positions, n_pos)
    else:
        raise ValueError(f"positions must be None, 'each', 'labels' or a mapping label -> positions, got {positions!r}")
    if units.n_pos != n_pos:
        raise ValueError(f"the position units cover {units.n_pos} positions but the prompts have {n_pos}")
    return units


def _aligned_labels(problem) -> dict[str, int]:
    labels = problem.labels
    if not labels:
        raise ValueError(f"task {problem.task_name!r} has no position labels; use positions='each' or a mapping "
                         "label -> positions")
    out = {}
    for name, values in labels.items():
        values = np.asarray(values)
        if not np.all(values == values[0]):
            raise ValueError(
                f"label {name!r} sits at different positions in different prompts ({sorted(set(values.tolist()))}); "
                "position units are shared by every prompt, so build the task from a single template or pass "
                "positions='each'"
            )
        out[name] = int(values[0])
    return out
