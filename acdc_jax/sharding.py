"""Many devices: gate configurations, prompts and weights sharded over a ``jax.sharding.Mesh``.

The mesh has three axes: ``configs`` (ablations evaluated in parallel, each device takes a slice of
the gate configurations), ``prompts`` (data parallel: each device holds a slice of the prompt
batch; metrics that average over prompts become cross-device reductions) and ``model`` (the weights
split over devices, for models whose weights and activations do not fit one device).

The ``model`` axis is tensor parallel over heads and MLP width, not FSDP over the layer stack.
In a gated model each head's output ``z_h @ W_O[h]`` is a source and its q, k and v inputs are
destinations, with gates per head: a head's whole computation (its gated reads, its projections,
its attention pattern, its output) involves no other head, so with ``W_Q``/``W_K``/``W_V``/``W_O``
split on the head axis nothing crosses devices until a destination sums the sources it reads (the
gated read of the difference buffer, the residual). The MLP's hidden units are independent in the
same way (``W_in``/``W_gate`` columns, ``W_out`` rows). The per-head activations (the q/k/v
inputs, attention patterns, head outputs) then split with the weights, and those, not the weights,
are most of a gated run's memory (``memory.memory_plan``). FSDP over layers would gather each layer's
whole weights onto every device in turn and leave every per-head activation on every device.
Grouped-query key/value heads split when the model axis divides their number and are replicated
otherwise; the embedding and unembedding split over the vocabulary when the axis divides it
(``models._sharded.parameter_specs`` has the rule). The model and graph are otherwise replicated.

``jax.jit`` partitions the same computation the single-device path runs: with
configurations sharded, each device runs exactly what one device runs for a chunk of the same
size, bit for bit (a vmap of another width may pick other kernels and differ in the last bits);
with prompts sharded, the reductions over prompts are reassociated, and with weights sharded the
contractions over heads and MLP width are, so results agree to float tolerance. The mesh puts the
``model`` axis innermost, on neighbouring devices (one host's), where its traffic is cheapest.

On several hosts, call ``jax.distributed.initialize()`` first (on every host), build the mesh from
``jax.devices()`` (which then lists every host's devices) and run the same code; ``load_model(DIR,
mesh=mesh)`` then reads on each host only the shards of its own devices (README: "Several devices").
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .methods import Problem
from .models import Ablation
from .models._sharded import MODEL, check_model_axis, parameter_specs, shard_model

CONFIGS, PROMPTS = "configs", "prompts"
__all__ = ["CONFIGS", "MODEL", "PROMPTS", "evaluate_configs", "gate_gradient", "make_mesh", "parameter_specs",
           "shard_model", "shard_problem"]


def make_mesh(configs: int | None = None, prompts: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ``configs x prompts x model`` mesh; by default every device not on the other two axes goes to
    the configuration axis."""
    devices = list(jax.devices() if devices is None else devices)
    if min(prompts, model) < 1 or (configs is not None and configs < 1):
        raise ValueError(f"every mesh axis needs at least 1 device, got configs={configs}, prompts={prompts}, model={model}")
    if configs is None:
        if len(devices) % (prompts * model):
            raise ValueError(f"{len(devices)} devices cannot be split into a prompts axis of {prompts} "
                             f"and a model axis of {model}")
        configs = len(devices) // (prompts * model)
    if configs * prompts * model != len(devices):
        raise ValueError(f"a {configs} x {prompts} x {model} mesh needs {configs * prompts * model} devices, "
                         f"{len(devices)} are given")
    return Mesh(np.array(devices).reshape(configs, prompts, model), (CONFIGS, PROMPTS, MODEL))


def _put(x, mesh: Mesh, spec: PartitionSpec):
    return None if x is None else jax.device_put(x, NamedSharding(mesh, spec))


def _batch_spec(x, axis: int, batch: int) -> PartitionSpec:
    """Shard ``axis`` over prompts when it is the batch axis (not a broadcast axis of size 1)."""
    parts = [None] * x.ndim
    if x.shape[axis] == batch:
        parts[axis] = PROMPTS
    return PartitionSpec(*parts)


def shard_problem(problem: Problem, mesh: Mesh) -> Problem:
    """The problem with its prompt axis split over the mesh's ``prompts`` axis and its weights over the
    ``model`` axis (``shard_model``); the rest replicated."""
    run = problem.run
    batch = run.tokens.shape[0]
    n_shards = mesh.shape[PROMPTS]
    if batch % n_shards:
        raise ValueError(f"{batch} prompts cannot be split evenly over {n_shards} devices on the prompts axis; "
                         f"use a multiple of {n_shards} prompts")
    check_model_axis(run.model.config, dict(mesh.shape).get(MODEL, 1))
    model = shard_model(run.model, mesh)
    abl = run.ablation
    ablation = Ablation(
        values=_put(abl.values, mesh, _batch_spec(abl.values, 1, batch)),
        base_attn=_put(abl.base_attn, mesh, _batch_spec(abl.base_attn, 1, batch)),
        base_mlp=None if abl.base_mlp is None else _put(abl.base_mlp, mesh, _batch_spec(abl.base_mlp, 1, batch)),
        base_logits=_put(abl.base_logits, mesh, _batch_spec(abl.base_logits, 0, batch)),
    )
    rows = PartitionSpec(PROMPTS)
    sharded_run = dataclasses.replace(
        run, model=model, tokens=_put(run.tokens, mesh, rows), ablation=ablation,
        positions=None if run.positions is None else _put(run.positions, mesh, rows),
    )
    inputs = jax.tree.map(lambda x: _put(x, mesh, _batch_spec(x, 0, batch)), problem.inputs)
    labels = {k: _put(v, mesh, rows) for k, v in problem.labels.items()}
    return Problem(sharded_run, inputs, problem.metric, problem.task_name, problem.ablation, labels)


def _to_host(x) -> np.ndarray:
    """A result as a numpy array on this host; one spread over several hosts' devices is gathered first."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


@eqx.filter_jit
def _values(problem: Problem, gates):
    return jax.vmap(problem.value)(gates)


def evaluate_configs(problem: Problem, gates, mesh: Mesh, *, chunk_per_device: int = 8) -> np.ndarray:
    """The metric of every gate configuration ``gates [K, ...]``, configurations spread over the
    mesh's ``configs`` axis, prompts over its ``prompts`` axis and weights over its ``model`` axis,
    ``chunk_per_device``
    configurations per device at a time."""
    problem = shard_problem(problem, mesh)
    gates = np.asarray(gates)
    n_dev = mesh.shape[CONFIGS]
    step = n_dev * chunk_per_device
    n = gates.shape[0]
    padded = math.ceil(n / step) * step
    if padded > n:
        gates = np.concatenate([gates, np.repeat(gates[:1], padded - n, axis=0)])
    spec = PartitionSpec(CONFIGS, *([None] * (gates.ndim - 1)))
    out = [_to_host(_values(problem, _put(jnp.asarray(gates[i : i + step]), mesh, spec))) for i in range(0, padded, step)]
    return np.concatenate(out)[:n]


@eqx.filter_jit
def _gradient(problem: Problem, gates):
    return jax.grad(problem.value)(gates)


def gate_gradient(problem: Problem, gates, mesh: Mesh) -> np.ndarray:
    """``d metric / d gates`` with the prompt batch split over the mesh's ``prompts`` axis and the
    weights over its ``model`` axis."""
    problem = shard_problem(problem, mesh)
    return _to_host(_gradient(problem, _put(jnp.asarray(gates), mesh, PartitionSpec())))
