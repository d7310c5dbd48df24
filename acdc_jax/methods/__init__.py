"""Discovery methods: one module each (``acdc_jax.methods.eap``), one function each (``acdc_jax.eap``),
all returning a ``Circuit``; ``discover`` runs any by name."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable


from ..evaluate import precision_recall, roc_auc
from ..graph import GraphError, Level
from ..models import Transformer, load_model
from ..tasks import Task, TaskError, get_task
from ._circuit import Circuit
from ._positions import PositionUnits
from ._problem import Problem

# One module per method, importable by its name (``acdc_jax.methods.acdc.visit_order``); the
# functions themselves are re-exported by ``acdc_jax`` (``acdc_jax.acdc``), so no function hides
# its module here.
from . import (  # noqa: E402
    acdc,
    atp_star,
    eap,
    eap_ig,
    eap_ig_activations,
    exact,
    hisp,
    learned_mask,
    node_patching,
    path_patching,
    stability,
    wrong_answer,
)
from .acdc import CheckpointMismatch, visit_order
from .exact import exact_patching
from .path_patching import Path
from .stability import rank_agreement, split_half_stability


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A discovery method: ``fn(problem, **options) -> Circuit`` and the graph level it works at."""

    name: str
    fn: Callable[..., Circuit]
    level: Level = "edge"
    uses_discovery_metric: bool = True  # prunes with the task's discovery metric (else its paper metric)
    summary: str = ""


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    _METHODS[spec.name] = spec


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    if name in _METHODS:
        return _METHODS[name]
    close = difflib.get_close_matches(name, method_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown method {name!r}: choose one of {', '.join(method_names())}{hint}")


register_method(MethodSpec("acdc", acdc.acdc, "edge", True, "ACDC: greedy exact pruning in reverse topological order"))
register_method(MethodSpec(
    "acdc-nodes", acdc.acdc, "node", True, "ACDC over nodes (heads and MLPs as units): a cheaper first pass",
))
register_method(MethodSpec(
    "node-patching", node_patching.node_patching, "node", False, "ablate each head and MLP alone (one batch): a cheap first pass",
))
register_method(MethodSpec(
    "path-patching", path_patching.path_patching, "edge", False,
    "top-down automatic path patching from the logits, per labelled position, Q/K/V kept apart",
))
register_method(MethodSpec(
    "learned-mask", learned_mask.learned_mask, "edge", True, "Edge Pruning: hard-concrete edge gates trained under an L0 penalty",
))
register_method(MethodSpec(
    "learned-mask-nodes", learned_mask.learned_mask, "node", True, "Subnetwork Probing: hard-concrete node gates trained under an L0 penalty",
))
register_method(MethodSpec("eap", eap.eap, "edge", False, "EAP: gradient of the metric at all gates 1, one backward pass"))
register_method(MethodSpec("eap-nodes", eap.eap, "node", False, "EAP over nodes (heads, MLPs, embed)"))
register_method(MethodSpec("eap-ig", eap_ig.eap_ig, "edge", False, "EAP-IG: gate gradients integrated from all gates 0 to 1"))
register_method(MethodSpec(
    "eap-ig-inputs", functools.partial(eap_ig.eap_ig, variant="inputs"), "edge", False,
    "EAP-IG over inputs: gradients along the embedding interpolated from ablated to clean",
))
register_method(MethodSpec(
    "eap-ig-activations", eap_ig_activations.eap_ig_activations, "edge", False,
    "EAP-IG over activations (the EAP-IG library's, as MIB runs it): each source group mixed clean/ablated in turn",
))
register_method(MethodSpec(
    "eap-ig-activations-own", functools.partial(eap_ig_activations.eap_ig_activations, groups="own"), "edge", False,
    "EAP-IG over activations, each edge integrated along its own source group only",
))
register_method(MethodSpec("atp-star", atp_star.atp_star, "edge", False, "AtP*: EAP with the QK fix and GradDrop"))
register_method(MethodSpec("hisp", hisp.hisp, "node", False, "HISP: mean absolute per-prompt gradient of node gates"))
register_method(MethodSpec(
    "wrong-answer", wrong_answer.wrong_answer, "edge", False, "gradient of a maximally-wrong-answer loss (gates, optionally weights)",
))
register_method(MethodSpec("exact-patching", exact_patching, "edge", False, "exact effect of ablating each edge alone"))


def discover(
    model: Transformer | str,
    task: Task | str,
    method: str = "acdc",
    *,
    qkv_split: bool = True,
    internal_edges: bool = False,
    kv_groups: bool = False,
    metric: str | None = None,
    ablation: str | None = None,
    score: bool = True,
    mesh=None,
    **options,
) -> Circuit:
    """Run a discovery method by name on a model and task (each may be given by name).

    The graph is q/k/v-split by default (``qkv_split=False`` for one input per head;
    ``internal_edges=True`` for ACDC's full graph; ``kv_groups=True`` for k/v inputs per key/value
    head on an edge-level graph of a grouped-query model). ``metric`` defaults to the task's discovery
    metric (KL for most tasks) for pruning methods and to the task's own metric for attribution
    methods; ``ablation`` defaults to the task's. When the task has a canonical circuit,
    ``circuit.extra`` gets ``auc``, ``precision`` and ``recall`` against it (``score=False``: not
    yet; call ``attach_reference_scores`` later). ``mesh``: a ``jax.sharding.Mesh``
    (``acdc_jax.sharding.make_mesh``) to run on, prompts split over its ``prompts`` axis and weights
    over its ``model`` axis (``acdc_jax.sharding.shard_problem``).
    """
    spec = get_method(method)
    task = get_task(task) if isinstance(task, str) else task
    if isinstance(model, str):
        model = load_model(model)
    if metric is None:
        metric = task.discovery_metric if spec.uses_discovery_metric else task.metric
    problem = Problem.build(
        model, task, qkv_split=qkv_split, level=spec.level, internal_edges=internal_edges,
        kv_groups=kv_groups and spec.level == "edge", metric=metric, ablation=ablation
    )
    if mesh is not None:
        from ..sharding import shard_problem

        problem = shard_problem(problem, mesh)
    circuit = spec.fn(problem, **options)
    circuit.method = spec.name
    if score:
        attach_reference_scores(circuit, task)
    return circuit


def attach_reference_scores(circuit: Circuit, task: Task) -> str | None:
    """Add ``auc``, ``precision`` and ``recall`` against the task's canonical circuit, when it has one.

    A canonical circuit that does not fit the circuit's graph (it names heads another model lacks,
    e.g. GPT-2 small's IOI heads on a smaller model) is skipped: the reason goes to
    ``circuit.extra["reference_skipped"]`` and is returned.
    """
    canonical = task.canonical
    if canonical is None or (circuit.graph.level == "edge" and not canonical.has_edges):
        return None
    try:
        labels = canonical.labels(circuit.graph)
    except (GraphError, TaskError) as err:
        reason = err.args[0] if err.args else str(err)
        circuit.extra["reference_skipped"] = reason
        return reason
    if labels.all() or not labels.any():
        return None
    per_edge = circuit.merge_positions()  # the canonical circuits name edges, not positions
    circuit.extra["auc"] = roc_auc(per_edge.scores, labels)
    precision, recall = precision_recall(per_edge.kept_mask(), labels)
    circuit.extra["precision"] = precision
    circuit.extra["recall"] = recall
    circuit.extra["reference"] = {"ablation": canonical.ablation, "n_units": int(labels.sum()), "source": canonical.source,
                                  **({} if circuit.positions is None else {"positions": "merged: an edge at any position"})}
    return None


__all__ = [
    "CheckpointMismatch",
    "Circuit",
    "MethodSpec",
    "Path",
    "PositionUnits",
    "Problem",
    "acdc",
    "atp_star",
    "attach_reference_scores",
    "discover",
    "eap",
    "eap_ig",
    "eap_ig_activations",
    "exact",
    "exact_patching",
    "get_method",
    "hisp",
    "learned_mask",
    "method_names",
    "node_patching",
    "path_patching",
    "rank_agreement",
    "register_method",
    "split_half_stability",
    "stability",
    "visit_order",
    "wrong_answer",
]
