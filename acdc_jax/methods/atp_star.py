"""AtP* (Kramar et al. 2024): attribution patching with the QK fix and GradDrop, on our edge gates.

Plain AtP on our graph is EAP: ``est_e = -(d loss / d g_e)`` at all gates 1, the first-order
estimate of ``loss(g_e = 0) - loss(all gates 1)`` (``loss`` = ``Metric.loss``, lower is better;
positive = the edge supports the clean behaviour). AtP* corrects two failure modes.

**QK fix.** Ablating an edge into a head's query or key input changes that input by
``-(x_s - x~_s)`` at every position (internal edge ``a.h.q|k -> a.h``: the whole input becomes
its ablated value). Through the softmax, a linear estimate misses saturated patterns. For such an
edge we compute *exactly* the new query (or key) -- LayerNorm and projection included -- the new
attention scores against the unchanged clean keys (or queries), and the new softmax pattern
``A'``; only the effect of the pattern change on the loss is linearised::

    est_e = sum_{prompt, query, key} (A' - A) * d loss / d A

with ``A`` the clean pattern of that head. Everything downstream of the pattern (the value mix,
later layers, the metric) is linear in this estimate; where it is linear in fact (one attention
layer, no LayerNorm after it, a metric linear in the logits) the estimate is exact. Edges into
``v`` inputs, MLPs and ``logits`` keep the plain estimate. An edge into a key/value group's k input
(``Graph.kv_heads``) changes the keys of every head of the group: its estimate is the sum of theirs.

**GradDrop.** Direct and indirect paths of an edge can cancel in the gradient. For each layer
``l`` we recompute every estimate (QK fix included) with the gradient through layer ``l``'s heads
and MLP outputs dropped (``stop_gradient`` on what layer ``l`` writes into the residual stream),
which removes every path through that layer. An edge into layer ``m`` has no path through layers
``< m`` (those estimates equal the plain one) and none at all through ``m`` itself (0), so the
GradDrop score averages the magnitudes over the layers other than the destination's::

    score_e = mean_{l != layer(dst e)} |est_e with layer l dropped|

(Kramar et al. sum the L magnitudes and divide by L - 1; that is the same average for every edge
into a layer, and ``L / (L - 1)`` times larger for edges into ``logits``, which no drop touches.)
It is a magnitude: cancelling edges get the size of their largest surviving part. With
``graddrop=True`` the circuit's scores are these magnitudes; the signed AtP (+ QK fix) estimates
are in ``circuit.extra["signed"]`` and the per-layer estimates in ``extra["graddrop_layers"]``.
"""

from __future__ import annotations

import functools
import math
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..models import Ablation
from ..models import attention_pattern, queries_keys, rotary_tables
from ..models._transformer import _block_at, layer_segments
from ..patching import source_values
from ._circuit import Circuit
from ._gradients import (
    MINIMUM_AT_CLEAN,
    attribution_circuit,
    computation,
    drop_layer_logits,
    dropped_gradients_and_patterns,
    grad_chunk_size,
    pullback,
    qk_edge_table,
    shares_rows,
    uniform_alphas,
)
from ._problem import Problem


def atp_estimates(
    problem: Problem, *, qk_fix: bool = True, graddrop: bool = True, chunk_size: int | None = None
) -> np.ndarray:
    """Signed estimates ``[1 + L, n_gates]`` if ``graddrop`` else ``[1, n_gates]``.

    Row 0 is AtP (with the QK fix when asked), row ``1 + l`` the same with layer ``l``'s gradient
    dropped.
    """
    graph = problem.graph
    if graph.level != "edge":
        raise ValueError("atp-star works on edge-level graphs; use eap or hisp for nodes")
    if qk_fix and not graph.qkv_split:
        raise ValueError("the QK fix needs separate q/k/v inputs: build the graph with qkv_split=True")
    cfg = problem.model.config
    dtype = problem.model.dtype
    n_rows, n_pos = problem.run.tokens.shape
    drops = np.arange(-1, cfg.n_layers if graddrop else 0, dtype=np.int32)
    n_points = len(drops)
    ones = graph.gates(1.0, dtype)
    if uniform_alphas(graph, ones[None]) is not None:  # one residual stream per drop: the plain model's cost
        grad_gates, d_pattern = dropped_gradients_and_patterns(problem, drops, pattern=qk_fix, chunk_size=chunk_size)
    else:  # a graph whose inputs do not read every earlier source at gates 1 keeps the gated forward
        pattern = None
        if qk_fix:
            pattern = jnp.zeros((n_points * n_rows, cfg.n_layers, cfg.n_heads, 1, n_pos, n_pos), dtype)
        _, grad_gates, grad_pattern = pullback(
            problem,
            drop_layer_logits,
            n_points=n_points,
            weights=jnp.ones(n_points),
            aux={"gates": ones, "drop": jnp.asarray(drops), "shared_rows": shares_rows(graph, ones)},
            shared=jnp.zeros((n_points, graph.n_gates), dtype),
            per_config=pattern,
            chunk_size=chunk_size,
        )
        if qk_fix:
            d_pattern = grad_pattern.reshape((n_points, n_rows) + grad_pattern.shape[1:])[:, :, :, :, 0]
    estimates = -np.asarray(grad_gates, np.float64)
    if qk_fix:
        if chunk_size is None:
            chunk_size = grad_chunk_size(problem, n_rows)
        exact = np.asarray(_jit_qk_fix(computation(problem), d_pattern, int(chunk_size)), np.float64)  # [P, L, H, 2, S+1]
        table = qk_edge_table(graph)
        where = table >= 0
        estimates[:, np.unique(table[where])] = 0.0  # a grouped k edge changes every head of its group:
        np.add.at(estimates, (slice(None), table[where]), exact[:, where])  # the sum of their pattern effects
    return estimates


def graddrop_scores(problem: Problem, estimates: np.ndarray) -> np.ndarray:
    """Mean over the layers other than each edge's destination layer of ``|estimate with that layer dropped|``."""
    graph = problem.graph
    n_layers = graph.n_layers
    dst_layer = graph.edge_layers()
    per_layer = np.abs(estimates[1:])  # [L, n_gates]
    other = np.arange(n_layers)[:, None] != dst_layer[None, :]
    count = other.sum(0)
    mean = (per_layer * other).sum(0) / np.maximum(count, 1)
    return np.where(count > 0, mean, np.abs(estimates[0]))


def atp_star(
    problem: Problem,
    *,
    qk_fix: bool = True,
    graddrop: bool = True,
    absolute: bool = False,
    top_n: int | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
) -> Circuit:
    """AtP* scores for every edge (see the module docstring).

    ``qk_fix``/``graddrop`` switch the two corrections (both off: plain EAP). Scores are the
    GradDrop magnitudes with ``graddrop``, else the signed (or, with ``absolute``, absolute)
    estimates. ``top_n``, ``threshold``, ``chunk_size`` as in ``eap``.
    """
    if problem.metric.name in MINIMUM_AT_CLEAN:
        warnings.warn(
            f"AtP* with {problem.metric.name!r}: the clean model is this metric's minimum, so the gradient with "
            "respect to every gate and attention pattern is zero and so is every estimate; use a metric such as "
            "logit_diff, or eap-ig",
            stacklevel=2,
        )
    started = time.perf_counter()
    estimates = atp_estimates(problem, qk_fix=qk_fix, graddrop=graddrop, chunk_size=chunk_size)
    extra = {}
    scores = None
    if graddrop:
        scores = graddrop_scores(problem, estimates)
        extra["graddrop_layers"] = estimates[1:]
    return attribution_circuit(
        problem,
        "atp-star",
        estimates[0],
        absolute=absolute,
        top_n=top_n,
        threshold=threshold,
        started=started,
        settings={"qk_fix": bool(qk_fix), "graddrop": bool(graddrop), "metric": problem.metric.name,
                  "ablation": problem.ablation},
        extra=extra,
        scores=scores,
    )


# --------------------------------------------------------------------------------------------
# The exact pattern change of every q/k edge, dotted with d loss / d pattern


@eqx.filter_jit
def _jit_qk_fix(problem: Problem, d_pattern, chunk: int):
    """``sum_prompts <A'(edge) - A, d loss / d A>`` as ``[points, L, H, 2 (q|k), n_sources + 1]``.

    ``d_pattern`` is ``[points, prompts, L, H, pos, pos]``. Source slot ``n_sources`` is the internal
    edge (the whole input ablated).
    """
    model, run, graph = problem.model, problem.run, problem.graph
    cfg = model.config
    precision = model.precision
    clean = source_values(model, run.tokens)
    deltas = clean - run.ablation.values  # [S, n, pos, d]
    resid = Ablation.from_values(model, clean).base_attn  # the clean input of every layer's heads
    ablated = jnp.broadcast_to(run.ablation.base_attn, resid.shape)  # every incoming gate at 0
    n_rows = resid.shape[1]
    rot = rotary_tables(cfg, resid.shape[2], None, resid.dtype)  # the clean run's positions

    n_slots = deltas.shape[0] + 1
    first_source = np.array([graph.first_source_of_layer(layer) for layer in range(cfg.n_layers)])

    def per_row(row):
        def per_layer(layer, n_earlier: int):
            block = _block_at(model, layer)
            x = resid[layer, row]
            inputs = jnp.concatenate([x[None] - deltas[:n_earlier, row], ablated[layer, row][None]], axis=0)
            q, k = queries_keys(cfg, block, x[None], x[None], rot, precision)  # [H, 1, pos, E]
            pattern = attention_pattern(cfg, layer, q, k, precision)  # [H, 1, q, k]
            q_new, k_new = queries_keys(cfg, block, inputs, inputs, rot, precision)  # [H, S+1, pos, E]
            with_q = attention_pattern(cfg, layer, q_new, jnp.broadcast_to(k, k_new.shape), precision)
            with_k = attention_pattern(cfg, layer, jnp.broadcast_to(q, q_new.shape), k_new, precision)
            grad = d_pattern[:, row, layer]  # [P, H, q, k]
            by_q = jnp.einsum("hsqk,phqk->phs", with_q - pattern, grad, precision=precision)
            by_k = jnp.einsum("hsqk,phqk->phs", with_k - pattern, grad, precision=precision)
            out = jnp.stack([by_q, by_k], axis=2)  # [P, H, 2, n_earlier + 1]: the last slot is the internal edge
            earlier = jnp.arange(n_earlier) < jnp.asarray(first_source)[layer]  # the sources the layer reads
            later = jnp.zeros(out.shape[:-1] + (n_slots - 1 - n_earlier,), out.dtype)
            return jnp.concatenate([jnp.where(earlier, out[..., :-1], 0), later, out[..., -1:]], axis=-1)  # [P, H, 2, S+1]

        # A layer's q/k inputs read only the sources before it: a segment of layers projects the
        # sources before its last layer; the slots of later sources (no edges of the layer) are 0.
        return jnp.concatenate([
            lax.map(functools.partial(per_layer, n_earlier=int(first_source[hi - 1])),
                    jnp.arange(lo, hi))
            for lo, hi in layer_segments(cfg.n_layers)], axis=0)  # [L, P, H, 2, S+1]

    total = _chunked_sum(per_row, n_rows, chunk)
    return jnp.moveaxis(total, 1, 0)  # [P, L, H, 2, S+1]


def _chunked_sum(fn, n: int, chunk: int):
    """``sum_i fn(i)`` over ``i < n``, ``chunk`` at a time under vmap (padding rows weigh 0)."""
    chunk = max(1, min(chunk, n))
    n_chunks = math.ceil(n / chunk)
    index = jnp.arange(n_chunks * chunk, dtype=jnp.int32)
    valid = index < n
    index = jnp.where(valid, index, 0).reshape(n_chunks, chunk)
    valid = valid.reshape(n_chunks, chunk)
    shape = jax.eval_shape(fn, jnp.int32(0))

    def body(total, x):
        i, ok = x
        out = jax.vmap(fn)(i)
        return total + jnp.tensordot(ok.astype(out.dtype), out, axes=1), None

    total, _ = lax.scan(body, jnp.zeros(shape.shape, shape.dtype), (index, valid))
    return total
