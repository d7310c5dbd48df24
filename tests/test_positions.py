"""Position-aware circuits: edges per token position (or labelled span) for EAP, EAP-IG and ACDC."""

import json

import jax
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax import export, viz
from acdc_jax.methods import Circuit, Problem
from acdc_jax.methods._positions import PositionUnits, resolve_positions
from acdc_jax.methods.acdc import acdc
from acdc_jax.methods.eap import eap
from acdc_jax.methods.eap_ig import eap_ig
from acdc_jax.models import TransformerConfig, build_model, expected_shapes
from acdc_jax.tasks import Task

from .conftest import TINY_CONFIGS
from .reference import gated_logits

# ------------------------------------------------------------------------------------------------
# A planted model whose circuit uses each of its edges at one position only.
#
# Prompts ``BOS x1 x2 x3 x4``; the metric reads the last position, whose answer is x1. a0.0 is a
# previous-token head (q_i = S e_i, k_j = e_{j+1}, v = the token, written into ``prev``); a1.0's
# query exists only at the last position and points at position 2 (q_4 = S e_2, k_j = e_j), and it
# copies ``prev`` there (x1) into ``out``, which alone the unembedding reads. So a0.0's output is
# read by a1.0 only at position 2, a1.0's only at the last position, and so on: the circuit is
# seven (edge, position) units. The second head of each layer reads everything and writes only
# into ``junk``, which nothing reads.

VOCAB, N_POS, JUNK, SHARP = 5, 5, 3, 30.0
BLOCKS = {"tok": VOCAB, "pos": N_POS, "prev": VOCAB, "out": VOCAB, "junk": JUNK}
OFFSET = dict(zip(BLOCKS, np.cumsum([0] + list(BLOCKS.values()))[:-1].tolist()))
PLANTED_UNITS = {
    "embed->a0.0.q@2", "embed->a0.0.k@1", "embed->a0.0.v@1", "a0.0->a1.0.v@2",
    "embed->a1.0.q@4", "embed->a1.0.k@2", "a1.0->logits@4",
}


def _block(name):
    return slice(OFFSET[name], OFFSET[name] + BLOCKS[name])


def positional_model():
    cfg = TransformerConfig(
        n_layers=2, n_heads=2, d_model=sum(BLOCKS.values()), d_head=N_POS, d_mlp=None, d_vocab=VOCAB, n_ctx=N_POS,
        normalization=None, causal=True, attn_scale=1.0, tied_unembed=False, name="planted-positions",
    )
    rng = np.random.RandomState(0)
    w = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(cfg).items()}
    tok, pos, prev, out, junk = (_block(b) for b in BLOCKS)
    w["embed.W_E"][np.arange(VOCAB), OFFSET["tok"] + np.arange(VOCAB)] = 1.0
    w["embed.W_pos"][np.arange(N_POS), OFFSET["pos"] + np.arange(N_POS)] = 1.0
    w["blocks.attn.W_Q"][0, 0, pos, :] = SHARP * np.eye(N_POS)
    w["blocks.attn.W_K"][0, 0, pos, :] = np.eye(N_POS, k=1)
    w["blocks.attn.W_V"][0, 0, tok, :VOCAB] = np.eye(VOCAB)
    w["blocks.attn.W_O"][0, 0, :VOCAB, prev] = np.eye(VOCAB)
    w["blocks.attn.W_Q"][1, 0, OFFSET["pos"] + N_POS - 1, 2] = SHARP
    w["blocks.attn.W_K"][1, 0, pos, :] = np.eye(N_POS)
    w["blocks.attn.W_V"][1, 0, prev, :VOCAB] = np.eye(VOCAB)
    w["blocks.attn.W_O"][1, 0, :VOCAB, out] = np.eye(VOCAB)
    for layer in range(2):
        for name in ("W_Q", "W_K", "W_V"):
            w[f"blocks.attn.{name}"][layer, 1] = 0.5 * rng.randn(cfg.d_model, N_POS)
        w["blocks.attn.W_O"][layer, 1][:, junk] = 0.5 * rng.randn(N_POS, JUNK)
    w["unembed.W_U"][out, :] = 4.0 * np.eye(VOCAB)
    return build_model(cfg, w)


def positional_problem(n_prompts=4):
    rng = np.random.RandomState(1)
    x = rng.randint(0, VOCAB - 1, (n_prompts, N_POS - 1))
    clean = np.concatenate([np.full((n_prompts, 1), VOCAB - 1), x], axis=1)
    task = Task(name="planted-positions", clean=clean, corrupt=clean[::-1].copy(),
                positions=np.full((n_prompts, 1), N_POS - 1), metric="nll", answers=x[:, :1], ablation="zero",
                labels={"X1": np.full(n_prompts, 1), "END": np.full(n_prompts, N_POS - 1)})
    return Problem.build(positional_model(), task, metric="nll")


def test_position_aware_eap_ig_and_acdc_find_each_edge_at_its_position_alone():
    problem = positional_problem()
    graph = problem.graph
    assert problem.clean_value() < 0.1  # the model copies x1
    ig = eap_ig(problem, positions="each", steps=16, top_n=len(PLANTED_UNITS))
    print(sorted(ig.top(12), key=lambda t: -t[1]))
    assert set(ig.kept) == PLANTED_UNITS
    found = acdc(problem, threshold=1e-3, positions="each")
    print(found.kept)
    assert set(found.kept) == PLANTED_UNITS
