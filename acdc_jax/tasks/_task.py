"""The common task type: prompts, what the metric reads, and the circuit the literature reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from ..graph import Graph, GraphError
from ..metrics import Metric, MetricInputs, get_metric
from ..models import InputError, Transformer, forward
from ..patching import GatedRun, make_ablation

ABLATIONS = ("corrupt", "zero", "mean")


class TaskError(ValueError):
    """A task that cannot be built or used as given; the message names the field and row."""


@dataclasses.dataclass(frozen=True)
class CanonicalCircuit:
    """A reference circuit in this project's names.

    ``edges`` use the q/k/v-split edge names (``"a0.1->a2.3.k"``); ``nodes`` the source names
    (``embed``, ``a{l}.{h}``, ``mlp{l}``). When only a node set is known (``edges=()``), only
    node-level comparisons are possible. ``ablation`` says under which ablation the circuit is
    known to be the ground truth.
    """

    edges: tuple[str, ...]
    nodes: tuple[str, ...]
    ablation: str
    source: str

    @property
    def has_edges(self) -> bool:
        return bool(self.edges)

    def gate_names(self, graph: Graph) -> frozenset[str]:
        """The circuit in ``graph``'s gate units: its edges at that granularity, or its nodes."""
        if graph.level == "node":
            names = set(self.nodes)
        else:
            if not self.edges:
                raise TaskError(f"this canonical circuit ({self.source}) is known only at node level; use a node-level graph")
            names = set()
            for edge in self.edges:
                src, dst = Graph.split_edge(edge)
                if not graph.qkv_split and dst.startswith("a") and dst.count(".") == 2:
                    dst = dst.rsplit(".", 1)[0]
                names.add(f"{src}->{dst}")
                if graph.internal_edges and dst.startswith("a") and dst.count(".") == 2:
                    names.add(f"{dst}->{dst.rsplit('.', 1)[0]}")
        known = set(graph.gate_names)
        unknown = sorted(names - known)
        if unknown:
            raise GraphError(f"the canonical circuit names {len(unknown)} units that are not in the {graph.describe()}: {unknown[:5]}")
        return frozenset(names)

    def labels(self, graph: Graph) -> np.ndarray:
        """1 for each gate unit of ``graph`` in the circuit, 0 otherwise (ROC ground truth)."""
        inside = self.gate_names(graph)
        return np.array([name in inside for name in graph.gate_names], dtype=bool)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """Clean and corrupted prompts, where and how to measure, and the known circuit.

    - ``clean``/``corrupt``: int token ids ``[batch, pos]``, same shape, position by position.
    - ``positions``: ``[batch, k]`` the positions the metric reads (END, or every output position).
    - ``metric``/``metric_options``: the metric the ACDC paper uses for this task.
    - ``answers``/``wrong_answers``: ``[batch, n]`` token ids (``nll`` with ``k`` reads: ``[batch, k]``).
    - ``answer_mask``/``wrong_mask``: ``[batch, vocab]`` token sets (Greater-Than), over the
      tokenizer's vocabulary; ``metric_inputs`` fits them to the model's outputs.
    - ``read_mask``: ``[batch, k]`` weights of the read positions (0 for padding).
    - ``labels``: named token positions per prompt (IOI's ``IO``, ``S1``, ``S1+1``, ``S2``, ``END``).
    - ``ablation``: what gate 0 means by default (``corrupt``, ``zero`` or ``mean``).
    - ``corrupt_pos_ids``: position ids of the corrupted run (ACDC's tracr runs scramble them).
    - ``model``: the model the task is defined on (a name for ``load_model``).
    - ``discovery_metric``: the metric ACDC prunes with by default (``kl``, as in the ACDC paper,
      except where outputs are not distributions, e.g. tracr's ``l2``).
    """

    name: str
    clean: np.ndarray
    corrupt: np.ndarray
    positions: np.ndarray
    metric: str
    metric_options: Mapping = dataclasses.field(default_factory=dict)
    answers: np.ndarray | None = None
    wrong_answers: np.ndarray | None = None
    answer_mask: np.ndarray | None = None
    wrong_mask: np.ndarray | None = None
    read_mask: np.ndarray | None = None
    labels: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    canonical: CanonicalCircuit | None = None
    ablation: str = "corrupt"
    corrupt_pos_ids: np.ndarray | None = None
    model: str | None = None
    discovery_metric: str = "kl"
    description: str = ""
    prompts: tuple[str, ...] | None = None

    def __post_init__(self):
        def as_int(field, value, ndim):
            arr = np.asarray(value)
            if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.integer):
                raise TaskError(f"task {self.name!r}: {field} must be a {ndim}-d int array, got shape {arr.shape} dtype {arr.dtype}")
            object.__setattr__(self, field, arr)
            return arr

        clean = as_int("clean", self.clean, 2)
        corrupt = as_int("corrupt", self.corrupt, 2)
        if clean.shape != corrupt.shape:
            raise TaskError(
                f"task {self.name!r}: clean prompts are {clean.shape} but corrupted are {corrupt.shape}; "
                "they must pair up position by position (same batch and length)"
            )
        batch, n_pos = clean.shape
        positions = as_int("positions", self.positions, 2)
        if positions.shape[0] != batch:
            raise TaskError(f"task {self.name!r}: positions has {positions.shape[0]} rows for {batch} prompts")
        bad = np.argwhere((positions < 0) | (positions >= n_pos))
        if bad.size:
            row = int(bad[0][0])
            raise TaskError(f"task {self.name!r}: read position {positions[tuple(bad[0])]} in row {row} is outside 0..{n_pos - 1}")
        for field in ("answers", "wrong_answers"):
            if getattr(self, field) is not None:
                arr = as_int(field, getattr(self, field), 2)
                if arr.shape[0] != batch:
                    raise TaskError(f"task {self.name!r}: {field} has {arr.shape[0]} rows for {batch} prompts")
        for field in ("answer_mask", "wrong_mask"):
            if getattr(self, field) is not None:
                arr = np.asarray(getattr(self, field), bool)
                if arr.ndim != 2 or arr.shape[0] != batch:
                    raise TaskError(f"task {self.name!r}: {field} must be [batch={batch}, vocab], got {arr.shape}")
                object.__setattr__(self, field, arr)
        if self.read_mask is not None:
            arr = np.asarray(self.read_mask, np.float32)
            if arr.shape != positions.shape:
                raise TaskError(f"task {self.name!r}: read_mask must match positions {positions.shape}, got {arr.shape}")
            object.__setattr__(self, "read_mask", arr)
        labels = {}
        for label, value in self.labels.items():
            arr = np.asarray(value)
            if arr.shape != (batch,) or not np.issubdtype(arr.dtype, np.integer):
                raise TaskError(f"task {self.name!r}: label {label!r} must be [batch={batch}] ints, got {arr.shape}")
            if np.any((arr < 0) | (arr >= n_pos)):
                raise TaskError(f"task {self.name!r}: label {label!r} has a position outside 0..{n_pos - 1}")
            labels[label] = arr
        object.__setattr__(self, "labels", labels)
        if self.ablation not in ABLATIONS:
            raise TaskError(f"task {self.name!r}: ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        get_metric(self.metric, **dict(self.metric_options))  # fails early on an unknown metric
        self.get_metric(self.discovery_metric)

    # ------------------------------------------------------------------ views

    @property
    def n_prompts(self) -> int:
        return self.clean.shape[0]

    @property
    def seq_len(self) -> int:
        return self.clean.shape[1]

    def subset(self, index) -> "Task":
        """The same task on a subset of prompts (an index array, slice or boolean mask)."""
        index = np.arange(self.n_prompts)[index]

        def take(x):
            return None if x is None else np.asarray(x)[index]

        return dataclasses.replace(
            self,
            clean=self.clean[index],
            corrupt=self.corrupt[index],
            positions=self.positions[index],
            answers=take(self.answers),
            wrong_answers=take(self.wrong_answers),
            answer_mask=take(self.answer_mask),
            wrong_mask=take(self.wrong_mask),
            read_mask=take(self.read_mask),
            labels={k: v[index] for k, v in self.labels.items()},
            corrupt_pos_ids=self.corrupt_pos_ids if self.corrupt_pos_ids is None or self.corrupt_pos_ids.ndim == 1 else self.corrupt_pos_ids[index],
            prompts=None if self.prompts is None else tuple(self.prompts[i] for i in index),
        )

    def get_metric(self, name: str | Metric | None = None) -> Metric:
        """The task's metric (default), or another by name with this task's options where they apply."""
        if isinstance(name, Metric):
            return name
        if name is None or name == self.metric:
            return get_metric(self.metric, **dict(self.metric_options))
        if name in ("l2", "mse") and "logit_dims" in self.metric_options:
            return get_metric(name, logit_dims=self.metric_options["logit_dims"])
        return get_metric(name)

    # ------------------------------------------------------------------ running

    def check_model(self, model: Transformer) -> None:
        cfg = model.config
        if self.seq_len > cfg.n_ctx:
            raise InputError(f"task {self.name!r} has prompts of {self.seq_len} tokens, longer than the model's n_ctx={cfg.n_ctx}")
        for field in ("clean", "corrupt"):
            top = int(getattr(self, field).max())
            if top >= cfg.d_vocab:
                raise InputError(f"task {self.name!r}: {field} token id {top} is out of range for the model's vocabulary of {cfg.d_vocab}")
        for field in ("answers", "wrong_answers"):
            arr = getattr(self, field)
            if arr is not None and int(arr.max()) >= cfg.d_vocab_out:
                raise InputError(f"task {self.name!r}: {field} token id {int(arr.max())} is outside the model's {cfg.d_vocab_out} outputs")
        for field in ("answer_mask", "wrong_mask"):
            arr = getattr(self, field)
            if arr is not None and arr[:, cfg.d_vocab_out :].any():
                top = int(np.flatnonzero(arr.any(0))[-1])
                raise InputError(f"task {self.name!r}: {field} marks token id {top}, outside the model's {cfg.d_vocab_out} outputs")

    def gated_run(self, model: Transformer, graph: Graph, ablation: str | None = None) -> GatedRun:
        """The gated run of this task's clean prompts under ``ablation`` (default: the task's).

        ``mean`` ablation averages each source over the corrupted prompts, per position.
        """
        self.check_model(model)
        mode = ablation or self.ablation
        if mode not in ABLATIONS:
            raise TaskError(f"unknown ablation {mode!r}; choose one of {', '.join(ABLATIONS)}")
        abl = make_ablation(
            model,
            mode,
            corrupt_tokens=self.corrupt,
            reference_tokens=self.corrupt,
            pos_ids=self.corrupt_pos_ids,
        )
        return GatedRun(model, graph, self.clean, abl, positions=self.positions)

    def metric_inputs(self, model: Transformer) -> MetricInputs:
        """What metrics compare against, with the clean model's logits at the read positions."""
        self.check_model(model)
        clean_logits = forward(model, jnp.asarray(self.clean), positions=jnp.asarray(self.positions))

        def arr(x, dtype=None):
            return None if x is None else jnp.asarray(x, dtype)

        def vocab_mask(mask):
            # a task's masks span its tokenizer's vocabulary; the model may have more outputs (Pythia's
            # embedding is padded to 50,304 rows for 50,277 tokens), which no answer is
            if mask is None:
                return None
            n_out = model.config.d_vocab_out
            fitted = np.zeros((mask.shape[0], n_out), bool)
            fitted[:, : min(n_out, mask.shape[1])] = mask[:, :n_out]
            return jnp.asarray(fitted)

        return MetricInputs(
            clean_logits=clean_logits,
            answers=arr(self.answers),
            wrong_answers=arr(self.wrong_answers),
            answer_mask=vocab_mask(self.answer_mask),
            wrong_mask=vocab_mask(self.wrong_mask),
            read_mask=arr(self.read_mask, model.dtype),
        )
