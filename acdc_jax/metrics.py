"""Task metrics as pure functions of the logits at the positions a task reads.

Every metric is ``fn(logits, inputs) -> scalar`` where ``logits`` is ``[batch, k, vocab]`` (the
unembedding at the task's read positions, see ``GatedRun.positions``) and ``inputs`` holds what
the metric compares against: the clean model's logits there, answer and wrong-answer tokens, or
answer masks. A ``Metric`` also says which direction is better, which ACDC and the faithfulness
curves need; ``Metric.loss`` is the metric turned so that lower is always better.

Sign conventions, per metric:
- ``kl``: KL(clean || patched), mean over prompts and read positions; 0 for the clean model, lower is better.
- ``logit_diff``: logit(answer) - logit(wrong answer), mean over prompts; higher is better.
  With several wrong answers per prompt, ``wrong_reduce`` picks their ``max`` (Docstring's "best
  wrong answer") or ``mean``.
- ``prob_diff``: sum of probabilities on ``answer_mask`` minus on ``wrong_mask`` (Greater-Than:
  years > YY minus years <= YY); higher is better.
- ``nll``: -log p(answer), mean; lower is better.
- ``l2`` (ACDC's tracr metric, also ``mse``): mean over prompts, read positions and ``logit_dims``
  of (logits - clean_logits)^2; 0 for the clean model, lower is better.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Scalar


class MetricInputs(eqx.Module):
    """What a metric compares the patched logits with (all at the task's read positions)."""

    clean_logits: Float[Array, "batch k vocab"]
    answers: Int[Array, "batch n_answers"] | None = None
    wrong_answers: Int[Array, "batch n_wrong"] | None = None
    answer_mask: Bool[Array, "batch vocab"] | None = None
    wrong_mask: Bool[Array, "batch vocab"] | None = None
    read_mask: Float[Array, "batch k"] | None = None  # weights of the read positions (1 = counts)
    # a target token per read position (-1: not read), set by methods that pick one from the model
    # (the wrong-answer gradient's ``most_dissimilar_cosine``)
    wrong_targets: Int[Array, "batch k"] | None = None

    def subset(self, index) -> "MetricInputs":
        return jax.tree.map(lambda x: x[index], self)


MetricFn = Callable[[Array, MetricInputs], Scalar]


@dataclasses.dataclass(frozen=True)
class Metric:
    """A named metric with its direction; hashable, so it can be a static argument of ``jit``."""

    name: str
    fn: MetricFn = dataclasses.field(compare=False)
    higher_is_better: bool
    description: str = dataclasses.field(default="", compare=False)
    options: tuple = ()

    def __call__(self, logits: Array, inputs: MetricInputs) -> Scalar:
        # at least float32: bf16 activations must not make a log-softmax or a small difference coarse
        wide = jnp.promote_types(logits.dtype, jnp.float32)
        clean = inputs.clean_logits
        if clean.dtype != jnp.promote_types(clean.dtype, jnp.float32):
            inputs = dataclasses.replace(inputs, clean_logits=clean.astype(jnp.promote_types(clean.dtype, jnp.float32)))
        return self.fn(logits.astype(wide), inputs)

    def loss(self, logits: Array, inputs: MetricInputs) -> Scalar:
        """The metric turned so that lower is better (negated when higher is better)."""
        value = self(logits, inputs)
        return -value if self.higher_is_better else value


def _mean_over_reads(values: Array, inputs: MetricInputs) -> Scalar:
    """Mean of ``[batch, k]`` values over prompts and (weighted) read positions."""
    if inputs.read_mask is None:
        return values.mean()
    return (values * inputs.read_mask).sum() / inputs.read_mask.sum()


def _last_read(logits: Array) -> Array:
    """Answer metrics read one position per prompt: the last of the read positions."""
    return logits[:, -1, :]


def kl_divergence(logits, inputs: MetricInputs):
    clean = jax.nn.log_softmax(inputs.clean_logits, axis=-1)
    patched = jax.nn.log_softmax(logits, axis=-1)
    kl = (jnp.exp(clean) * (clean - patched)).sum(-1)
    return _mean_over_reads(kl, inputs)


def _answer_logits(logits, index):
    return jnp.take_along_axis(_last_read(logits), index, axis=-1)


def logit_diff(logits, inputs: MetricInputs, wrong_reduce: str = "mean"):
    right = _answer_logits(logits, inputs.answers).mean(-1)
    wrong = _answer_logits(logits, inputs.wrong_answers)
    wrong = wrong.max(-1) if wrong_reduce == "max" else wrong.mean(-1)
    return (right - wrong).mean()


def prob_diff(logits, inputs: MetricInputs):
    probs = jax.nn.softmax(_last_read(logits), axis=-1)
    if inputs.answer_mask is not None:
        right = (probs * inputs.answer_mask).sum(-1)
        wrong = (probs * inputs.wrong_mask).sum(-1)
    else:
        right = jnp.take_along_axis(probs, inputs.answers, axis=-1).sum(-1)
        wrong = jnp.take_along_axis(probs, inputs.wrong_answers, axis=-1).sum(-1)
    return (right - wrong).mean()


def neg_log_prob(logits, inputs: MetricInputs):
    """-log p(answer); with k read positions, ``answers`` is ``[batch, k]``: one per position."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    if inputs.answers.shape[1] == logits.shape[1]:
        picked = jnp.take_along_axis(logp, inputs.answers[:, :, None], axis=-1)[:, :, 0]
        return -_mean_over_reads(picked, inputs)
    return -jnp.take_along_axis(_last_read(logp), inputs.answers, axis=-1).mean()


def l2_distance(logits, inputs: MetricInputs, logit_dims: tuple[int, ...] | None = None):
    diff = logits - inputs.clean_logits
    if logit_dims is not None:
        diff = diff[..., jnp.asarray(logit_dims)]
    return _mean_over_reads((diff * diff).mean(-1), inputs)


def _make(name: str, options: tuple = ()) -> Metric:
    opts = dict(options)
    if name == "kl":
        return Metric("kl", kl_divergence, False, "KL(clean || patched) at the read positions", options)
    if name == "logit_diff":
        reduce = opts.get("wrong_reduce", "mean")
        return Metric(
            "logit_diff", lambda l, i: logit_diff(l, i, reduce), True, f"logit(answer) - {reduce} logit(wrong answers)", options
        )
    if name == "prob_diff":
        return Metric("prob_diff", prob_diff, True, "p(answers) - p(wrong answers)", options)
    if name == "nll":
        return Metric("nll", neg_log_prob, False, "-log p(answer)", options)
    if name in ("l2", "mse"):
        dims = opts.get("logit_dims")
        dims = None if dims is None else tuple(dims)
        return Metric(name, lambda l, i: l2_distance(l, i, dims), False, "mean squared distance to the clean logits", options)
    close = difflib.get_close_matches(name, METRIC_NAMES, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown metric {name!r}: choose one of {', '.join(METRIC_NAMES)}{hint}")


METRIC_NAMES = ("kl", "logit_diff", "prob_diff", "nll", "l2", "mse")


def get_metric(name: str | Metric, **options) -> Metric:
    """A metric by name; options (``wrong_reduce``, ``logit_dims``) become part of its identity."""
    if isinstance(name, Metric):
        return name
    return _make(name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())))


# --------------------------------------------------------------------------------------------
# Wrong-answer losses: how far the model is from a "maximally wrong" output
#
# The gradient proposal scores gates (and weights) by the gradient of a loss whose minimum is a
# maximally wrong output. Each loss below is a ``Metric`` with ``higher_is_better=True``: its value
# is 0 (or its minimum) at the maximally wrong output and grows as the model answers correctly, so
# ``Metric.loss`` (lower is better) and every attribution method's sign convention apply unchanged:
# a positive edge score means that removing the edge moves the output towards wrong.
#
# All read the last read position of each prompt; ``a`` is the mean logit of the prompt's answers,
# ``w`` the mean logit of its wrong answers, ``LD = a - w``; every loss is a mean over prompts.
# - ``mse`` (the proposal's): ``(a - w)^2``, the squared difference of the two answer logits.
#   Maximally wrong: 0, the two answers indistinguishable. On a swapped prompt pair (IOI with
#   ``pairs=True``: rows 2i and 2i+1 have their answer and wrong answer exchanged) the proposal
#   sums this over both prompts; since ``(a - w)^2`` is symmetric in the two names, the pair sum is
#   exactly twice the mean over the pair's two prompts, so pairing enters only as that constant
#   factor and the loss is defined (and identical in ranking) on any task with answers.
# - ``ce``: ``-log p(wrong answers)``, the cross-entropy of the prediction against the wrong
#   answer(s) (with several, against their total probability). Maximally wrong: 0, all probability
#   on the wrong answer.
# - ``flip``: ``(LD + LD_clean)^2``, the squared distance of the logit difference from the mirror
#   image of the clean model's. Maximally wrong: 0, the preference reversed at the same margin.
# - ``logit_diff``: ``LD`` itself, unbounded below (the plain logit difference, for comparison).
# The following read every read position (weighted by ``read_mask``, as ``kl``), so they also run
# on tasks without wrong answers (tracr, induction); their targets come from the clean logits ``z``
# (constants: no gradient flows through them); ``p = softmax(logits)``:
# - ``most_dissimilar``: ``-log p(t)`` with ``t = argmin z``, the token the clean model finds least
#   likely (the "most dissimilar token" by logit). Maximally wrong: all probability on ``t``.
# - ``most_dissimilar_cosine``: ``-log p(t)`` with ``t`` the token whose unembedding direction has
#   the lowest cosine to the reference token's (the "most dissimilar token" by unembedding): the
#   reference is the prompt's answer at the last read position (IOI, Greater-Than, Docstring), the
#   per-position answer (induction), else the clean model's top token at each read position
#   (tracr). ``wrong_targets`` carries ``t`` (the method computes it from the model's unembedding).
# - ``inverse``: ``KL(q || p)`` with ``q = softmax(-z)``, the inverted clean distribution (the
#   "inverse of the logits"). Maximally wrong: ``p = q``, the clean ranking reversed.
# - ``semantic``: ``-log p(W)``, the total probability of the task's own wrong answers ``W``:
#   ``wrong_mask`` (Greater-Than: years <= YY), else ``wrong_answers`` (IOI: the other name,
#   Docstring: the wrong arguments; then it equals ``ce``), else, with one answer per read position
#   (induction), the clean model's most likely non-answer token there; else (tracr: no answers)
#   the output the clean model ranks lowest (as ``most_dissimilar``). Maximally wrong: all
#   probability on the wrong answers.


def _answer_logit_pair(logits, inputs: MetricInputs) -> tuple[Array, Array]:
    if inputs.answers is None or inputs.wrong_answers is None:
        raise ValueError("wrong-answer losses need a task with answers and wrong_answers")
    right = _answer_logits(logits, inputs.answers).mean(-1)
    wrong = _answer_logits(logits, inputs.wrong_answers).mean(-1)
    return right, wrong


def wrong_answer_mse(logits, inputs: MetricInputs):
    right, wrong = _answer_logit_pair(logits, inputs)
    return ((right - wrong) ** 2).mean()


def wrong_answer_ce(logits, inputs: MetricInputs):
    if inputs.wrong_answers is None:
        raise ValueError("the 'ce' wrong-answer loss needs a task with wrong_answers")
    logp = jax.nn.log_softmax(_last_read(logits), axis=-1)
    picked = jnp.take_along_axis(logp, inputs.wrong_answers, axis=-1)
    return -jax.nn.logsumexp(picked, axis=-1).mean()


def wrong_answer_flip(logits, inputs: MetricInputs):
    right, wrong = _answer_logit_pair(logits, inputs)
    clean_right, clean_wrong = _answer_logit_pair(inputs.clean_logits, inputs)
    return ((right - wrong + clean_right - clean_wrong) ** 2).mean()


def wrong_answer_logit_diff(logits, inputs: MetricInputs):
    right, wrong = _answer_logit_pair(logits, inputs)
    return (right - wrong).mean()


def _reads_logp(logits):
    return jax.nn.log_softmax(logits, axis=-1)


def wrong_answer_most_dissimilar(logits, inputs: MetricInputs):
    target = jnp.argmin(inputs.clean_logits, axis=-1)
    picked = jnp.take_along_axis(_reads_logp(logits), target[..., None], axis=-1)[..., 0]
    return -_mean_over_reads(picked, inputs)


def wrong_answer_most_dissimilar_cosine(logits, inputs: MetricInputs):
    if inputs.wrong_targets is None:
        raise ValueError("the 'most_dissimilar_cosine' wrong-answer loss needs wrong_targets from the model's unembedding "
                         "(run it through acdc_jax.wrong_answer, which sets them)")
    read = (inputs.wrong_targets >= 0).astype(logits.dtype)
    target = jnp.maximum(inputs.wrong_targets, 0)
    picked = jnp.take_along_axis(_reads_logp(logits), target[..., None], axis=-1)[..., 0]
    if inputs.read_mask is not None:
        read = read * inputs.read_mask
    return -(picked * read).sum() / read.sum()


def wrong_answer_inverse(logits, inputs: MetricInputs):
    log_q = jax.nn.log_softmax(-inputs.clean_logits, axis=-1)
    kl = (jnp.exp(log_q) * (log_q - _reads_logp(logits))).sum(-1)
    return _mean_over_reads(kl, inputs)


def wrong_answer_semantic(logits, inputs: MetricInputs):
    logp = _reads_logp(logits)
    if inputs.wrong_mask is not None:
        last = logp[:, -1, :]
        return -jax.nn.logsumexp(jnp.where(inputs.wrong_mask, last, -jnp.inf), axis=-1).mean()
    if inputs.wrong_answers is not None:
        picked = jnp.take_along_axis(logp[:, -1, :], inputs.wrong_answers, axis=-1)
        return -jax.nn.logsumexp(picked, axis=-1).mean()
    clean = inputs.clean_logits
    if inputs.answers is not None and inputs.answers.shape[1] == logits.shape[1]:
        is_answer = jax.nn.one_hot(inputs.answers, clean.shape[-1], dtype=bool)
        target = jnp.argmax(jnp.where(is_answer, -jnp.inf, clean), axis=-1)
    else:
        target = jnp.argmin(clean, axis=-1)
    picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return -_mean_over_reads(picked, inputs)


_WRONG_ANSWER_LOSSES = {
    "mse": (wrong_answer_mse, "(logit(answer) - logit(wrong))^2; 0 when the two answers are indistinguishable"),
    "ce": (wrong_answer_ce, "-log p(wrong answers); 0 when all probability is on the wrong answer"),
    "flip": (wrong_answer_flip, "(LD + LD_clean)^2; 0 when the logit difference is mirrored"),
    "logit_diff": (wrong_answer_logit_diff, "logit(answer) - logit(wrong), unbounded below"),
    "most_dissimilar": (wrong_answer_most_dissimilar, "-log p(argmin clean logit); 0 when all probability is on it"),
    "most_dissimilar_cosine": (wrong_answer_most_dissimilar_cosine,
                               "-log p(token least cosine-similar to the answer in W_U); 0 when all probability is on it"),
    "inverse": (wrong_answer_inverse, "KL(softmax(-z_clean) || p); 0 when the clean distribution is inverted"),
    "semantic": (wrong_answer_semantic, "-log p(the task's wrong answers); 0 when all probability is on them"),
}
WRONG_ANSWER_LOSSES = tuple(_WRONG_ANSWER_LOSSES)


def wrong_answer_loss(name: str) -> Metric:
    """A wrong-answer loss by name (one of ``WRONG_ANSWER_LOSSES``) as a higher-is-better ``Metric``."""
    if name not in _WRONG_ANSWER_LOSSES:
        close = difflib.get_close_matches(name, WRONG_ANSWER_LOSSES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown wrong-answer loss {name!r}: choose one of {', '.join(WRONG_ANSWER_LOSSES)}{hint}")
    fn, description = _WRONG_ANSWER_LOSSES[name]
    return Metric(f"wrong_answer_{name}", fn, True, description)
