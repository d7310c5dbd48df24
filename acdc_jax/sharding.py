"""Many devices: gate configurations and prompts sharded over a ``jax.sharding.Mesh``.

The mesh has two axes: ``configs`` (ablations evaluated in parallel, each device takes a slice of
the gate configurations) and ``prompts`` (data parallel: each device holds a slice of the prompt
batch; metrics that average over prompts become cross-device reductions). The model and graph are
replicated. ``jax.jit`` partitions the same computation the single-device path runs: with
configurations sharded, each device runs exactly what one device runs for a chunk of the same
size, bit for bit (a vmap of another width may pick other kernels and differ in the last bits);
with prompts sharded, the reductions over prompts are reassociated, so results agree to float
tolerance.

On several hosts, call ``jax.distributed.initialize()`` first (on every host), build the mesh from
``jax.devices()`` (which then lists every host's devices) and run the same code.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .methods import Problem
from .models import Ablation
from .patching import GatedRun

CONFIGS, PROMPTS = "configs", "prompts"


def make_mesh(configs: int | None = None, prompts: int = 1, devices=None) -> Mesh:
    """A ``configs x prompts`` mesh; by default every device goes to the configuration axis."""
    devices = list(jax.devices() if devices is None else devices)
    if configs is None:
        if len(devices) % prompts:
            raise ValueError(f"{len(devices)} devices cannot be split into a prompts axis of {prompts}")
        configs = len(devices) // prompts
    if configs * prompts != len(devices):
        raise ValueError(f"a {configs} x {prompts} mesh needs {configs * prompts} devices, {len(devices)} are given")
    return Mesh(np.array(devices).reshape(configs, prompts), (CONFIGS, PROMPTS))


def _put(x, mesh: Mesh, spec: PartitionSpec):
    return None if x is None else jax.device_put(x, NamedSharding(mesh, spec))


def _batch_spec(x, axis: int, batch: int) -> PartitionSpec:
    """Shard ``axis`` over prompts when it is the batch axis (not a broadcast axis of size 1)."""
    parts = [None] * x.ndim
    if x.shape[axis] == batch:
        parts[axis] = PROMPTS
    return PartitionSpec(*parts)


def shard_problem(problem: Problem, mesh: Mesh) -> Problem:
    """The problem with its prompt axis split over the mesh's ``prompts`` axis; the rest replicated."""
    run = problem.run
    batch = run.tokens.shape[0]
    n_shards = mesh.shape[PROMPTS]
    if batch % n_shards:
        raise ValueError(f"{batch} prompts cannot be split evenly over {n_shards} devices on the prompts axis; "
                         f"use a multiple of {n_shards} prompts")
    replicated = PartitionSpec()
    model = jax.tree.map(lambda x: _put(x, mesh, replicated), run.model)
    abl = run.ablation
    ablation = Ablation(
        values=_put(abl.values, mesh, _batch_spec(abl.values, 1, batch)),
        base_attn=_put(abl.base_attn, mesh, _batch_spec(abl.base_attn, 1, batch)),
        base_mlp=None if abl.base_mlp is None else _put(abl.base_mlp, mesh, _batch_spec(abl.base_mlp, 1, batch)),
        base_logits=_put(abl.base_logits, mesh, _batch_spec(abl.base_logits, 0, batch)),
    )
    rows = PartitionSpec(PROMPTS)
    sharded_run = GatedRun(
        model, run.graph, _put(run.tokens, mesh, rows), ablation,
        None if run.positions is None else _put(run.positions, mesh, rows),
    )
    inputs = jax.tree.map(lambda x: _put(x, mesh, _batch_spec(x, 0, batch)), problem.inputs)
    labels = {k: _put(v, mesh, rows) for k, v in problem.labels.items()}
    return Problem(sharded_run, inputs, problem.metric, problem.task_name, problem.ablation, labels)


@eqx.filter_jit
def _values(problem: Problem, gates):
    return jax.vmap(problem.value)(gates)


def evaluate_configs(problem: Problem, gates, mesh: Mesh, *, chunk_per_device: int = 8) -> np.ndarray:
    """The metric of every gate configuration ``gates [K, ...]``, configurations spread over the
    mesh's ``configs`` axis and prompts over its ``prompts`` axis, ``chunk_per_device``
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
    out = [np.asarray(_values(problem, _put(jnp.asarray(gates[i : i + step]), mesh, spec))) for i in range(0, padded, step)]
    return np.concatenate(out)[:n]


@eqx.filter_jit
def _gradient(problem: Problem, gates):
    return jax.grad(problem.value)(gates)


def gate_gradient(problem: Problem, gates, mesh: Mesh) -> np.ndarray:
    """``d metric / d gates`` with the prompt batch split over the mesh's ``prompts`` axis."""
    problem = shard_problem(problem, mesh)
    return np.asarray(_gradient(problem, _put(jnp.asarray(gates), mesh, PartitionSpec())))
