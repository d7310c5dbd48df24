"""Edge attribution patching (EAP; Syed et al. 2023): one gradient of the task metric per gate.

**Definition.** For a gate unit e (an edge; a node on a node-level graph) with gate ``g_e``::

    score_e = -(d loss / d g_e) at all gates 1      (times the gate's range, 1 - 0 = 1)

where ``loss`` is the problem's ``Metric.loss`` (lower is better: the metric itself for kl, nll,
l2; minus it for logit_diff, prob_diff). It is the first-order estimate of
``loss(all gates 1 except g_e = 0) - loss(all gates 1)``. **Sign: positive means removing the unit
moves the loss up, i.e. the unit supports the clean behaviour**; for a higher-is-better metric
the score estimates ``metric(full) - metric(unit ablated)``, for a lower-is-better one
``metric(unit ablated) - metric(full)``. In activation terms it is ``(x_s - x~_s) . dM/d in_d``,
Syed et al.'s (clean - corrupted activation) times gradient. One forward and one backward pass
over the prompts (two forwards and a backward when they are chunked; see ``_gradients``).

**KL, l2 and other metrics with their minimum at the clean model.** Their gradient at all gates 1
is zero (the clean model is the minimum), so EAP scores are zero up to float error and rank
nothing. Syed et al. therefore score with the task's own metric (logit or probability
difference), which is why ``discover`` gives attribution methods the task metric by default;
Hanna et al. (2024) move the gradient away from the clean point by integrating it (EAP-IG), which
makes KL usable (``eap_ig``). This function warns when asked for EAP at the clean point of such a
metric. ``point="corrupted"`` takes the gradient at all gates 0 instead: the first-order estimate
of ``loss(all gates 0) - loss(only g_e = 1)``, how much restoring the unit alone brings the loss
down (positive again = supports the clean behaviour); it is not a minimum of KL, but it answers a
different question (adding one unit to the empty graph).
"""

from __future__ import annotations

import time
import warnings

import jax.numpy as jnp
import numpy as np

from ._circuit import Circuit
from ._gradients import (MINIMUM_AT_CLEAN, attribution_circuit, gate_point_logits, pullback, shares_rows,
                         uniform_alphas, uniform_gate_gradients)
from ._positions import resolve_positions
from ._problem import Problem


def gate_gradients(problem: Problem, points, *, chunk_size: int | None = None) -> np.ndarray:
    """``d loss / d gates`` at each gate vector of ``points`` (``[n_points, n_gates]``, or per-position
    gates ``[n_points, n_pos, n_gates]``), summed exactly over the prompts (chunked if needed); one
    compilation per number of points. Where every point is uniform (``_gradients.uniform_alphas``:
    all gates 1, all gates 0, EAP-IG's steps) they come from one residual stream per point instead
    of the gated forward (``models.split_pullback``): the same numbers at the plain model's cost."""
    points = jnp.asarray(points, problem.model.dtype)
    n_gates, n_pos = problem.graph.n_gates, problem.run.tokens.shape[1]
    if points.ndim not in (2, 3) or points.shape[-1] != n_gates or (points.ndim == 3 and points.shape[1] != n_pos):
        raise ValueError(f"points must be [n_points, {n_gates}] gate vectors or [n_points, {n_pos}, {n_gates}] "
                         f"per-position gates, got {points.shape}")
    alphas = uniform_alphas(problem.graph, points)
    if alphas is not None:  # one residual stream per point: the plain model's forward and backward
        return uniform_gate_gradients(problem, alphas, per_position=points.ndim == 3, chunk_size=chunk_size)
    _, grad, _ = pullback(
        problem,
        gate_point_logits,
        n_points=int(points.shape[0]),
        weights=jnp.ones(points.shape[0]),
        aux={"gates": points, "shared_rows": shares_rows(problem.graph, points)},
        shared=jnp.zeros_like(points),
        chunk_size=chunk_size,
    )
    return np.asarray(grad, np.float64)


def eap(
    problem: Problem,
    *,
    point: str = "clean",
    absolute: bool = False,
    top_n: int | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
    positions=None,
) -> Circuit:
    """EAP scores for every gate unit of ``problem`` (see the module docstring for the definition).

    - ``point``: ``"clean"`` (all gates 1, EAP as published) or ``"corrupted"`` (all gates 0).
    - ``absolute``: rank by ``|score|`` (Syed et al. and Hanna et al. select by magnitude); the
      signed scores are always in ``circuit.extra["signed"]``.
    - ``top_n`` / ``threshold``: where to cut the ranking for ``circuit.kept`` (default: no cut).
    - ``chunk_size``: (point, prompt) configurations per vmapped chunk (default: what fits).
    - ``positions``: ``None`` (one score per unit), ``"each"`` (one per unit and token position),
      ``"labels"`` (per task label) or a mapping ``label -> positions`` (``methods._positions``): the
      score of a unit at a span is the gradient with respect to the per-position gates, summed over
      the span; a unit's scores over its position units add up to its position-free score.
    """
    if point not in ("clean", "corrupted"):
        raise ValueError(f"point must be 'clean' or 'corrupted', got {point!r}")
    if point == "clean" and problem.metric.name in MINIMUM_AT_CLEAN:
        warnings.warn(
            f"EAP at the clean point of {problem.metric.name!r}: the clean model is this metric's minimum, "
            "so every gradient is zero up to float error; use eap-ig, point='corrupted', or a metric such as "
            "logit_diff",
            stacklevel=2,
        )
    started = time.perf_counter()
    base = 1.0 if point == "clean" else 0.0
    units = resolve_positions(problem, positions)
    point_gates = problem.graph.gates(base, problem.model.dtype)
    if units is not None:
        point_gates = jnp.broadcast_to(point_gates, (units.n_pos, problem.graph.n_gates))
    grad = gate_gradients(problem, point_gates[None], chunk_size=chunk_size)[0]
    if units is not None:
        grad = units.reduce(grad)
    return attribution_circuit(
        problem,
        "eap",
        -grad,
        absolute=absolute,
        top_n=top_n,
        threshold=threshold,
        started=started,
        settings={"point": point, "metric": problem.metric.name, "ablation": problem.ablation,
                  **({} if units is None else {"positions": units.to_dict()})},
        positions=units,
    )
