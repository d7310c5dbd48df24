"""EAP with integrated gradients (EAP-IG; Hanna et al. 2024), along the gates or along the inputs.

**Gates (default, ``variant="gates"``).** Integrate the gate gradient along the straight path from
all gates 0 (the fully ablated model) to all gates 1 (the clean model)::

    score_e = -integral_0^1 (d loss / d g_e)(alpha * 1) d alpha       (times the gate's range, 1)

approximated by a quadrature rule with ``steps`` subintervals (below). Sign as in ``eap``:
positive means the unit supports the clean behaviour (``loss`` is ``Metric.loss``, lower is
better). **Completeness**: by the gradient theorem the exact integrals sum to
``loss(all gates 0) - loss(all gates 1)`` (for a higher-is-better metric,
``metric(clean) - metric(ablated)``); the scores do up to the quadrature error, which
``circuit.extra["completeness"]`` reports.

**Inputs (``variant="inputs"``, EAP-IG's "inputs" variant).** Interpolate only the embedding
between its ablated and clean value, ``x~_embed + alpha (x_embed - x~_embed)``, and run the rest
of the model normally on it (every gate at 1; in our graph that is the run with the ``embed``
node's gate at ``alpha`` and every other gate at 1). The score of edge ``s -> d`` is the fixed
clean difference dotted with the path-averaged gradient at the destination::

    score_e = -(x_s - x~_s) . integral_0^1 (d loss / d in_d)(alpha) d alpha

where ``x_s - x~_s`` is taken from the clean run (not from the interpolated one), as EAP-IG does;
we read the gradient through zero-valued "ghost" gates on a fixed difference buffer. For an
internal edge ``a.h.t -> a.h`` it is the sum over that input's residual edges. Completeness holds
for the edges out of ``embed`` (they carry the whole path derivative):
``sum_{d} score(embed -> d) = loss(alpha = 0) - loss(clean)`` up to quadrature error, where
``alpha = 0`` is the model run on the ablated embedding (for corrupted-input ablation, the
corrupted run). The other edges' scores are not a decomposition of anything.

**Quadrature** (``rule``), with m = ``steps`` subintervals of [0, 1] and weights summing to 1:

- ``"midpoint"`` (default): ``alpha_j = (j + 1/2) / m``, weight ``1/m``; exact for integrands linear
  in alpha, error O(1/m^2). With ``steps=1`` it is the gradient at alpha = 1/2, i.e. EAP evaluated
  at all gates 0.5 (or the embedding halfway).
- ``"left"``: ``alpha_j = j / m`` for j = 0..m-1 (what the EAP-IG library does), error O(1/m).
- ``"trapezoid"``: ``alpha_j = j / m`` for j = 0..m (m + 1 points), end weights ``1/(2m)``,
  error O(1/m^2).
"""

from __future__ import annotations

import time

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._circuit import Circuit
from ._gradients import (
    attribution_circuit,
    computation,
    embed_path_logits,
    fold_internal_edges,
    input_difference_aux,
    pullback,
    run_probed,
    shares_rows,
)
from ._positions import resolve_positions
from ._problem import Problem
from .eap import gate_gradients

RULES = ("midpoint", "left", "trapezoid")
VARIANTS = ("gates", "inputs")


def quadrature(steps: int, rule: str = "midpoint") -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alpha`` in [0, 1] and weights (summing to 1) of a rule with ``steps`` subintervals."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    m = int(steps)
    if rule == "midpoint":
        return (np.arange(m) + 0.5) / m, np.full(m, 1.0 / m)
    if rule == "left":
        return np.arange(m) / m, np.full(m, 1.0 / m)
    if rule == "trapezoid":
        weights = np.full(m + 1, 1.0 / m)
        weights[[0, -1]] = 0.5 / m
        return np.arange(m + 1) / m, weights
    raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {', '.join(RULES)}")


def integrated_gate_gradient(problem: Problem, alphas, weights, *, chunk_size: int | None = None,
                             per_position: bool = False) -> np.ndarray:
    """``sum_j weights[j] * (d loss / d gates)(alphas[j] * 1)``, summed exactly over the prompts;
    ``per_position``: with respect to the per-position gates, ``[n_pos, n_gates]``."""
    alphas = np.asarray(alphas, np.float64)
    shape = (problem.run.tokens.shape[1],) if per_position else ()
    points = alphas.reshape((-1,) + (1,) * (len(shape) + 1)) * np.ones((1,) + shape + (problem.graph.n_gates,))
    grads = gate_gradients(problem, points, chunk_size=chunk_size)
    return np.tensordot(np.asarray(weights, np.float64), grads, axes=1)


def input_path_gradients(problem: Problem, alphas, *, chunk_size: int | None = None,
                         per_position: bool = False) -> np.ndarray:
    """``[n_points, n_gates]``: ``(x_s - x~_s) . (d loss / d in_d)`` with the embedding at each ``alpha``
    (``per_position``: ``[n_points, n_pos, n_gates]``, by destination position).

    ``x_s - x~_s`` are the clean run's differences; every gate is at 1 and only the embedding is
    interpolated (see the module docstring). One compilation per number of points.
    """
    dtype = problem.model.dtype
    graph = problem.graph
    alphas = jnp.asarray(alphas, dtype)
    n_points = int(alphas.shape[0])
    shape = (problem.run.tokens.shape[1],) if per_position else ()
    ones, difference = jnp.ones(shape + (graph.n_gates,), dtype), input_difference_aux(problem)
    difference["ghost_base"] = jnp.broadcast_to(difference["ghost_base"], ones.shape)  # a per-position ghost
    _, grad, _ = pullback(
        problem,
        embed_path_logits,
        n_points=n_points,
        weights=jnp.ones(n_points),
        aux={"gates": ones, "alphas": alphas, **difference, "shared_rows": shares_rows(graph, ones, difference["ghost_base"])},
        shared=jnp.zeros((n_points,) + shape + (graph.n_gates,), dtype),
        chunk_size=chunk_size,
    )
    grad = fold_internal_edges(graph, np.array(grad, np.float64))  # a writable copy
    return grad


def eap_ig(
    problem: Problem,
    *,
    steps: int = 16,
    rule: str = "midpoint",
    variant: str = "gates",
    absolute: bool = False,
    top_n: int | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
    positions=None,
) -> Circuit:
    """EAP-IG scores for every gate unit of ``problem`` (see the module docstring).

    ``steps``/``rule`` choose the quadrature, ``variant`` the path (``"gates"`` or ``"inputs"``);
    ``absolute``, ``top_n``, ``threshold``, ``chunk_size`` and ``positions`` are as in ``eap`` (with
    positions, the per-position gradients are integrated along the same path: for ``gates`` every
    per-position gate at alpha, so the scores over a unit's positions add up to its position-free
    score).
    ``circuit.extra["completeness"]`` compares the score sum with the loss difference it should
    equal (all edges for ``gates``, the edges out of ``embed`` for ``inputs``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    started = time.perf_counter()
    alphas, weights = quadrature(steps, rule)
    dtype = problem.model.dtype
    graph = problem.graph
    units = resolve_positions(problem, positions)
    per_position = units is not None
    if variant == "gates":
        signed = -integrated_gate_gradient(problem, alphas, weights, chunk_size=chunk_size, per_position=per_position)
        loss_start = _loss(problem, graph.gates(0.0, dtype))
        in_sum = np.ones(graph.n_gates, bool)
    else:
        grads = input_path_gradients(problem, alphas, chunk_size=chunk_size, per_position=per_position)
        signed = -np.tensordot(weights, grads, axes=1)
        loss_start = float(_jit_embed_path_loss(computation(problem), jnp.asarray(0.0, dtype)))
        in_sum = _out_of_embed(problem)
    if units is not None:
        signed = units.reduce(signed)
    loss_clean = _loss(problem, graph.gates(1.0, dtype))
    total = float(signed[..., in_sum].sum())
    target = loss_start - loss_clean
    return attribution_circuit(
        problem,
        "eap-ig" if variant == "gates" else "eap-ig-inputs",
        signed,
        absolute=absolute,
        top_n=top_n,
        threshold=threshold,
        started=started,
        settings={"steps": int(steps), "rule": rule, "variant": variant, "metric": problem.metric.name,
                  "ablation": problem.ablation, **({} if units is None else {"positions": units.to_dict()})},
        extra={"completeness": {"score_sum": total, "loss_start": loss_start, "loss_clean": loss_clean,
                                "expected": target, "error": total - target,
                                "units": "all" if variant == "gates" else "out of embed"}},
        positions=units,
    )


def _out_of_embed(problem: Problem) -> np.ndarray:
    graph = problem.graph
    if graph.level == "node":
        return np.array([name == "embed" for name in graph.gate_names])
    return np.array([name.startswith("embed->") for name in graph.gate_names])


def _loss(problem: Problem, gates) -> float:
    value = computation(problem).evaluate(gates)
    return -value if problem.metric.higher_is_better else value


@eqx.filter_jit
def _jit_embed_path_loss(problem: Problem, alpha):
    logits = run_probed(problem.run, problem.graph.gates(1.0, problem.model.dtype), embed_scale=alpha)
    return problem.metric.loss(logits, problem.inputs)
