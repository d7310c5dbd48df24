"""A model with a hand-planted circuit, and a task on it: only the planted edges can matter.

The model is a hard-attention induction circuit in a residual stream split into named blocks:

- ``tok`` (one-hot of the token) and ``pos`` (one-hot of the position) are written by ``embed``;
- ``a0.0`` is a previous-token head: q and k read ``pos`` (q_i . k_j is large iff j = i - 1),
  v reads ``tok``, and it writes the previous token into ``prev``;
- ``a1.0`` is an induction head: q reads ``tok``, k reads ``prev`` (it attends where the previous
  token equals the current one), v reads ``tok``, and it writes that token into ``out``;
- the unembedding reads only ``out``.

Every other component (``a0.1``, ``a1.1``, both MLPs) has random weights that read the whole
stream but write only into ``junk``, which nothing reads, and there is no LayerNorm. So exactly
these 7 edges can change the output: ``embed->a0.0.q``, ``embed->a0.0.k``, ``embed->a0.0.v``,
``a0.0->a1.0.k``, ``embed->a1.0.q``, ``embed->a1.0.v``, ``a1.0->logits``. Under zero ablation
each of them matters; under corrupted-input patching the two positional q/k edges of ``a0.0``
cannot (the corrupted prompts have the same positions).
"""

from __future__ import annotations

import jax
import numpy as np

import acdc_jax as aj
from acdc_jax.models import TransformerConfig, build_model, expected_shapes
from acdc_jax.tasks import CanonicalCircuit, Task

VOCAB = 6
N_CTX = 10
JUNK = 4
BLOCKS = {"tok": VOCAB, "pos": N_CTX, "prev": VOCAB, "out": VOCAB, "junk": JUNK}
OFFSET = dict(zip(BLOCKS, np.cumsum([0] + list(BLOCKS.values()))[:-1].tolist()))
D_MODEL = sum(BLOCKS.values())
D_HEAD = N_CTX
SHARPNESS = 30.0

PLANTED_EDGES = (
    "embed->a0.0.q",
    "embed->a0.0.k",
    "embed->a0.0.v",
    "a0.0->a1.0.k",
    "embed->a1.0.q",
    "embed->a1.0.v",
    "a1.0->logits",
)
PLANTED_NODES = ("embed", "a0.0", "a1.0")


def _block(name: str) -> slice:
    return slice(OFFSET[name], OFFSET[name] + BLOCKS[name])


def planted_model(seed: int = 0, junk_scale: float = 0.5) -> aj.Transformer:
    cfg = TransformerConfig(
        n_layers=2, n_heads=2, d_model=D_MODEL, d_head=D_HEAD, d_mlp=8, d_vocab=VOCAB, n_ctx=N_CTX,
        act_fn="relu", normalization=None, causal=True, attn_scale=1.0, tied_unembed=False, name="planted-induction",
    )
    rng = np.random.RandomState(seed)
    w = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(cfg).items()}
    tok, pos, prev, out, junk = (_block(b) for b in BLOCKS)
    w["embed.W_E"][np.arange(VOCAB), OFFSET["tok"] + np.arange(VOCAB)] = 1.0
    w["embed.W_pos"][np.arange(N_CTX), OFFSET["pos"] + np.arange(N_CTX)] = 1.0
    # a0.0, previous-token head: q_i = e_i, k_j = e_{j+1}
    w["blocks.attn.W_Q"][0, 0, pos, :] = SHARPNESS * np.eye(N_CTX)
    w["blocks.attn.W_K"][0, 0, pos, :] = np.eye(N_CTX, k=1)
    w["blocks.attn.W_V"][0, 0, tok, :VOCAB] = np.eye(VOCAB)
    w["blocks.attn.W_O"][0, 0, :VOCAB, prev] = np.eye(VOCAB)
    # a1.0, induction head: q = current token, k = previous token, v = token
    w["blocks.attn.W_Q"][1, 0, tok, :VOCAB] = SHARPNESS * np.eye(VOCAB)
    w["blocks.attn.W_K"][1, 0, prev, :VOCAB] = np.eye(VOCAB)
    w["blocks.attn.W_V"][1, 0, tok, :VOCAB] = np.eye(VOCAB)
    w["blocks.attn.W_O"][1, 0, :VOCAB, out] = np.eye(VOCAB)
    # junk: a0.1, a1.1 and both MLPs read everything and write only into the junk block
    for layer in range(2):
        for name in ("W_Q", "W_K", "W_V"):
            w[f"blocks.attn.{name}"][layer, 1] = junk_scale * rng.randn(D_MODEL, D_HEAD)
        w["blocks.attn.W_O"][layer, 1][:, junk] = junk_scale * rng.randn(D_HEAD, JUNK)
    w["blocks.mlp.W_in"][:] = junk_scale * rng.randn(2, D_MODEL, 8)
    w["blocks.mlp.b_in"][:] = junk_scale * rng.randn(2, 8)
    w["blocks.mlp.W_out"][:, :, junk] = junk_scale * rng.randn(2, 8, JUNK)
    w["blocks.mlp.b_out"][:, junk] = junk_scale * rng.randn(2, JUNK)
    w["unembed.W_U"][out, :] = 4.0 * np.eye(VOCAB)
    return build_model(cfg, w)


def planted_task(n_prompts: int = 12, seed: int = 0, ablation: str = "zero", metric: str = "nll") -> Task:
    """``BOS x x`` with ``x`` four distinct tokens; the metric reads the second copy.

    BOS (the last token id) is never in ``x``, so position 0's "previous token" (itself) never
    matches a query.
    """
    rng = np.random.RandomState(seed)
    half, bos = 4, VOCAB - 1
    first = np.stack([rng.permutation(VOCAB - 1)[:half] for _ in range(n_prompts)])
    bos_column = np.full((n_prompts, 1), bos)
    clean = np.concatenate([bos_column, first, first], axis=1)
    other = np.stack([rng.permutation(VOCAB - 1)[:half] for _ in range(n_prompts)])
    corrupt = np.concatenate([bos_column, other, other[:, ::-1]], axis=1)
    read = np.tile(np.arange(half + 1, 2 * half), (n_prompts, 1))
    answers = clean[:, half + 2 :]
    wrong = (answers + 1) % (VOCAB - 1)
    return Task(
        name="planted-induction",
        clean=clean,
        corrupt=corrupt,
        positions=read,
        metric=metric,
        answers=answers if metric == "nll" else answers[:, -1:],
        wrong_answers=None if metric == "nll" else wrong[:, -1:],
        canonical=CanonicalCircuit(PLANTED_EDGES, PLANTED_NODES, "zero", "planted by construction (tests/planted.py)"),
        ablation=ablation,
        discovery_metric="kl",
    )


def planted_problem(ablation: str = "zero", metric: str | None = None, qkv_split: bool = True, **graph_kwargs):
    from acdc_jax.methods import Problem

    task = planted_task(ablation=ablation)
    return Problem.build(planted_model(), task, metric=metric or task.discovery_metric, qkv_split=qkv_split, **graph_kwargs)


if __name__ == "__main__":  # a quick look: the model really does induction
    model = planted_model()
    task = planted_task()
    logits = np.asarray(model(task.clean, positions=task.positions))
    print("accuracy on the repeated half:", (logits.argmax(-1) == task.answers).mean())
    print(jax.devices())
