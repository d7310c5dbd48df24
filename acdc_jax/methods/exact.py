"""Exact single-unit patching: the quantity every attribution method estimates, computed exactly.

``score_e = loss(all gates 1 except g_e = 0) - loss(all gates 1)`` for every gate unit, with
``loss`` = ``Metric.loss`` (lower is better): **positive = removing the unit alone moves the loss
up, i.e. it supports the clean behaviour** (for a higher-is-better metric,
``metric(full) - metric(unit ablated)``). One vmapped batch of ``n_gates + 1`` gated runs; cheap on
small models, the reference EAP, EAP-IG and AtP* are compared against.
"""

from __future__ import annotations

import time

from ._circuit import Circuit
from ._gradients import attribution_circuit, exact_unit_effects
from ._problem import Problem


def exact_patching(
    problem: Problem,
    *,
    absolute: bool = False,
    top_n: int | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
) -> Circuit:
    """Exact effect of ablating each gate unit alone (see the module docstring)."""
    started = time.perf_counter()
    signed = exact_unit_effects(problem, chunk_size=chunk_size)
    return attribution_circuit(
        problem,
        "exact-patching",
        signed,
        absolute=absolute,
        top_n=top_n,
        threshold=threshold,
        started=started,
        settings={"metric": problem.metric.name, "ablation": problem.ablation},
    )
