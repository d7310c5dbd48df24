"""Induction on a small attention-only model: repeated random-token segments, their data and circuit.

The data (also the shipped model's training distribution, see ``acdc_jax.training``): ``BOS``
then ``seq_len - 1`` tokens: noise, a segment of ``S`` tokens, the same segment again, noise.
``S`` and the split of the ``seq_len - 1 - 2S`` noise places into before/after are uniformly
random, so no absolute position tells where a copy is. Every non-BOS token of a row is distinct
except for the repeat, so the only way to predict a token of the second copy is to find the earlier
occurrence of the current token and copy what followed it (induction).

The task's prompts are ``BOS x x`` (no noise; ``S`` fixed, default ``max_segment``): the
first ``1 + 2S`` tokens of a training row with no noise before the copies.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..models import Transformer, attention_patterns
from ._task import CanonicalCircuit, Task, TaskError

BOS = 0


@dataclasses.dataclass(frozen=True)
class RepeatedTokens:
    """The distribution of repeated-segment sequences: ``BOS``, noise, segment, segment, noise.

    Tokens are ``1 .. d_vocab-1`` (``0`` is ``BOS``), distinct within a row except for the
    repeat; segment lengths are uniform in ``min_segment .. max_segment`` unless fixed.
    """

    seq_len: int = 25
    d_vocab: int = 64
    min_segment: int = 2
    max_segment: int = 10

    def __post_init__(self):
        if not 1 <= self.min_segment <= self.max_segment:
            raise TaskError(f"need 1 <= min_segment <= max_segment, got {self.min_segment}, {self.max_segment}")
        if 1 + 2 * self.max_segment > self.seq_len:
            raise TaskError(f"two segments of {self.max_segment} tokens and BOS do not fit in seq_len={self.seq_len}")
        if self.seq_len - 1 - self.min_segment > self.d_vocab - 1:
            raise TaskError(
                f"a row needs {self.seq_len - 1 - self.min_segment} distinct tokens but the vocabulary has only "
                f"{self.d_vocab - 1} besides BOS; raise d_vocab or min_segment"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sample(
        self, key: jax.Array, n: int, segment_len: int | None = None, noise_before: int | None = None
    ) -> "RepeatedBatch":
        """``n`` sequences and where their copies are (pure in ``key``; jit-friendly for a static ``n``).

        ``segment_len`` and ``noise_before`` fix ``S`` and the number of noise tokens between
        ``BOS`` and the first copy; otherwise each row draws them.
        """
        key_len, key_noise, key_tok = jax.random.split(key, 3)
        if segment_len is None:
            seg = jax.random.randint(key_len, (n,), self.min_segment, self.max_segment + 1)
        else:
            if not self.min_segment <= segment_len <= self.max_segment:
                raise TaskError(
                    f"segment_len={segment_len} is outside the training range {self.min_segment}..{self.max_segment}"
                )
            seg = jnp.full((n,), segment_len)
        spare = self.seq_len - 1 - 2 * seg
        if noise_before is None:
            first = 1 + jax.random.randint(key_noise, (n,), 0, spare + 1)
        else:
            if segment_len is None or not 0 <= noise_before <= self.seq_len - 1 - 2 * segment_len:
                raise TaskError(f"noise_before={noise_before} needs a fixed segment_len and must fit in the row")
            first = jnp.full((n,), 1 + noise_before)
        second = first + seg
        # argsort of iid uniforms is a uniformly random permutation: distinct tokens in each row
        tokens = jnp.argsort(jax.random.uniform(key_tok, (n, self.d_vocab - 1)), axis=-1) + 1
        pos = jnp.arange(1, self.seq_len)[None, :]
        in_second = (pos >= second[:, None]) & (pos < (second + seg)[:, None])
        # a second-copy place re-reads the token drawn for its first-copy twin
        index = jnp.where(in_second, pos - seg[:, None], pos) - 1
        body = jnp.take_along_axis(tokens, index, axis=1)
        tokens = jnp.concatenate([jnp.full((n, 1), BOS, body.dtype), body], axis=1)
        return RepeatedBatch(tokens=tokens, segment_len=seg, first=first, second=second)


class RepeatedBatch(NamedTuple):
    """Sequences and their layout: copy ``c`` of row ``b`` is ``tokens[b, c[b] : c[b] + segment_len[b]]``."""

    tokens: Int[Array | np.ndarray, "n seq_len"]
    segment_len: Int[Array | np.ndarray, " n"]
    first: Int[Array | np.ndarray, " n"]
    second: Int[Array | np.ndarray, " n"]

    def predictable(self) -> Bool[Array, "n seq_len_minus_1"]:
        """``[b, t]``: the prediction made at position ``t`` (of token ``t + 1``) is an induction target.

        True for ``t`` in ``second .. second + S - 2``: the second copy's tokens 2..S follow a token
        whose earlier occurrence shows what comes next.
        """
        t = jnp.arange(self.tokens.shape[1] - 1)[None, :]
        return (t >= self.second[:, None]) & (t < (self.second + self.segment_len - 1)[:, None])


def repeated_tokens(
    spec: RepeatedTokens, n: int, seed: int, segment_len: int | None = None, noise_before: int | None = None
) -> RepeatedBatch:
    """``spec.sample`` as numpy arrays, deterministic in ``seed``."""
    batch = spec.sample(jax.random.PRNGKey(seed), n, segment_len, noise_before)
    return RepeatedBatch(*(np.asarray(a) for a in batch))


# --------------------------------------------------------------------------------------------
# Finding the heads from attention patterns

# A head is counted when, on average over the task's prompts, at least this share of its attention
# goes to the key its mechanism predicts. A head attending uniformly would put about 1/(i+1) there
# (0.13 averaged over the previous-token reads of a 21-token prompt, 0.07 over the second copy).
# On the shipped model and the default task the scores fall into two separated groups (printed by
# tests/test_induction.py): previous-token 0.60 and 0.71 in layer 0 against at most 0.29;
# induction 0.72 to 1.00 in layer 1 against at most 0.11 in layer 0.
PREVIOUS_TOKEN_CUTOFF = 0.4
INDUCTION_CUTOFF = 0.4


def head_scores(
    patterns: Float[Array | np.ndarray, "n_layers batch n_heads q_pos k_pos"], batch: RepeatedBatch
) -> tuple[np.ndarray, np.ndarray]:
    """Previous-token and induction scores ``[n_layers, n_heads]`` from patterns ``[layer, batch, head, q, k]``.

    - previous-token score: mean attention from position ``i`` to ``i - 1``, over rows and every
      ``i >= 1``;
    - induction score: mean attention from a second-copy position ``p`` to the token after the
      earlier occurrence of ``p``'s token, ``p - S + 1``, over rows and the ``S`` places of the
      second copy.
    """
    patterns = np.asarray(patterns, np.float64)
    n_pos = patterns.shape[-1]
    i = np.arange(1, n_pos)
    previous = patterns[..., i, i - 1].mean(axis=(1, 3))
    seg, second = np.asarray(batch.segment_len), np.asarray(batch.second)
    offsets = np.arange(int(seg.max()))[None, :]
    inside = (offsets < seg[:, None]) & (second[:, None] + offsets < n_pos)
    rows = np.broadcast_to(np.arange(len(seg))[:, None], inside.shape)[inside]
    query = (second[:, None] + offsets)[inside]
    key = query - np.broadcast_to(seg[:, None], inside.shape)[inside] + 1
    induction = patterns[:, rows, :, query, key].mean(axis=0)  # advanced indices first: [reads, layer, head]
    return previous, induction


@dataclasses.dataclass(frozen=True)
class InductionHeads:
    """The heads found from attention patterns, with every head's scores ``[n_layers, n_heads]``."""

    previous_token: tuple[int, ...]  # heads of layer 0
    induction: tuple[int, ...]  # heads of layer 1
    previous_token_scores: np.ndarray
    induction_scores: np.ndarray

    def describe(self) -> str:
        prev = ", ".join(f"a0.{h} ({self.previous_token_scores[0, h]:.2f})" for h in self.previous_token)
        ind = ", ".join(f"a1.{h} ({self.induction_scores[1, h]:.2f})" for h in self.induction)
        return f"previous-token heads {prev or 'none'}; induction heads {ind or 'none'}"


def find_induction_heads(model: Transformer, batch: RepeatedBatch) -> InductionHeads:
    """Previous-token heads of layer 0 and induction heads of layer 1 on ``batch`` (cut-offs above)."""
    if model.config.n_layers != 2:
        raise TaskError(
            f"the induction circuit is defined for two-layer models (layer 0 feeds layer 1, which feeds the "
            f"logits); this model has {model.config.n_layers} layers"
        )
    previous, induction = head_scores(attention_patterns(model, np.asarray(batch.tokens)), batch)
    return InductionHeads(
        previous_token=tuple(int(h) for h in np.flatnonzero(previous[0] >= PREVIOUS_TOKEN_CUTOFF)),
        induction=tuple(int(h) for h in np.flatnonzero(induction[1] >= INDUCTION_CUTOFF)),
        previous_token_scores=previous,
        induction_scores=induction,
    )


def canonical_circuit(heads: InductionHeads) -> CanonicalCircuit:
    """The previous-token -> induction-head circuit in this project's edge names.

    For every previous-token head ``p`` (layer 0) and induction head ``i`` (layer 1):

    - ``a0.p->a1.i.k``: K-composition, the key at position j carries the token before j;
    - ``embed->a1.i.q``: the query is the current token;
    - ``embed->a1.i.v``: the value is the attended token itself, the one to predict;
    - ``a1.i->logits``: the induction head writes that token's logit;
    - ``embed->a0.p.q`` and ``embed->a0.p.k``: the previous-token pattern is computed from
      positions, which only ``embed`` provides;
    - ``embed->a0.p.v``: the previous-token head moves the previous token's identity.

    Left out: the direct path ``embed->logits`` and heads' direct writes to the logits other than
    the induction heads' (no part of copying), the induction heads' reads of earlier heads through
    q and v, and every edge of heads below the cut-offs.

    ``ablation="corrupt"``: the task's corrupted prompts are other prompts at the same positions,
    so the positional edges ``embed->a0.p.q|k`` change little under that patching (single-edge
    KL <= 0.02 on the shipped model; under zero ablation a0.1's are 2.6 and 2.5); the other canonical
    edges are the ones that matter under it (the 12 largest single-edge KLs are all canonical;
    the next is ``embed->a1.0.k`` at 0.08). Induction heads a1.2 and a1.3 pass the cut-off but
    are largely redundant with a1.0 and a1.1 (their edges: single-edge KL <= 0.03).
    """
    edges, nodes = [], ["embed"]
    for p in heads.previous_token:
        nodes.append(f"a0.{p}")
        edges += [f"embed->a0.{p}.q", f"embed->a0.{p}.k", f"embed->a0.{p}.v"]
    for i in heads.induction:
        nodes.append(f"a1.{i}")
        edges += [f"a0.{p}->a1.{i}.k" for p in heads.previous_token]
        edges += [f"embed->a1.{i}.q", f"embed->a1.{i}.v", f"a1.{i}->logits"]
    return CanonicalCircuit(
        edges=tuple(edges),
        nodes=tuple(nodes),
        ablation="corrupt",
        source="found from attention patterns: " + heads.describe(),
    )


# --------------------------------------------------------------------------------------------
# The task


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation of ``0..n-1`` that moves every index (one cycle through a shuffled order)."""
    if n < 2:
        raise TaskError(f"corrupted prompts are other rows of the batch, so the task needs at least 2 prompts, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def induction_task(
    n_prompts: int = 50,
    *,
    seed: int = 0,
    segment_len: int | None = None,
    model: Transformer | None = None,
    data: RepeatedTokens | None = None,
) -> Task:
    """Induction on the shipped attention-only model: ``BOS x x`` prompts, ``x`` random distinct tokens.

    - ``clean``: ``BOS`` then a segment of ``S = segment_len`` (default ``data.max_segment``)
      random distinct tokens, twice; deterministic in ``seed`` and ``n_prompts``.
    - ``corrupt``: the clean prompts in another order (every row replaced by a different one), as
      ACDC's induction task corrupts by shuffling its batch. A corrupted row is an induction prompt
      too, with other tokens: patching a source swaps in what it computes on another sequence,
      and the positions (hence what position alone computes) stay the same.
    - ``positions``: the second copy's positions ``S+1 .. 2S-1``: there the next token (the copy's
      tokens 2..S) is predictable; ``answers`` ``[batch, S-1]`` are those tokens.
    - metric ``nll`` (mean -log p of the induction-predicted token); ACDC prunes with ``kl``.
    - ``canonical``: found on these prompts from the model's attention patterns
      (``find_induction_heads``, ``canonical_circuit``).

    ``model`` defaults to the shipped ``induction`` model (it is only used to find the heads).
    """
    from ..models import load_model

    data = data or RepeatedTokens()
    seg = data.max_segment if segment_len is None else segment_len
    batch = repeated_tokens(data, n_prompts, seed, segment_len=seg, noise_before=0)
    n_pos = 1 + 2 * seg
    # the first 1 + 2S tokens of a training row without leading noise: BOS x x
    batch = RepeatedBatch(batch.tokens[:, :n_pos], batch.segment_len, batch.first, batch.second)
    clean = batch.tokens
    corrupt = clean[derangement(n_prompts, seed)]
    positions = np.tile(np.arange(seg + 1, 2 * seg), (n_prompts, 1))
    answers = clean[:, seg + 2 : 2 * seg + 1]
    heads = find_induction_heads(model if model is not None else load_model("induction"), batch)
    return Task(
        name="induction",
        clean=clean,
        corrupt=corrupt,
        positions=positions,
        metric="nll",
        answers=answers,
        canonical=canonical_circuit(heads),
        ablation="corrupt",
        model="induction",
        discovery_metric="kl",
        description=f"induction on repeated random tokens (BOS + {seg} tokens twice, {n_prompts} prompts, seed {seed})",
    )
