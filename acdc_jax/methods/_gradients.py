"""What the gradient methods share: a gated forward with probes, and exact chunked pullbacks.

**The probed forward** is ``gated_forward`` (same semantics, pinned by a test) with four extras
that the gate gradient alone cannot express:

- ``ghost`` gates: an extra, zero-valued set of gates that read a *fixed* difference buffer
  (``ghost_deltas``) instead of the running one, so ``d loss / d ghost[d, s]`` is
  ``ghost_deltas[s] . d loss / d in_d`` (EAP-IG over inputs needs the clean differences dotted with
  the gradient of a run that is not the clean one);
- ``pattern_offset``: added to every attention pattern after the softmax (zero in value), so its
  gradient is ``d loss / d pattern`` (AtP*'s QK fix);
- ``embed_scale``: the ``embed`` source's difference is scaled, i.e. the run reads the embedding
  ``x~ + a (x - x~)`` and recomputes everything downstream (EAP-IG over inputs);
- ``drop_layer``: the outputs of that layer's heads and MLP are constants for the backward pass
  (``stop_gradient``), which removes every gradient path through the layer (AtP*'s GradDrop).

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

import math
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from ..graph import Graph
from ..models import Ablation, DenseGates, Transformer, TransformerConfig
from ..models._transformer import _block_at, _embed, _layer_norm, _lead, _mlp, _unembed
from ..patching import GatedRun, auto_chunk_size, bytes_per_configuration, chunked_vmap, device_memory_bytes
from ._circuit import Circuit
from ._problem import Problem

# --------------------------------------------------------------------------------------------
# The probed forward


def project(block, x: Array, W: Array, b: Array, eps: float, precision) -> Array:
    """``LN1(x) @ W[h] + b[h]`` for one shared input ``[b, p, d]`` or one input per head ``[h, b, p, d]``."""
    x = _layer_norm(block.ln1, x, eps)
    spec = "bpd,hde->bphe" if x.ndim == 3 else "hbpd,hde->bphe"
    return jnp.einsum(spec, x, W, precision=precision) + b[None, None]


def attention_pattern(cfg: TransformerConfig, layer, q: Array, k: Array, precision) -> Array:
    """Softmax pattern ``[b, h, q, k]`` from queries and keys ``[b, p, h, e]`` (as the model computes it)."""
    scale = cfg.attn_scale
    if cfg.scale_attn_by_inverse_layer_idx:
        scale = scale * (jnp.asarray(layer) + 1).astype(q.dtype)
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k, precision=precision) / scale
    if cfg.causal:
        n = scores.shape[-1]
        allowed = jnp.tril(jnp.ones((n, n), dtype=bool))[None, None]
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores, axis=-1)


def _drop(x: Array, layer, drop_layer) -> Array:
    if isinstance(drop_layer, int) and drop_layer < 0:
        return x
    return jnp.where(layer == drop_layer, lax.stop_gradient(x), x)


def probed_forward(
    model: Transformer,
    gates: DenseGates,
    ablation: Ablation,
    tokens: Int[Array, "batch pos"],
    positions: Int[Array, "batch k"] | None = None,
    *,
    ghost: DenseGates | None = None,
    ghost_deltas: Float[Array, "n_sources batch pos d_model"] | None = None,
    pattern_offset: Float[Array, "n_layers batch n_heads pos pos"] | None = None,
    embed_scale: Float[Array, ""] | float = 1.0,
    drop_layer: Int[Array, ""] | int = -1,
) -> Float[Array, "batch k d_vocab_out"]:
    """``gated_forward`` with ghost gates, attention-pattern offsets, a scaled embedding and GradDrop.

    With no extras it computes exactly what ``gated_forward`` does (global gates only, no position
    axis). See the module docstring for what each extra is for.
    """
    cfg = model.config
    precision = model.precision
    H, M = cfg.n_heads, int(cfg.has_mlp)
    eps = cfg.ln_eps
    embed_out = _embed(model, tokens, None)
    batch, n_pos = tokens.shape
    deltas = jnp.zeros((cfg.n_sources, batch, n_pos, cfg.d_model), embed_out.dtype)
    deltas = deltas.at[0].set(embed_scale * (embed_out - ablation.values[0]))

    def read(dense_layer, buffer, spec):
        return jnp.einsum(spec, dense_layer, buffer, precision=precision)

    def layer_step(layer, deltas):
        block = _block_at(model, layer)
        first = 1 + layer * (H + M)
        inputs = _lead(ablation.base_attn[layer], 4) + read(gates.attn[layer], deltas, "ds,sbpm->dbpm")
        if ghost is not None:
            inputs = inputs + read(ghost.attn[layer], ghost_deltas, "ds,sbpm->dbpm")
        if inputs.shape[0] == 3 * H:
            qkv = inputs.reshape((H, 3) + inputs.shape[1:])
            q_in, k_in, v_in = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        else:
            q_in = k_in = v_in = inputs
        attn = block.attn
        q = project(block, q_in, attn.W_Q, attn.b_Q, eps, precision)
        k = project(block, k_in, attn.W_K, attn.b_K, eps, precision)
        v = project(block, v_in, attn.W_V, attn.b_V, eps, precision)
        pattern = attention_pattern(cfg, layer, q, k, precision)
        if pattern_offset is not None:
            pattern = pattern + pattern_offset[layer]
        z = jnp.einsum("bhqk,bkhe->bqhe", pattern, v, precision=precision)
        results = _drop(jnp.einsum("bqhe,hed->hbqd", z, attn.W_O, precision=precision), layer, drop_layer)
        ablated = lax.dynamic_slice_in_dim(ablation.values, first, H, axis=0)
        deltas = lax.dynamic_update_slice_in_dim(deltas, results - ablated, first, axis=0)
        if M:
            mlp_in = ablation.base_mlp[layer] + read(gates.mlp[layer], deltas, "s,sbpm->bpm")
            if ghost is not None:
                mlp_in = mlp_in + read(ghost.mlp[layer], ghost_deltas, "s,sbpm->bpm")
            out = _drop(_mlp(cfg, block, mlp_in, precision), layer, drop_layer)
            ablated = lax.dynamic_index_in_dim(ablation.values, first + H, axis=0, keepdims=False)
            deltas = lax.dynamic_update_index_in_dim(deltas, out - ablated, first + H, axis=0)
        return deltas

    deltas = lax.fori_loop(0, cfg.n_layers, layer_step, deltas)
    final_in = ablation.base_logits + read(gates.logits, deltas, "s,sbpm->bpm")
    if ghost is not None:
        final_in = final_in + read(ghost.logits, ghost_deltas, "s,sbpm->bpm")
    return _unembed(model, final_in, positions)


def run_probed(run: GatedRun, gates: Array, **extras) -> Array:
    """``probed_forward`` on a gated run, with gate vectors (not dense layouts) for gates and ghost."""
    graph = run.graph
    ghost = extras.pop("ghost", None)
    return probed_forward(
        run.model,
        graph.dense(gates),
        run.ablation,
        run.tokens,
        run.positions,
        ghost=None if ghost is None else graph.dense(ghost),
        **extras,
    )


# --------------------------------------------------------------------------------------------
# Pullbacks over (point, prompt) configurations

# logits_fn(run_of_one_prompt, row, point, aux, shared, per_config) -> logits [1, k, vocab]
LogitsFn = Callable[..., Array]


def grad_chunk_size(problem: Problem, n_configs: int, *, fraction: float = 0.5) -> int:
    """How many (point, prompt) configurations fit in memory for a forward and backward pass.

    A backward pass keeps every layer's difference buffer, so one prompt costs about
    ``n_layers + 2`` gated forwards' worth of activations.
    """
    n_rows = problem.run.tokens.shape[0]
    per_config = bytes_per_configuration(problem.run) / n_rows * (problem.model.config.n_layers + 2)
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
    if chunk_size is None:
        chunk_size = grad_chunk_size(problem, n_configs)
    chunk_size = int(chunk_size)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _jit_pullback(computation(problem), logits_fn, aux, shared, per_config, rows, points, weights, n_points, chunk_size)


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
    n_chunks = math.ceil(n_configs / chunk)
    pad = n_chunks * chunk - n_configs

    def to_chunks(x, fill_zero):
        if pad:
            filler = jnp.zeros_like(x[:1]) if fill_zero else x[:1]
            x = jnp.concatenate([x, jnp.repeat(filler, pad, axis=0)], axis=0)
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    xs = (
        to_chunks(rows, False),
        to_chunks(points, False),
        to_chunks(cotangent, True),
        jax.tree.map(lambda x: to_chunks(x, True), per_config),
    )

    def body(total, x):
        r, p, cot, pc = x
        _, vjp = jax.vjp(lambda s, c: _configs_logits(problem, logits_fn, aux, s, r, p, c), shared, pc)
        g_shared, g_config = vjp(cot)
        return jax.tree.map(jnp.add, total, g_shared), g_config

    g_shared, g_config = lax.scan(body, jax.tree.map(jnp.zeros_like, shared), xs)
    g_config = jax.tree.map(lambda y: y.reshape((n_chunks * chunk,) + y.shape[2:])[:n_configs], g_config)
    return losses, g_shared, g_config


# --------------------------------------------------------------------------------------------
# Logits functions (module-level, so that they are static and hashable under jit)


def gate_point_logits(run: GatedRun, row, point, aux, shared, per_config) -> Array:
    """Gates ``aux["gates"][point] + shared[point]``, plus ``per_config`` when given (per-prompt offsets)."""
    gates = aux["gates"][point] + shared[point]
    if per_config is not None:
        gates = gates + per_config
    return run_probed(run, gates)


def embed_path_logits(run: GatedRun, row, point, aux, shared, per_config) -> Array:
    """All gates at 1, the embedding interpolated by ``aux["alphas"][point]``; ``shared[point]`` are ghost gates."""
    ghost_deltas = jnp.take(aux["clean_deltas"], row[None], axis=1)
    return run_probed(
        run,
        aux["gates"],
        ghost=aux["ghost_base"] + shared[point],
        ghost_deltas=ghost_deltas,
        embed_scale=aux["alphas"][point],
    )


def drop_layer_logits(run: GatedRun, row, point, aux, shared, per_config) -> Array:
    """Gates at 1 (``aux["gates"]`` + ``shared[point]``), GradDrop at ``aux["drop"][point]``, pattern offsets per config."""
    return run_probed(
        run,
        aux["gates"] + shared[point],
        pattern_offset=per_config,
        drop_layer=aux["drop"][point],
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
    """
    table = np.full((graph.n_layers, graph.n_heads, 2, graph.n_sources + 1), -1, np.int64)
    index = graph._gate_index
    for layer in range(graph.n_layers):
        for h in range(graph.n_heads):
            for t_i, t in enumerate(("q", "k")):
                dst = f"a{layer}.{h}.{t}"
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
) -> Circuit:
    """A ``Circuit`` from signed estimates: ``scores`` are ``|signed|`` with ``absolute``, else ``signed``.

    ``kept`` is the ``top_n`` highest scores, or every unit scoring at least ``threshold``; with
    neither, nothing is cut (``kept`` is empty and ``metric_value`` is None): the scores are a
    ranking, and the caller decides where to cut it.
    """
    signed = np.asarray(signed, np.float64)
    if scores is None:
        scores = np.abs(signed) if absolute else signed
    if top_n is not None and threshold is not None:
        raise ValueError("give top_n or threshold, not both")
    names = problem.graph.gate_names
    kept: tuple[str, ...] = ()
    metric_value = None
    if top_n is not None:
        if not 0 <= int(top_n) <= len(names):
            raise ValueError(f"top_n must be between 0 and {len(names)}, got {top_n}")
        order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[: int(top_n)]
        kept = tuple(names[i] for i in sorted(order))
    elif threshold is not None:
        kept = tuple(names[i] for i in np.flatnonzero(np.nan_to_num(scores, nan=-np.inf) >= threshold))
    if top_n is not None or threshold is not None:
        metric_value = computation(problem).evaluate(problem.graph.gates_from_names(kept, problem.model.dtype))
    extra = dict(extra or {})
    extra.setdefault("signed", signed)
    return Circuit(
        method=method,
        task=problem.task_name,
        graph=problem.graph,
        scores=scores,
        kept=kept,
        metric=problem.metric.name,
        ablation=problem.ablation,
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
    )
