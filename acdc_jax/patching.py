"""Patching as data: ablation caches and the gated run, evaluated for one or thousands of gate vectors.

A ``GatedRun`` bundles a model, a graph, clean tokens and an ``Ablation`` (what gate 0 means:
the corrupted run, zeros, or a dataset mean). It is an Equinox module, so it passes through
``jax.jit``/``vmap``/``grad`` as data; its evaluators compile once per shape.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .graph import Graph
from .models import Ablation, InputError, Transformer, check_tokens, forward, gated_forward, run_with_sources

AblationMode = Literal["corrupt", "zero", "mean"]


# --------------------------------------------------------------------------------------------
# Ablations


@eqx.filter_jit
def _sources(model: Transformer, tokens: Array, pos_ids: Array | None) -> Array:
    return run_with_sources(model, tokens, pos_ids=pos_ids).values


def source_values(model: Transformer, tokens: Int[Array | np.ndarray, "batch pos"], *, pos_ids=None) -> Float[Array, "n_sources batch pos d_model"]:
    """Every source's output on ``tokens``: ``embed``, each head's ``z @ W_O[h]``, each MLP's output."""
    check_tokens(model.config, tokens)
    return _sources(model, jnp.asarray(tokens), None if pos_ids is None else jnp.asarray(pos_ids))


def corrupt_ablation(model: Transformer, corrupt_tokens: Int[Array | np.ndarray, "batch pos"], *, pos_ids=None) -> Ablation:
    """Gate 0 takes the source's value in the run on ``corrupt_tokens`` (optionally with permuted positions)."""
    return Ablation.from_values(model, source_values(model, corrupt_tokens, pos_ids=pos_ids))


def zero_ablation(model: Transformer) -> Ablation:
    """Gate 0 removes the source's contribution entirely (``b_O`` constants stay, as in ACDC)."""
    cfg = model.config
    return Ablation.from_values(model, jnp.zeros((cfg.n_sources, 1, 1, cfg.d_model), model.dtype))


def mean_ablation(model: Transformer, reference_tokens: Int[Array | np.ndarray, "batch pos"], *, per_position: bool = True) -> Ablation:
    """Gate 0 takes the source's mean over a reference dataset (per position, or over positions too)."""
    values = source_values(model, reference_tokens)
    axes = (1,) if per_position else (1, 2)
    return Ablation.from_values(model, values.mean(axis=axes, keepdims=True))


def make_ablation(
    model: Transformer,
    mode: AblationMode,
    *,
    corrupt_tokens=None,
    reference_tokens=None,
    pos_ids=None,
    per_position: bool = True,
) -> Ablation:
    if mode == "corrupt":
        if corrupt_tokens is None:
            raise InputError("corrupt ablation needs corrupt_tokens")
        return corrupt_ablation(model, corrupt_tokens, pos_ids=pos_ids)
    if mode == "zero":
        return zero_ablation(model)
    if mode == "mean":
        if reference_tokens is None:
            raise InputError("mean ablation needs reference_tokens (the dataset to average over)")
        return mean_ablation(model, reference_tokens, per_position=per_position)
    raise InputError(f"unknown ablation {mode!r}; choose 'corrupt', 'zero' or 'mean'")


# --------------------------------------------------------------------------------------------
# The gated run


def graph_reads(graph: Graph, shared_rows: bool = False) -> str:
    """How the gated forward reads a layer's inputs on this graph (``gated_forward``'s ``reads``):
    node gates read one residual per layer (every row of a node graph is the same); edge gates
    whose rows are shared (``shares_rows``) broadcast one read; other edge gates read densely."""
    if graph.level == "node":
        return "single"
    return "shared" if shared_rows else "dense"


class GatedRun(eqx.Module):
    """Clean tokens, an ablation and a graph: ``run(gates)`` gives the gated logits.

    ``positions`` (``[batch, k]``) restricts the unembedding to the positions a metric reads;
    ``pos_ids`` overrides the position ids of the clean run (rarely needed).

    ``remat``: whether gradients through this run recompute its layers instead of keeping every
    layer's difference buffer (``gated_forward``'s ``remat``: two buffers instead of ``n_layers +
    2``, for one more forward). ``None`` (default): the gradient methods decide, turning it on when
    a backward pass over all their configurations at once would not fit (``backward_forwards``);
    elsewhere None is off. ``run.with_remat(True)`` forces it (learned masks on a big model, say).
    """

    model: Transformer
    graph: Graph = eqx.field(static=True)
    tokens: Int[Array, "batch pos"] = eqx.field(converter=jnp.asarray)
    ablation: Ablation
    positions: Int[Array, "batch k"] | None = eqx.field(default=None, converter=lambda p: None if p is None else jnp.asarray(p))
    remat: bool | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if isinstance(self.tokens, jax.core.Tracer):
            return
        check_tokens(self.model.config, self.tokens)
        g = self.graph
        cfg = self.model.config
        if (g.n_layers, g.n_heads, g.has_mlp) != (cfg.n_layers, cfg.n_heads, cfg.has_mlp):
            raise InputError(f"the graph ({g.describe()}) does not belong to this model ({cfg.n_layers} layers, {cfg.n_heads} heads)")
        if g.kv_heads is not None and g.kv_heads != cfg.kv_heads:
            raise InputError(f"the graph ({g.describe()}) groups k/v by {g.kv_heads} key/value heads; this model has "
                             f"{cfg.kv_heads}: build it with Graph.from_model(model, kv_groups=True)")
        batch, n_pos = self.tokens.shape
        abl_batch, abl_pos = self.ablation.values.shape[1:3]
        if abl_batch not in (1, batch) or abl_pos not in (1, n_pos):
            raise InputError(
                f"the ablation has batch x pos {abl_batch} x {abl_pos} but the clean tokens are {batch} x {n_pos}; "
                "clean and corrupted prompts must have the same shape, position by position"
            )
        if self.positions is not None and (self.positions.ndim != 2 or self.positions.shape[0] != batch):
            raise InputError(f"positions must be [batch={batch}, k], got {self.positions.shape}")

    def rows(self, index) -> "GatedRun":
        """The same run on a subset of prompts."""
        index = jnp.asarray(index)
        positions = None if self.positions is None else self.positions[index]
        return dataclasses.replace(self, tokens=self.tokens[index], ablation=self.ablation.rows(index), positions=positions)

    def with_remat(self, remat: bool | None = True) -> "GatedRun":
        """The same run, differentiated with (True) or without (False) recomputed layers, or as the
        methods decide (None)."""
        return dataclasses.replace(self, remat=remat)

    # pure functions (call these inside your own jit/grad/vmap)

    def logits(self, gates: Float[Array, "*gate_pos n_gates"]) -> Float[Array, "batch k d_vocab_out"]:
        return gated_forward(self.model, self.graph.dense(gates), self.ablation, self.tokens, positions=self.positions,
                             reads=graph_reads(self.graph), remat=bool(self.remat))

    def logits_from(self, start_layer, deltas: Array, gates: Array) -> Float[Array, "batch k d_vocab_out"]:
        """Gated logits running only layers ``start_layer..`` on top of cached differences."""
        return gated_forward(
            self.model, self.graph.dense(gates), self.ablation, positions=self.positions, start_layer=start_layer, deltas=deltas,
            reads=graph_reads(self.graph),
        )

    def clean_logits(self) -> Float[Array, "batch k d_vocab_out"]:
        return forward(self.model, self.tokens, positions=self.positions)

    def ablated_logits(self) -> Float[Array, "batch k d_vocab_out"]:
        """Logits with every gate at 0 (the fully ablated model)."""
        return self.logits(self.graph.gates(0.0, self.model.dtype))

    def clean_deltas(self) -> Float[Array, "n_sources batch pos d_model"]:
        """``x_s - x~_s`` for every source on the clean run: the state of a run with all gates at 1."""
        return _sources(self.model, self.tokens, None) - self.ablation.values

    # jitted entry points

    def __call__(self, gates: Float[Array | np.ndarray, "*gate_pos n_gates"]) -> Float[Array, "batch k d_vocab_out"]:
        return _jit_logits(self, jnp.asarray(gates))

    def batched(self, gates: Float[Array | np.ndarray, "configs *gate_pos n_gates"], *, chunk_size: int | None = None) -> Array:
        """Logits for a batch of gate vectors, vmapped, in chunks of ``chunk_size`` (default: what fits)."""
        gates = jnp.asarray(gates)
        if chunk_size is None:
            chunk_size = auto_chunk_size(self, gates.shape[0])
        return _jit_batched_logits(self, gates, int(chunk_size))

    def map_gates(self, fn: Callable, gates: Array, *, chunk_size: int | None = None) -> Array:
        """``fn(run, gates_i)`` for every gate vector, vmapped in chunks; ``fn`` must be a pure function."""
        if chunk_size is None:
            chunk_size = auto_chunk_size(self, gates.shape[0])
        return _jit_map_gates(self, fn, jnp.asarray(gates), int(chunk_size))


@eqx.filter_jit
def _jit_logits(run: GatedRun, gates: Array) -> Array:
    return run.logits(gates)


@eqx.filter_jit
def _jit_batched_logits(run: GatedRun, gates: Array, chunk_size: int) -> Array:
    return chunked_vmap(run.logits, gates, chunk_size)


@eqx.filter_jit
def _jit_map_gates(run: GatedRun, fn: Callable, gates: Array, chunk_size: int) -> Array:
    return chunked_vmap(lambda g: fn(run, g), gates, chunk_size)


def chunked_vmap(fn: Callable, xs, chunk_size: int):
    """``jax.vmap(fn)(xs)`` computed ``chunk_size`` rows at a time (``lax.map`` over chunks).

    ``xs`` is an array or pytree of arrays sharing a leading axis. The last chunk is padded by
    repeating the first row, and the padding is dropped from the result.
    """
    leaves = jax.tree.leaves(xs)
    n = leaves[0].shape[0]
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if n <= chunk_size:
        return jax.vmap(fn)(xs)
    n_chunks = math.ceil(n / chunk_size)
    pad = n_chunks * chunk_size - n

    def to_chunks(x):
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0)
        return x.reshape((n_chunks, chunk_size) + x.shape[1:])

    out = jax.lax.map(jax.vmap(fn), jax.tree.map(to_chunks, xs))
    return jax.tree.map(lambda y: y.reshape((n_chunks * chunk_size,) + y.shape[2:])[:n], out)


def device_memory_bytes() -> int:
    """Memory of the default device: the accelerator's limit, or on CPU the machine's RAM."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


def bytes_per_configuration(run: GatedRun) -> int:
    """Rough peak activation memory of one gated forward: the difference buffer plus one layer's work."""
    batch, n_pos = run.tokens.shape
    return activation_bytes(run.model.config, run.graph.n_in, batch, n_pos, jnp.dtype(run.model.dtype).itemsize)


def activation_bytes(cfg, n_in: int, batch: int, n_pos: int, itemsize: int) -> int:
    """``bytes_per_configuration`` from shapes alone: the difference buffer ``[n_sources, batch,
    pos, d_model]`` plus one layer's work (its ``n_in`` inputs and a few residual-sized
    temporaries, two attention patterns per head, the MLP's hidden layer twice)."""
    act = batch * n_pos * cfg.d_model * itemsize
    per_layer = (n_in + 4) * act + batch * cfg.n_heads * n_pos * n_pos * itemsize * 2
    if cfg.has_mlp:
        per_layer += 2 * batch * n_pos * cfg.d_mlp * itemsize
    return cfg.n_sources * act + per_layer


# A backward pass through the gated forward keeps every layer's difference buffer and that layer's
# work (a scan saves its carry and residuals per step): measured at 1.7-2.1 x n_layers forwards' worth
# (``compiled temp bytes / bytes_per_configuration``, benchmarks/memory_scaling.py, 4-16 layers).
# With recomputed layers (``remat``) it keeps the input and output buffers and the work of one layer
# and its pullback: measured at 6.3-8.5 forwards' worth at 4-16 layers (9: the largest, rounded up).
REMAT_FORWARDS = 9


def backward_forwards(n_layers: int, remat: bool) -> int:
    """How many gated forwards' worth of activations (``bytes_per_configuration``) one backward pass
    keeps alive, without or with recomputed layers."""
    return REMAT_FORWARDS if remat else 2 * n_layers + 2


def remat_pays(n_layers: int) -> bool:
    """Whether recomputing the layers keeps less than a plain backward pass on this depth."""
    return backward_forwards(n_layers, True) < backward_forwards(n_layers, False)


def auto_chunk_size(run: GatedRun, n_configs: int, *, fraction: float = 0.5) -> int:
    """The largest chunk of gate configurations whose activations fit in ``fraction`` of free memory."""
    fit = int(fraction * device_memory_bytes() // max(1, bytes_per_configuration(run)))
    return int(max(1, min(n_configs, fit)))
