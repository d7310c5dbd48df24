"""What every discovery method works on: a gated run of a task and the metric to read from it."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from ..graph import Graph, Level
from ..metrics import Metric, MetricInputs
from ..models import Transformer
from ..patching import GatedRun
from ..tasks import Task


class Problem(eqx.Module):
    """A task's gated run plus its metric: ``problem.value(gates)`` is the metric of that gating.

    A pytree (arrays are leaves, the graph and metric are static), so methods pass it straight
    into ``jit``, ``grad`` and ``vmap``.
    """

    run: GatedRun
    inputs: MetricInputs
    metric: Metric = eqx.field(static=True)
    task_name: str = eqx.field(static=True)
    ablation: str = eqx.field(static=True)
    labels: dict = eqx.field(default_factory=dict)  # the task's named token positions, [batch] each

    @classmethod
    def build(
        cls,
        model: Transformer,
        task: Task,
        *,
        graph: Graph | None = None,
        qkv_split: bool = True,
        level: Level = "edge",
        internal_edges: bool = False,
        kv_groups: bool = False,
        metric: str | Metric | None = None,
        ablation: str | None = None,
    ) -> "Problem":
        graph = graph or Graph.from_model(model, qkv_split, level=level, internal_edges=internal_edges, kv_groups=kv_groups)
        ablation = ablation or task.ablation
        return cls(
            run=task.gated_run(model, graph, ablation),
            inputs=task.metric_inputs(model),
            metric=task.get_metric(metric),
            task_name=task.name,
            ablation=ablation,
            labels={name: jnp.asarray(v) for name, v in task.labels.items()},
        )

    @property
    def graph(self) -> Graph:
        return self.run.graph

    @property
    def model(self) -> Transformer:
        return self.run.model

    def value(self, gates: Float[Array, "*gate_pos n_gates"]) -> Scalar:
        """The metric of the gated model (pure; call inside jit/grad/vmap)."""
        return self.metric(self.run.logits(gates), self.inputs)

    def loss(self, gates: Float[Array, "*gate_pos n_gates"]) -> Scalar:
        """The metric turned so that lower is better."""
        return self.metric.loss(self.run.logits(gates), self.inputs)

    def loss_from(self, start_layer, deltas, gates) -> Scalar:
        """``loss`` running only layers ``start_layer..`` on cached differences (see ``GatedRun.logits_from``)."""
        return self.metric.loss(self.run.logits_from(start_layer, deltas, gates), self.inputs)

    def with_graph(self, graph: Graph) -> "Problem":
        """The same problem gated at another granularity (same model, prompts and ablation)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, graph=graph))

    def with_remat(self, remat: bool | None = True) -> "Problem":
        """The same problem with gradients through recomputed layers (see ``GatedRun``'s ``remat``)."""
        return dataclasses.replace(self, run=self.run.with_remat(remat))

    def with_metric(self, metric: Metric) -> "Problem":
        return Problem(self.run, self.inputs, metric, self.task_name, self.ablation, self.labels)

    def evaluate(self, gates) -> float:
        """``value`` for one gate vector, jitted, as a Python float."""
        return float(_jit_value(self, gates))

    def clean_value(self) -> float:
        return self.evaluate(self.graph.gates(1.0, self.model.dtype))

    def ablated_value(self) -> float:
        return self.evaluate(self.graph.gates(0.0, self.model.dtype))

    def subset(self, index) -> "Problem":
        """The same problem on a subset of prompts (for stability checks and chunking)."""
        labels = {name: v[index] for name, v in self.labels.items()}
        return Problem(self.run.rows(index), self.inputs.subset(index), self.metric, self.task_name, self.ablation, labels)


@eqx.filter_jit
def _jit_value(problem: Problem, gates):
    return problem.value(gates)
