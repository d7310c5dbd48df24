"""What the gradient methods share: the gated forward with probes, and exact chunked pullbacks.

**Probes** (``models.Probes``, part of ``gated_forward``): the gate gradient alone cannot express
everything the methods need, so the forward takes four zero-effect extras: ghost gates reading a
fixed difference buffer (EAP-IG over inputs needs clean differences dotted with the gradient of a
run that is not the clean one), an offset on every attention pattern (its gradient is
d loss / d pattern, AtP*'s QK fix), a scaled embedding (EAP-IG over inputs) and GradDrop.

**Pullbacks over prompts.** A method asks for the gradient of
``sum_p w_p * loss(logits at point p)`` over a few *points* (gate vectors, drop layers, ...) with
respect to shared probes (summed over prompts) and per-configuration probes (one per point and
prompt). Configurations are (point, prompt) pairs, evaluated one prompt at a time under ``vmap``.
When all of them fit in one chunk, that is one forward and one backward pass. Otherwise it is
exact for *any* metric, not only for means over prompts: a first chunked forward gives every
configuration's logits, the metric's cotangent with respect to those logits is computed on the
whole batch, and a second chunked pass pulls each chunk's cotangent back (chunks are independent
because a prompt's logits depend only on that prompt). Padding configurations get a zero cotangent.
The first pass keeps every configuration's logits at the read positions (``[configs, k, vocab]``),
and per-configuration probe gradients come back whole; shared probe gradients are summed as the
chunks go.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

from .. import memory
from ..graph import Graph
from ..models import Probes, gated_forward, rows_shared
from ..models._split import split_pullback
from ..patching import (GatedRun, auto_chunk_size, backward_forwards, bytes_per_configuration, chunked_vmap,
                        device_memory_bytes, graph_reads, remat_pays, source_values)
from ._circuit import Circuit
from ._positions import PositionUnits
from ._problem import Problem

# --------------------------------------------------------------------------------------------
# The probed forward: gated_forward with Probes


def run_probed(run: GatedRun, gates: Array, *, ghost: Array | None = None, shared_rows: bool = False,
               **extras) -> Array:
    """``gated_forward`` on a gated run with probes (``models.Probes``); gates and ghost gates are
    gate vectors (not dense layouts). ``shared_rows``: see ``gated_forward`` (set it only when
    ``shares_rows`` holds for the gate values)."""
    graph = run.graph
    probes = Probes(ghost=None if ghost is None else graph.dense(ghost), **extras)
    return gated_forward(run.model, graph.dense(gates), run.ablation, run.tokens, positions=run.positions, probes=probes,
                         reads=graph_reads(graph, shared_rows), remat=bool(run.remat))



def shares_rows(graph: Graph, *gate_vectors) -> bool:
    """Whether, at each of these gate vectors (``[..., n_gates]``), every input of a layer reads the
    same gate row: then the probed forward reads one residual per layer (the plain model's cost)
    and its gate gradients stay exact (``models.shared_rows_read``). True at all gates 1 of every
    graph whose inputs see all earlier sources, and at EAP-IG-activations' group points."""
    for vectors in gate_vectors:
        vectors = np.asarray(vectors)
        for vector in vectors.reshape((-1,) + vectors.shape[-1:]):
            if not rows_shared(graph.dense(vector)):
                return False
    return True


# --------------------------------------------------------------------------------------------
# Uniform points: every gate at one value, gradients from one residual stream (models._split)


def uniform_alphas(graph: Graph, points) -> np.ndarray | None:
    """The gate value of each point (``[n_points, (pos,) n_gates]``) when at every point every
    destination input reads every source before it with one gate value, so that the gated model is
    one residual stream (``models.split_pullback``); None when some point is not so. Holds at every
    uniform gate vector of a graph without internal edges (whose gates multiply the residual
    edges' gates), and at 0 and 1 with them."""
    points = np.asarray(points)
    flat = points.reshape(points.shape[0], -1)
    alphas = flat[:, 0]
    if not np.array_equal(flat, np.broadcast_to(alphas[:, None], flat.shape)):
        return None
    full = _full_reads(graph)
    for alpha in alphas:
        dense = graph.dense(np.full(graph.n_gates, alpha, points.dtype))
        laid = np.concatenate([np.asarray(dense.attn).reshape(-1, graph.n_sources)]
                              + ([np.asarray(dense.mlp)] if dense.mlp is not None else [])
                              + [np.asarray(dense.logits)[None]])
        if not np.array_equal(laid, alpha * full):
            return None
    return alphas.astype(np.float64)


@functools.lru_cache(maxsize=32)
def _full_reads(graph: Graph) -> np.ndarray:
    """``[n_rows, n_sources]``: 1 where a destination row reads a source in the plain model."""
    full = np.zeros((graph._n_rows, graph.n_sources))
    for row, available in graph._dest_info.values():
        full[row, :available] = 1.0
    return full


def split_backward_bytes(problem: Problem, pattern: bool = False) -> int:
    """``memory.split_backward_bytes`` for this problem's model, graph and prompt length."""
    return memory.split_backward_bytes(problem.model.config, problem.graph.n_in, problem.run.tokens.shape[1],
                                       jnp.dtype(problem.model.dtype).itemsize, pattern=pattern)


def uniform_gate_gradients(problem: Problem, alphas, *, per_position: bool = False, per_row: bool = False,
                           chunk_size: int | None = None) -> np.ndarray:
    """``d loss / d gates`` at each uniform point ``alphas[i]`` (see ``uniform_alphas``), exactly the
    gated forward's gradient, from one forward and one backward pass of one residual stream per
    point (``models.split_pullback``): ``[n_points, (n_rows,) (n_pos,) n_gates]``. Prompts are
    chunked as in ``pullback`` (exact for any metric: the cotangent of the logits is taken on the
    whole batch)."""
    chunk = _split_chunk(problem, chunk_size)
    out = []
    for alpha in np.asarray(alphas, np.float64):
        value = None if alpha == 1.0 else jnp.asarray(alpha, problem.model.dtype)  # 1: the plain model itself
        out.append(np.asarray(_jit_split_gradients(computation(problem), value, per_position, per_row, chunk),
                              np.float64))
    return np.stack(out)


def _split_chunk(problem: Problem, chunk_size: int | None, pattern: bool = False, copies: int = 1) -> int:
    """Prompts per chunk of the split path; ``copies`` backward passes at once (GradDrop's drops,
    vmapped over one forward) count as that many whole passes, an upper bound."""
    if chunk_size is None:
        fit = int(0.5 * device_memory_bytes() // max(1.0, copies * split_backward_bytes(problem, pattern)))
        chunk_size = max(1, min(problem.run.tokens.shape[0], fit))
    return int(chunk_size)


def dropped_gradients_and_patterns(problem: Problem, drops, *, pattern: bool = True, chunk_size: int | None = None):
    """At all gates 1, for each GradDrop layer of ``drops`` (-1: none): ``d loss / d gates``
    ``[n_drops, n_gates]`` and (``pattern``, else None) ``d loss / d pattern`` ``[n_drops, n_prompts,
    L, H, q, k]``, from one residual stream (``models.split_pullback``), as the gated forward's
    probes give them (``drop_layer_logits``). The forward's value does not depend on the drop, so it
    runs once and only the backward pass is vmapped over the drops."""
    drops = np.asarray(drops, np.int32)
    chunk = _split_chunk(problem, chunk_size, pattern=pattern, copies=len(drops))
    out = _jit_dropped_split_gradients(computation(problem), chunk, jnp.asarray(drops), pattern)
    grads, patterns = out if pattern else (out, None)
    return np.asarray(grads, np.float64), patterns


@eqx.filter_jit
def _jit_dropped_split_gradients(problem: Problem, chunk: int, drops, pattern: bool):
    return jax.vmap(lambda drop: _split_gradients(problem, None, False, False, chunk, drop, pattern))(drops)


def _split_gradients(problem: Problem, alpha, per_position: bool, per_row: bool, chunk: int, drop=-1,
                     pattern: bool = False):
    """``d loss / d gates`` at the uniform point ``alpha`` (None: 1), chunked over prompts; with
    ``pattern`` also ``d loss / d pattern`` per prompt ``[n_prompts, L, H, q, k]``."""
    run, graph = problem.run, problem.graph
    n_rows, n_pos = run.tokens.shape
    level = 1.0 if alpha is None else alpha
    point = jnp.full((n_pos, graph.n_gates) if per_position else (graph.n_gates,), level, problem.model.dtype)
    _, to_vector = jax.vjp(graph.dense, point)
    if per_row:
        to_vector = jax.vmap(to_vector)

    def pullback_of(rows: GatedRun):
        logits, pull = split_pullback(rows.model, rows.ablation, rows.tokens, alpha, n_in=graph.n_in,
                                      positions=rows.positions, per_position=per_position, per_row=per_row,
                                      pattern=pattern, drop_layer=drop)

        def gates_and_pattern(ct):  # the gate vector's gradient, and the pattern's with the rows first
            if not pattern:
                return to_vector(pull(ct))[0], None
            dense, d_pattern = pull(ct)
            return to_vector(dense)[0], jnp.moveaxis(d_pattern, 2, 0)

        return logits, gates_and_pattern

    def loss(logits):
        return problem.metric.loss(logits, problem.inputs)

    def result(grads, d_pattern):
        return (grads, d_pattern) if pattern else grads

    if n_rows <= chunk:
        logits, pull = pullback_of(run)
        return result(*pull(jax.grad(loss)(logits)))

    # pass 1: the logits chunk by chunk, the cotangent on the whole batch; pass 2: pull each chunk's
    # cotangent back (padding rows repeat row 0 and carry a zero cotangent)
    index = _to_chunks(jnp.arange(n_rows, dtype=jnp.int32), chunk, False)
    logits = _from_chunks(lax.map(lambda i: pullback_of(run.rows(i))[0], index), n_rows)
    cotangent = _to_chunks(jax.grad(loss)(logits), chunk, True)

    def body(total, chunk_in):
        i, ct = chunk_in
        _, pull = pullback_of(run.rows(i))
        grads, d_pattern = pull(ct)
        if per_row:
            return total, (grads, d_pattern)
        return total + grads.astype(total.dtype), (None, d_pattern)

    total = jnp.zeros(point.shape, jnp.promote_types(point.dtype, jnp.float32))
    total, (per_chunk, d_pattern) = lax.scan(body, total, (index, cotangent))
    return result(_from_chunks(per_chunk, n_rows) if per_row else total,
                  None if d_pattern is None else _from_chunks(d_pattern, n_rows))


_jit_split_gradients = eqx.filter_jit(_split_gradients)


# --------------------------------------------------------------------------------------------
# Pullbacks over (point, prompt) configurations

# logits_fn(run_of_one_prompt, row, point, aux, shared, per_config) -> logits [1, k, vocab]
LogitsFn = Callable[..., Array]


def grad_chunk_size(problem: Problem, n_configs: int, *, fraction: float = 0.5, remat: bool | None = None) -> int:
    """How many (point, prompt) configurations fit in memory for a forward and backward pass.

    A backward pass keeps every layer's difference buffer and work, so one prompt costs about
    ``2 n_layers + 2`` gated forwards' worth of activations; with recomputed layers (``remat``,
    default: the run's) about ``patching.REMAT_FORWARDS`` (``patching.backward_forwards``).
    """
    n_rows = problem.run.tokens.shape[0]
    remat = bool(problem.run.remat) if remat is None else remat
    per_config = bytes_per_configuration(problem.run) / n_rows * backward_forwards(problem.model.config.n_layers, remat)
    fit = int(fraction * device_memory_bytes() // max(1.0, per_config))
    return int(max(1, min(n_configs, fit)))


def pullback(
    problem: Problem,
    logits_fn: LogitsFn,
    *,
    n_points: int,
    weights,
    aux=None,
    shared=None,
    per_config=None,
    chunk_size: int | None = None,
):
    """Gradients of ``sum_p weights[p] * problem.metric.loss(logits at point p)``.

    Configurations are point-major: configuration ``c`` is point ``c // n_rows``, prompt
    ``c % n_rows``. ``shared`` probes get gradients summed over all configurations; ``per_config``
    probes (leading axis ``n_points * n_rows``) get one gradient per configuration. Returns
    ``(losses [n_points], shared_grad, per_config_grad)``.
    """
    n_rows = problem.run.tokens.shape[0]
    n_configs = n_points * n_rows
    rows = jnp.tile(jnp.arange(n_rows, dtype=jnp.int32), n_points)
    points = jnp.repeat(jnp.arange(n_points, dtype=jnp.int32), n_rows)
    weights = jnp.asarray(weights, problem.model.dtype)
    problem = with_auto_remat(problem, n_configs if chunk_size is None else None)
    if chunk_size is None:
        chunk_size = grad_chunk_size(problem, n_configs)
    chunk_size = int(chunk_size)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _jit_pullback(computation(problem), logits_fn, aux, shared, per_config, rows, points, weights, n_points, chunk_size)


def with_auto_remat(problem: Problem, n_configs: int | None) -> Problem:
    """The problem with its run's ``remat`` decided: as set, or (None) on when ``n_configs``
    configurations would not fit one chunk of a plain backward pass and recomputing the layers
    keeps less on this depth. ``n_configs=None`` (the caller fixed the chunk): off unless set."""
    if problem.run.remat is not None:
        return problem
    need = n_configs is not None and remat_pays(problem.model.config.n_layers) and \
        grad_chunk_size(problem, n_configs, remat=False) < n_configs
    return problem.with_remat(bool(need))


def computation(problem: Problem) -> Problem:
    """The problem without its labels (task name, ablation name), which the numbers do not depend on:
    problems that differ only in labels share every compiled function."""
    return Problem(problem.run, problem.inputs, problem.metric, "", "")


def _configs_logits(problem, logits_fn, aux, shared, rows, points, per_config):
    def one(row, point, pc):
        return logits_fn(problem.run.rows(row[None]), row, point, aux, shared, pc)

    return jax.vmap(one)(rows, points, per_config)


def _weighted_losses(problem: Problem, logits: Array, weights: Array, n_points: int):
    per_point = logits.reshape((n_points, -1) + logits.shape[2:])
    losses = jax.vmap(lambda lg: problem.metric.loss(lg, problem.inputs))(per_point)
    return (weights * losses).sum(), losses


@eqx.filter_jit
def _jit_pullback(problem, logits_fn, aux, shared, per_config, rows, points, weights, n_points: int, chunk: int):
    n_configs = rows.shape[0]
    if n_configs <= chunk:
        def objective(shared, per_config):
            logits = _configs_logits(problem, logits_fn, aux, shared, rows, points, per_config)
            return _weighted_losses(problem, logits, weights, n_points)

        (g_shared, g_config), losses = jax.grad(objective, argnums=(0, 1), has_aux=True)(shared, per_config)
        return losses, g_shared, g_config

    # pass 1: every configuration's logits, chunk by chunk; the cotangent on the whole batch
    logits = chunked_vmap(
        lambda x: logits_fn(problem.run.rows(x[0][None]), x[0], x[1], aux, shared, x[2]),
        (rows, points, per_config),
        chunk,
    )
    cotangent, losses = jax.grad(lambda lg: _weighted_losses(problem, lg, weights, n_points), has_aux=True)(logits)

    # pass 2: pull each chunk's cotangent back; padding configurations carry a zero cotangent
    xs = (
        _to_chunks(rows, chunk, False),
        _to_chunks(points, chunk, False),
        _to_chunks(cotangent, chunk, True),
        jax.tree.map(lambda x: _to_chunks(x, chunk, True), per_config),
    )

    def body(total, x):
        r, p, cot, pc = x
        _, vjp = jax.vjp(lambda s, c: _configs_logits(problem, logits_fn, aux, s, r, p, c), shared, pc)
        g_shared, g_config = vjp(cot)
        return jax.tree.map(lambda t, g: t + g.astype(t.dtype), total, g_shared), g_config

    # the sum over chunks in at least float32: bf16 runs would otherwise round every partial sum
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shared)
    g_shared, g_config = lax.scan(body, total, xs)
    g_config = jax.tree.map(lambda y: _from_chunks(y, n_configs), g_config)
    return losses, g_shared, g_config


def _to_chunks(x: Array, chunk: int, fill_zero: bool) -> Array:
    """``[n, ...] -> [ceil(n / chunk), chunk, ...]``, padded with zeros or with copies of ``x[0]``."""
    pad = -x.shape[0] % chunk
    if pad:
        filler = jnp.zeros_like(x[:1]) if fill_zero else x[:1]
        x = jnp.concatenate([x, jnp.repeat(filler, pad, axis=0)], axis=0)
    return x.reshape((-1, chunk) + x.shape[1:])


def _from_chunks(y: Array, n: int) -> Array:
    """The inverse of ``_to_chunks``: ``[n_chunks, chunk, ...] -> [n, ...]``, padding dropped."""
    return y.reshape((-1,) + y.shape[2:])[:n]


# --------------------------------------------------------------------------------------------
# Logits functions (module-level, so that they are static and hashable under jit)


def input_difference_aux(problem: Problem) -> dict:
    """The ``aux`` entries an input-path pullback needs: the clean run's source differences
    ``x_s - x~_s`` and the base of the internal-edge ghost gates (1 on internal edges, else 0)."""
    dtype = problem.model.dtype
    graph, run = problem.graph, problem.run
    internal = np.zeros(graph.n_gates)
    if graph.level == "edge" and graph.internal_edges:
        internal[graph.indices(graph.internal_edge_names)] = 1.0
    clean_deltas = source_values(run.model, run.tokens) - run.ablation.values
    return {"clean_deltas": clean_deltas.astype(dtype), "ghost_base": jnp.asarray(internal, dtype)}


def fold_internal_edges(graph: Graph, grad: np.ndarray) -> np.ndarray:
    """Input-path scores ``[..., n_gates]`` for internal edges, in place: an internal edge gates its
    input's whole difference, so its score is the sum of that input's residual edges' scores."""
    for name in graph.internal_edge_names if graph.level == "edge" else ():
        dst, _ = graph.split_edge(name)  # "a{l}.{h}.t->a{l}.{h}": the input is the edge's tail
        grad[..., graph.index(name)] = sum(grad[..., graph.index(f"{src}->{dst}")] for src in graph.sources_of(dst))
    return grad


def gate_point_logits(run: GatedRun, row, point, aux, shared, per_config) -> Array:
    """Gates ``aux["gates"][point] + shared[point]``, plus ``per_config`` when given (per-prompt offsets)."""
    gates = aux["gates"][point] + shared[point]
    if per_config is not None:
        gates = gates + per_config
    return run_probed(run, gates, shared_rows=aux.get("shared_rows", False))


def embed_path_logits(run: GatedRun, row, point, aux, shared, per_config) -> Array:
    """All gates at 1, the embedding interpolated by ``aux["alphas"][point]``; ``shared[point]`` are ghost gates."""
    ghost_deltas = jnp.take(aux["clean_deltas"], row[None], axis=1)
    return run_probed(
        run,
        aux["gates"],
        ghost=aux["ghost_base"] + shared[point],
        ghost_deltas=ghost_deltas,
        embed_scale=aux["alphas"][point],
        shared_rows=aux.get("shared_rows", False),
    )


def drop_layer_logits(run: GatedRun, row, point, aux, shared, per_config) -> Array:
    """Gates at 1 (``aux["gates"]`` + ``shared[point]``), GradDrop at ``aux["drop"][point]``, pattern offsets per config."""
    return run_probed(
        run,
        aux["gates"] + shared[point],
        pattern_offset=per_config,
        drop_layer=aux["drop"][point],
        shared_rows=aux.get("shared_rows", False),
    )


# --------------------------------------------------------------------------------------------
# Exact single-unit ablations (the ground truth the estimates approximate)


def exact_unit_effects(
    problem: Problem, *, base: float = 1.0, value: float = 0.0, chunk_size: int | None = None
) -> np.ndarray:
    """``loss(all gates base, unit i at value) - loss(all gates base)`` for every gate unit i.

    At ``base=1, value=0`` it is the exact effect of removing one edge (or node) alone on the
    lower-is-better loss, the quantity attribution scores estimate, with their sign convention
    (positive = the unit supports the clean behaviour). One vmapped batch of ``n_gates + 1`` runs,
    one compilation for every ``base``/``value`` (central finite differences use ``value = 1 +- eps``).
    """
    n = problem.graph.n_gates
    if chunk_size is None:
        chunk_size = auto_chunk_size(problem.run, n + 1)
    dtype = problem.model.dtype
    losses = _jit_unit_losses(computation(problem), jnp.asarray(base, dtype), jnp.asarray(value, dtype), int(chunk_size))
    losses = np.asarray(losses, np.float64)
    return losses[1:] - losses[0]


@eqx.filter_jit
def _jit_unit_losses(problem: Problem, base, value, chunk: int):
    n = problem.graph.n_gates
    gates = jnp.full((n,), base, problem.model.dtype)

    def one(i):  # i = -1 changes nothing: the loss at ``base`` itself
        return problem.loss(jnp.where(jnp.arange(n) == i, value, gates))

    return chunked_vmap(one, jnp.arange(-1, n, dtype=jnp.int32), chunk)


def qk_edge_table(graph: Graph) -> np.ndarray:
    """``[n_layers, n_heads, 2, n_sources + 1]`` gate index of ``src->a{l}.{h}.q|k`` (-1: no such edge).

    The last source slot is the internal edge ``a{l}.{h}.q|k->a{l}.{h}`` when the graph lists it.
    With k inputs per key/value head the k slots of a group's heads name the same edge
    ``src->a{l}.g{j}.k`` (its effect on the pattern is the sum of theirs).
    """
    table = np.full((graph.n_layers, graph.n_heads, 2, graph.n_sources + 1), -1, np.int64)
    index = graph._gate_index
    for layer in range(graph.n_layers):
        for h in range(graph.n_heads):
            for t_i, t in enumerate(("q", "k")):
                dst = graph.input_of(layer, h, t)
                for s, src in enumerate(graph.sources):
                    table[layer, h, t_i, s] = index.get(f"{src}->{dst}", -1)
                table[layer, h, t_i, -1] = index.get(f"{dst}->a{layer}.{h}", -1)
    return table


# --------------------------------------------------------------------------------------------
# From scores to a Circuit

# metrics whose minimum is the clean model: their gradient at all gates 1 vanishes
MINIMUM_AT_CLEAN = ("kl", "l2", "mse")


def attribution_circuit(
    problem: Problem,
    method: str,
    signed: np.ndarray,
    *,
    absolute: bool,
    top_n: int | None,
    threshold: float | None,
    started: float,
    settings: dict,
    extra: dict | None = None,
    scores: np.ndarray | None = None,
    positions: PositionUnits | None = None,
) -> Circuit:
    """A ``Circuit`` from signed estimates: ``scores`` are ``|signed|`` with ``absolute``, else ``signed``.

    ``kept`` is the ``top_n`` highest scores, or every unit scoring at least ``threshold``; with
    neither, nothing is cut (``kept`` is empty and ``metric_value`` is None): the scores are a
    ranking, and the caller decides where to cut it. With ``positions``, ``signed`` is
    ``[n_units, n_gates]`` and the units are (gate, position unit) pairs.
    """
    signed = np.asarray(signed, np.float64)
    if scores is None:
        scores = np.abs(signed) if absolute else signed
    if top_n is not None and threshold is not None:
        raise ValueError("give top_n or threshold, not both")
    graph = problem.graph
    names = graph.gate_names if positions is None else positions.unit_names(graph.gate_names)
    flat = np.asarray(scores, np.float64).reshape(-1)
    kept: tuple[str, ...] = ()
    metric_value = None
    if top_n is not None:
        if not 0 <= int(top_n) <= len(names):
            raise ValueError(f"top_n must be between 0 and {len(names)}, got {top_n}")
        order = np.argsort(-np.nan_to_num(flat, nan=-np.inf), kind="stable")[: int(top_n)]
        kept = tuple(names[i] for i in sorted(order))
    elif threshold is not None:
        kept = tuple(names[i] for i in np.flatnonzero(np.nan_to_num(flat, nan=-np.inf) >= threshold))
    if top_n is not None or threshold is not None:
        mask = np.zeros(flat.size, np.float32)
        lookup = {n: i for i, n in enumerate(names)}
        mask[[lookup[n] for n in kept]] = 1.0
        if positions is not None:
            mask = positions.expand(mask.reshape(positions.n_units, graph.n_gates))
        metric_value = computation(problem).evaluate(jnp.asarray(mask, problem.model.dtype))
    extra = dict(extra or {})
    extra.setdefault("signed", signed)
    return Circuit.of(
        problem,
        method,
        scores=scores,
        kept=kept,
        threshold=None if threshold is None else float(threshold),
        metric_value=metric_value,
        seconds=time.perf_counter() - started,
        settings={
            **settings,
            "metric_options": [list(o) for o in problem.metric.options],
            "absolute": bool(absolute),
            "top_n": top_n,
        },
        extra=extra,
        positions=positions,
    )
