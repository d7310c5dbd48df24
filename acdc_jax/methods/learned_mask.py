"""Learned gate masks: Subnetwork Probing (Cao et al. 2021) over nodes, Edge Pruning (Bhaskar et
al. 2024) over edges. The gates themselves are trained, with optax, to keep the metric while a
sparsity penalty switches units off.

**Gates.** One logit per gate unit (edge, or node at ``level="node"``).
- ``parametrization="hard_concrete"`` (default; Louizos et al. 2018): the logit is ``log alpha``
  of a hard-concrete variable. Each step samples ``u ~ U(0, 1)`` per unit and uses the gate
  ``clip(sigmoid((log u - log(1 - u) + log alpha) / beta) * (zeta - gamma) + gamma, 0, 1)`` with
  ``beta = 2/3, gamma = -0.1, zeta = 1.1``, so gates are exactly 0 or 1 with positive probability.
  The penalty is the expected L0 norm, ``P(gate != 0) = sigmoid(log alpha - beta log(-gamma/zeta))``.
- ``parametrization="sigmoid"``: the gate is ``sigmoid(logit)``, deterministic, with an L1
  penalty (the gates are non-negative, so L1 is their sum).
The penalty is used as a *density* (mean over units, in [0, 1]), so weights do not scale with the
size of the graph.

**Loss.** ``problem.loss(gates)``, the problem's metric turned lower-is-better (``metric=`` picks
another): with the default discovery metric this is KL(clean || masked model), Edge Pruning's
objective; with a task metric (logit difference...) it is that metric's negation, as in
Subnetwork Probing's task-loss variant. Every step uses all the problem's prompts.

**Sparsity.** Either a fixed weight, ``loss + l0_weight * density``, or ``target_sparsity`` s (the
fraction of units to *remove*, as Edge Pruning defines sparsity; ``1 - s`` of them are kept): the
target density ``1 - s_t`` ramps linearly from 1 to ``1 - s`` over the first ``warmup`` fraction
of the steps and is enforced with Edge Pruning's Lagrangian ``lambda1 * gap + lambda2 * gap**2``,
``gap = density - target_density``, where the multipliers are trained by gradient *ascent* (Adam,
``lagrangian_lr``) while the logits descend (Adam, ``lr``). Both can be combined.

**Result.** A deterministic discretisation of the final logits: ``discretize="threshold"`` keeps a
unit when its logit is > 0 (the deterministic hard-concrete gate, and the sigmoid gate, is then
above 1/2); ``discretize="expected_l0"`` keeps the ``round(expected L0)`` units with the largest
logits (Edge Pruning's rule; the sum of the sigmoid gates for ``sigmoid``). ``Circuit.scores`` are
the final logits (``log alpha``): larger = kept more confidently; the threshold rule keeps score > 0.

**Defaults** (1000 steps, lr 0.03, weight 0.1) recover tracr-reverse's canonical circuit exactly
for seeds 0-3 (zero ablation, l2 metric); with lr 0.1 training often settles in a local optimum
that drops a whole path. Training is deterministic given ``seed``. The training step compiles once
per problem shape and parametrization: step number, key, learning rates, weights and target are
traced.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from ..metrics import Metric, get_metric
from ._circuit import Circuit
from ._problem import Problem

Parametrization = Literal["hard_concrete", "sigmoid"]
Discretize = Literal["threshold", "expected_l0"]

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
_EPS = 1e-6


def hard_concrete_sample(log_alpha: Float[Array, " n"], u: Float[Array, " n"]) -> Float[Array, " n"]:
    """A hard-concrete gate for uniform noise ``u`` in (0, 1): exactly 0 or 1 with positive probability."""
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
    return jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def hard_concrete_deterministic(log_alpha: Float[Array, " n"]) -> Float[Array, " n"]:
    """The noise-free hard-concrete gate (Louizos et al.'s test-time estimator)."""
    return jnp.clip(jax.nn.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def prob_nonzero(log_alpha: Float[Array, " n"]) -> Float[Array, " n"]:
    """P(gate != 0) of a hard-concrete gate: its contribution to the expected L0 norm."""
    return jax.nn.sigmoid(log_alpha - BETA * np.log(-GAMMA / ZETA))


@dataclasses.dataclass(frozen=True)
class _Config:
    """What changes the compiled step's program (static, hashable); numbers live in ``_Hyper``."""

    parametrization: str


class _Hyper(eqx.Module):
    """Numeric settings, traced, so changing them does not recompile the step."""

    lr: Float[Array, ""]
    lagrangian_lr: Float[Array, ""]
    l0_weight: Float[Array, ""]
    target_sparsity: Float[Array, ""]
    constrained: Float[Array, ""]  # 1: enforce the target through the Lagrangian; 0: fixed penalty only
    warmup_steps: Float[Array, ""]


class _State(eqx.Module):
    logits: Float[Array, " n_gates"]
    lambdas: Float[Array, "2"]
    opt_state: Any  # optax states: pytrees of arrays
    lag_state: Any


def _optimizers(hyper: _Hyper) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    return optax.adam(hyper.lr), optax.adam(hyper.lagrangian_lr)


def _gates_and_density(logits, key, config: _Config):
    if config.parametrization == "hard_concrete":
        u = jax.random.uniform(key, logits.shape, logits.dtype, _EPS, 1.0 - _EPS)
        return hard_concrete_sample(logits, u), prob_nonzero(logits).mean()
    gates = jax.nn.sigmoid(logits)
    return gates, gates.mean()


def _target_density(step, hyper: _Hyper):
    ramp = jnp.minimum(1.0, (step + 1).astype(jnp.float32) / jnp.maximum(1.0, hyper.warmup_steps))
    return 1.0 - hyper.target_sparsity * ramp


@eqx.filter_jit
def _train_step(
    problem: Problem, config: _Config, hyper: _Hyper, state: _State, base_key: Array, step: Int[Array, ""]
) -> tuple[_State, Float[Array, "4"]]:
    optimizer, lag_optimizer = _optimizers(hyper)
    key = jax.random.fold_in(base_key, step)
    target = _target_density(step, hyper)

    def objective(logits, lambdas):
        gates, density = _gates_and_density(logits, key, config)
        faith = problem.loss(gates.astype(problem.model.dtype))
        gap = density - target
        lagrangian = hyper.constrained * (lambdas[0] * gap + lambdas[1] * gap * gap)  # 0, and no gradient, when off
        return faith + hyper.l0_weight * density + lagrangian, (faith, density)

    (loss, (faith, density)), (g_logits, g_lambdas) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        state.logits, state.lambdas
    )
    updates, opt_state = optimizer.update(g_logits, state.opt_state, state.logits)
    logits = optax.apply_updates(state.logits, updates)
    # the multipliers maximise the Lagrangian: ascend their gradient
    lag_updates, lag_state = lag_optimizer.update(-g_lambdas, state.lag_state, state.lambdas)
    lambdas = optax.apply_updates(state.lambdas, lag_updates)
    record = jnp.stack([loss, faith, density, target]).astype(jnp.float32)
    return _State(logits, lambdas, opt_state, lag_state), record


def learned_mask(
    problem: Problem,
    *,
    steps: int = 1000,
    lr: float = 0.03,
    parametrization: str = "hard_concrete",  # a Parametrization; checked below with a message
    l0_weight: float = 0.1,
    target_sparsity: float | None = None,
    warmup: float = 0.5,
    lagrangian_lr: float = 0.05,
    init_logit: float = 3.0,
    discretize: str = "threshold",  # a Discretize; checked below with a message
    seed: int = 0,
    metric: str | Metric | None = None,
    log_every: int = 10,
    progress: Callable[[dict], None] | None = None,
) -> Circuit:
    """Train a gate mask on ``problem`` and return its discretised circuit (see the module docstring).

    - ``steps``, ``lr``: Adam steps on the gate logits and their learning rate.
    - ``parametrization``: ``"hard_concrete"`` (stochastic, expected-L0 penalty) or ``"sigmoid"``
      (deterministic, L1 penalty).
    - ``l0_weight``: weight of the density penalty (fraction of units expected on). Its scale is
      relative to the metric's: sweep it (or use ``target_sparsity``) for a family of circuits.
    - ``target_sparsity``: fraction of units to remove, reached through a Lagrangian after a linear
      ramp over the first ``warmup`` fraction of the steps; ``lagrangian_lr`` is the multipliers'
      learning rate. ``None`` = fixed penalty only.
    - ``init_logit``: every logit's starting value (3: gates start almost surely on).
    - ``discretize``: ``"threshold"`` (logit > 0) or ``"expected_l0"`` (top round(E[L0]) logits).
    - ``seed``: the hard-concrete noise; runs with one seed are identical.
    - ``metric``: the faithfulness metric (default: the problem's); used lower-is-better.
    - ``log_every``: keep the loss, faithfulness term and density every this many steps in
      ``circuit.extra["history"]``; ``progress`` is called with them too.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if parametrization not in ("hard_concrete", "sigmoid"):
        raise ValueError(f"parametrization must be 'hard_concrete' or 'sigmoid', got {parametrization!r}")
    if discretize not in ("threshold", "expected_l0"):
        raise ValueError(f"discretize must be 'threshold' or 'expected_l0', got {discretize!r}")
    if target_sparsity is not None and not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target_sparsity is the fraction of units removed, in [0, 1); got {target_sparsity}")
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup is a fraction of the steps, in [0, 1]; got {warmup}")
    if l0_weight < 0:
        raise ValueError(f"l0_weight must be >= 0, got {l0_weight}")
    if metric is not None:
        problem = problem.with_metric(
            metric if isinstance(metric, Metric) else (problem.metric if metric == problem.metric.name else get_metric(metric))
        )
    started = time.perf_counter()
    graph = problem.graph
    config = _Config(parametrization=parametrization)

    def scalar(x):
        return jnp.asarray(x, jnp.float32)

    hyper = _Hyper(
        lr=scalar(lr),
        lagrangian_lr=scalar(lagrangian_lr),
        l0_weight=scalar(l0_weight),
        target_sparsity=scalar(0.0 if target_sparsity is None else target_sparsity),
        constrained=scalar(target_sparsity is not None),
        warmup_steps=scalar(round(warmup * steps)),
    )
    optimizer, lag_optimizer = _optimizers(hyper)
    logits = jnp.full((graph.n_gates,), init_logit, jnp.float32)
    lambdas = jnp.zeros((2,), jnp.float32)
    state = _State(logits, lambdas, optimizer.init(logits), lag_optimizer.init(lambdas))
    base_key = jax.random.PRNGKey(seed)

    history = []
    for step in range(steps):
        state, record = _train_step(problem, config, hyper, state, base_key, jnp.int32(step))
        if (step + 1) % max(1, log_every) == 0 or step == steps - 1:
            loss, faith, density, target = (float(x) for x in np.asarray(record))
            entry = {"step": step + 1, "loss": loss, "faithfulness_loss": faith, "density": density, "target_density": target}
            history.append(entry)
            if progress is not None:
                progress(entry)

    scores = np.asarray(state.logits, np.float64)
    if parametrization == "hard_concrete":
        expected_on = float(np.asarray(prob_nonzero(state.logits)).sum())
    else:
        expected_on = float(np.asarray(jax.nn.sigmoid(state.logits)).sum())
    if discretize == "threshold":
        keep = scores > 0
    else:
        keep = np.zeros(graph.n_gates, bool)
        keep[np.argsort(-scores, kind="stable")[: int(round(expected_on))]] = True
    kept = tuple(graph.gate_names[i] for i in np.flatnonzero(keep))

    settings = {
        "steps": int(steps),
        "lr": float(lr),
        "parametrization": parametrization,
        "l0_weight": float(l0_weight),
        "target_sparsity": None if target_sparsity is None else float(target_sparsity),
        "warmup": float(warmup),
        "lagrangian_lr": float(lagrangian_lr),
        "init_logit": float(init_logit),
        "discretize": discretize,
        "seed": int(seed),
        "metric": problem.metric.name,
        "metric_options": [list(o) for o in problem.metric.options],
        "ablation": problem.ablation,
    }
    return Circuit.of(
        problem,
        "learned-mask",
        scores=scores,
        kept=kept,
        threshold=0.0 if discretize == "threshold" else None,
        metric_value=problem.evaluate(jnp.asarray(keep, problem.model.dtype)),
        seconds=time.perf_counter() - started,
        settings=settings,
        extra={
            "expected_density": expected_on / graph.n_gates,
            "kept_fraction": float(keep.mean()),
            "lambdas": np.asarray(state.lambdas, np.float64).tolist(),
            "history": history,
        },
    )


__all__ = [
    "BETA",
    "GAMMA",
    "ZETA",
    "hard_concrete_deterministic",
    "hard_concrete_sample",
    "learned_mask",
    "prob_nonzero",
]
