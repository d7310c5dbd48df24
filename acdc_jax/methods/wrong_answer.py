"""The "maximally wrong answer" gradient: score gates (and weights) by the gradient of a wrong-answer loss.

The proposal: on a prompt pair whose correct answers are swapped (IOI: "..., Mary gave a drink
to" / "..., John gave a drink to"), take the MSE between the two answer logits at the last
position, summed over both prompts; its minimum is an output that cannot tell the answers apart,
and its gradient with respect to the gates at 1 points toward that "maximally wrong" output.
``acdc_jax.metrics.wrong_answer_loss`` defines it (``"mse"``) and the proposal's other
candidates, each a higher-is-better ``Metric`` ``W`` whose minimum is its notion of wrong
(definitions in ``acdc_jax.metrics``): ``ce`` (cross-entropy toward the wrong answer), ``flip``
(distance to the mirrored logit difference), ``logit_diff``, ``most_dissimilar`` (cross-entropy
toward the token with the lowest clean logit), ``most_dissimilar_cosine`` (cross-entropy toward
the token whose unembedding direction is least cosine-similar to the answer's), ``inverse`` (KL
from ``softmax(-z_clean)``) and
``semantic`` (cross-entropy toward the task's own wrong answers: IOI's other name, Greater-Than's
years <= YY from ``wrong_mask``, induction's most likely non-answer token, tracr's lowest-ranked
output).

**What each reduces to at gates 1.** A gate score is ``sum_reads dW/dz . dz/dg`` (``z`` the
logits), so every definition is EAP with the metric ``W``; per prompt, with ``LD`` its clean
logit difference and ``p`` its clean softmax:
- ``logit_diff``: exactly EAP with the logit-difference metric.
- ``mse``: EAP(logit_diff) reweighted per prompt by ``2 LD`` (prompts the model is sure of weigh more).
- ``flip``: ``d/dLD (LD + LD_clean)^2 = 4 LD`` at the clean model: exactly 2x ``mse``.
- ``ce``: EAP with ``log p(wrong)``, i.e. ``dW/dz = p - onehot(wrong)`` (not a reweighting of EAP(logit_diff)).
- ``semantic``: equals ``ce`` on tasks with ``wrong_answers`` (IOI, Docstring); on Greater-Than
  ``dW/dz = p - p 1_W / p(W)`` (the probability of years <= YY); on induction/tracr it is
  ``most_dissimilar``'s form with another target.
- ``most_dissimilar``: ``dW/dz = p - onehot(argmin z)``, per read position.
- ``most_dissimilar_cosine``: ``dW/dz = p - onehot(t)``, ``t = argmin_v cos(W_U[:, v], W_U[:, answer])``
  (``cosine_targets``); the same form with a target fixed by the unembedding, not by the prompt.
- ``inverse``: ``dW/dz = p - softmax(-z)``, per read position; EAP with a cross-entropy to the
  inverted distribution, no task-metric EAP.

``metric_value`` (with ``top_n`` or ``threshold``) is the **task's** metric of the pruned circuit,
and ``circuit.metric`` names it; the loss scored is ``settings["loss"]``.

**Edge scores.** ``score_e = dW / d g_e`` at all gates 1 (= ``-(d loss / d g_e)`` with
``loss = -W``, as in ``eap``): the first-order estimate of ``W(full) - W(edge ablated)``.
**Positive = removing the edge moves the output toward wrong**, i.e. the edge supports the clean
behaviour; negative = removing it moves the output away from wrong.

**Pairing.** Every loss is a mean over prompts of a per-prompt term, so it is defined on any task
with ``answers``/``wrong_answers``; on swapped pairs (rows 2i and 2i+1, e.g. IOI's
``pairs=True``) the proposal's pair sum of ``mse`` is twice the mean over the pair, a constant
factor. ``pairs=True`` checks that the task is paired that way (and fails loudly if not); the
settings record whether it is.

**Weights** (``weights=True``): the gradient of ``W`` with respect to every parameter of the clean
model (all gates 1 is the clean model, whatever the ablation), aggregated per node into
``circuit.extra["weight_scores"]``: ``grad_norm``, the L2 norm of the gradient over the node's
parameters (a head: its slices of ``W_Q, W_K, W_V, b_Q, b_K, b_V, W_O``; an MLP: ``W_in, b_in,
W_out, b_out``; ``embed``: ``W_E, W_pos``, which with a tied unembedding includes the unembedding
path), and ``saliency``, ``sum(theta * dW/dtheta)``, the first-order estimate of
``W(theta) - W(that node's parameters at 0)`` (positive = the parameters support the clean
behaviour). ``b_O``, LayerNorms and the unembedding belong to no node and are left out.

**Weights as the circuit** (``target="weights"``): the result is a node-level ``Circuit`` (on the
problem's graph at ``level="node"``: ``embed``, every head, every MLP) whose scores are the
``weight_score`` above (``grad_norm``, default, or ``saliency``); ``top_n``/``threshold`` cut it
and ``metric_value`` evaluates the kept nodes (the rest ablated) in the task's metric. Its AUC
against a canonical circuit is ``evaluate.roc_curve(circuit, task, level="node", nodes="sources")``
(``discover`` reports it), and ``split_half_stability(problem, "wrong-answer", target="weights")``
compares its rankings.

The proposal calls these gradients noisy; ``acdc_jax.methods.stability`` measures how stable
their rankings are across prompt subsets.
"""

from __future__ import annotations

import dataclasses
import time

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..graph import Graph
from ..metrics import wrong_answer_loss
from ..models import forward
from ..patching import GatedRun
from ._circuit import Circuit
from ._gradients import attribution_circuit, computation, pullback
from ._problem import Problem
from .eap import gate_gradients


TARGETS = ("gates", "weights")
WEIGHT_SCORES = ("grad_norm", "saliency")


def is_swapped_pairs(problem: Problem) -> bool:
    """Rows 2i and 2i+1 have their (first) answer and wrong answer exchanged."""
    answers, wrong = problem.inputs.answers, problem.inputs.wrong_answers
    if answers is None or wrong is None or answers.shape[0] % 2:
        return False
    a, w = np.asarray(answers[:, 0]), np.asarray(wrong[:, 0])
    return bool(np.all(a[0::2] == w[1::2]) and np.all(a[1::2] == w[0::2]))


def cosine_targets(problem: Problem) -> np.ndarray:
    """``[batch, k]`` token least cosine-similar in the unembedding to each read's reference token.

    The reference is the prompt's first answer, read at the last read position (-1 elsewhere: not
    read) when the task has one answer set per prompt; the answer at each read position when it has
    one per position (induction); else the clean model's top token at each read position (tracr).
    """
    W_U = np.asarray(problem.model.W_U, np.float64)  # [d_model, vocab]
    directions = W_U / np.maximum(np.linalg.norm(W_U, axis=0, keepdims=True), 1e-30)
    inputs = problem.inputs
    clean = np.asarray(inputs.clean_logits)
    batch, k = clean.shape[:2]
    answers = None if inputs.answers is None else np.asarray(inputs.answers)
    reads = np.ones((batch, k), bool)
    if answers is not None and answers.shape[1] == k and k > 1:
        reference = answers
    elif answers is not None:
        reference = np.repeat(answers[:, :1], k, axis=1)
        reads[:, :-1] = False
    else:
        reference = clean.argmax(-1)
    cosine = np.einsum("dv,dbk->bkv", directions, directions[:, reference])
    return np.where(reads, cosine.argmin(-1), -1).astype(np.int32)


def weight_logits(run: GatedRun, row, point, aux, shared, per_config):
    """The clean forward with the floating-point parameters taken from ``shared``."""
    model = eqx.combine(shared, run.model)
    return forward(model, run.tokens, positions=run.positions)


def weight_gradients(problem: Problem, *, chunk_size: int | None = None):
    """``d loss / d theta`` of the clean model (a pytree like the model), summed exactly over prompts."""
    params = eqx.filter(problem.model, eqx.is_inexact_array)
    _, grads, _ = pullback(problem, weight_logits, n_points=1, weights=jnp.ones(1), shared=params, chunk_size=chunk_size)
    return grads


def node_weight_scores(problem: Problem, grads) -> dict[str, dict[str, float]]:
    """Per node of the graph: ``grad_norm`` and ``saliency`` (``sum theta * grad``) of its parameters."""
    model = problem.model
    cfg = model.config
    if cfg.kv_heads != cfg.n_heads or cfg.qk_norm:
        raise ValueError(
            "weight-gradient node scores are per head, and this model shares parameters between heads "
            f"(n_kv_heads={cfg.kv_heads} of n_heads={cfg.n_heads}, qk_norm={cfg.qk_norm}); run wrong-answer without weights=True"
        )
    attn, g_attn = model.blocks.attn, grads.blocks.attn
    norm2: dict[str, float] = {}
    dot: dict[str, float] = {}

    def add(node, theta, grad):
        theta, grad = np.asarray(theta, np.float64), np.asarray(grad, np.float64)
        norm2[node] = norm2.get(node, 0.0) + float((grad * grad).sum())
        dot[node] = dot.get(node, 0.0) + float((theta * grad).sum())

    add("embed", model.embed.W_E, grads.embed.W_E)
    if model.embed.W_pos is not None:
        add("embed", model.embed.W_pos, grads.embed.W_pos)
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O"):
                add(f"a{layer}.{h}", getattr(attn, name)[layer, h], getattr(g_attn, name)[layer, h])
        if cfg.has_mlp:
            for name in ("W_in", "b_in", "W_out", "b_out") + (("W_gate", "b_gate") if cfg.gated_mlp else ()):
                add(f"mlp{layer}", getattr(model.blocks.mlp, name)[layer], getattr(grads.blocks.mlp, name)[layer])
    return {"grad_norm": {k: float(np.sqrt(v)) for k, v in norm2.items()}, "saliency": dot}


def wrong_answer(
    problem: Problem,
    *,
    loss: str = "mse",
    target: str = "gates",
    weight_score: str = "grad_norm",
    weights: bool = False,
    pairs: bool = False,
    absolute: bool = False,
    top_n: int | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
) -> Circuit:
    """Wrong-answer gradient scores for every gate unit (see the module docstring).

    ``loss`` picks the wrong-answer loss (``acdc_jax.metrics.WRONG_ANSWER_LOSSES``); the problem's
    own metric is used only for ``metric_value``. ``target="gates"`` scores the gates (edges);
    ``target="weights"`` returns the node-level circuit of the weight gradients, scored by
    ``weight_score`` (``grad_norm`` or ``saliency``). ``weights=True`` (gates target) adds the
    per-node weight-gradient scores to ``circuit.extra["weight_scores"]``. ``absolute``, ``top_n``,
    ``threshold``, ``chunk_size`` as in ``eap``.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if weight_score not in WEIGHT_SCORES:
        raise ValueError(f"weight_score must be one of {', '.join(WEIGHT_SCORES)}, got {weight_score!r}")
    needs_answers = loss in ("mse", "ce", "flip", "logit_diff")
    if needs_answers and (problem.inputs.answers is None or problem.inputs.wrong_answers is None):
        raise ValueError(
            f"the {loss!r} wrong-answer loss needs a task with answers and wrong_answers; {problem.task_name!r} has none "
            "(most_dissimilar, inverse and semantic run on every task)"
        )
    paired = is_swapped_pairs(problem)
    if pairs and not paired:
        raise ValueError(
            "pairs=True needs swapped prompt pairs: rows 2i and 2i+1 with answer and wrong answer exchanged "
            "(build the task with pairs=True)"
        )
    started = time.perf_counter()
    task_problem = problem
    problem = problem.with_metric(wrong_answer_loss(loss))
    if loss == "most_dissimilar_cosine":
        inputs = dataclasses.replace(problem.inputs, wrong_targets=jnp.asarray(cosine_targets(problem)))
        problem = dataclasses.replace(problem, inputs=inputs)
    settings = {"loss": loss, "target": target, "weights": bool(weights) or target == "weights", "paired": paired,
                "ablation": problem.ablation}
    extra = {}
    if weights or target == "weights":
        # the problem's loss is -W, so the gradient of W is minus it
        grads = weight_gradients(problem, chunk_size=chunk_size)
        scores = node_weight_scores(problem, grads)
        scores["saliency"] = {k: -v for k, v in scores["saliency"].items()}
        extra["weight_scores"] = scores
    if target == "weights":
        # a node-level circuit of the weight scores, evaluated in the task's metric
        scored = task_problem.with_graph(Graph.from_model(task_problem.model, problem.graph.qkv_split, level="node"))
        chosen = extra["weight_scores"][weight_score]
        signed = np.array([chosen[name] for name in scored.graph.gate_names])
        settings |= {"weight_score": weight_score, "metric_options": [list(o) for o in task_problem.metric.options]}
    else:
        scored = problem
        signed = -gate_gradients(problem, problem.graph.gates(1.0, problem.model.dtype)[None], chunk_size=chunk_size)[0]
    circuit = attribution_circuit(
        scored,
        "wrong-answer",
        signed,
        absolute=absolute,
        top_n=top_n,
        threshold=threshold,
        started=started,
        settings=settings,
        extra=extra,
    )
    if target == "weights":
        return circuit
    # report the pruned circuit in the task's metric: the wrong-answer losses are symmetric
    # (an inverted circuit can score as well as a correct one)
    circuit.metric = task_problem.metric.name
    circuit.settings["metric_options"] = [list(o) for o in task_problem.metric.options]
    if circuit.metric_value is not None:
        gates = task_problem.graph.gates_from_names(circuit.kept, task_problem.model.dtype)
        circuit.metric_value = computation(task_problem).evaluate(gates)
    return circuit
