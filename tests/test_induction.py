"""The induction task on the shipped attention-only model, and the trainer that made the model.

The shipped checkpoint (``models/induction``) is loaded, never retrained here; the trainer is
checked on a tiny configuration for a handful of steps.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from acdc_jax.graph import Graph
from acdc_jax.methods import Problem
from acdc_jax.models import TransformerConfig, load_model, models_dir
from acdc_jax.tasks import get_task, task_names
from acdc_jax.tasks.induction import (
    BOS,
    INDUCTION_CUTOFF,
    PREVIOUS_TOKEN_CUTOFF,
    RepeatedTokens,
    find_induction_heads,
    induction_task,
    repeated_tokens,
)
from acdc_jax.training import (
    DEFAULT_CONFIG,
    TRAINING_FILE,
    TrainSettings,
    evaluate_induction,
    initial_model,
    next_token_losses,
    train_induction,
)


@pytest.fixture(scope="module")
def model():
    return load_model("induction")


@pytest.fixture(scope="module")
def task():
    return get_task("induction")


# ---------------------------------------------------------------------------- the shipped model


def test_shipped_model_does_induction(model):
    """Tokens of the repeated copy cost almost nothing; the first copy's cost a uniform guess."""
    data = RepeatedTokens()
    losses = evaluate_induction(model, data, n=256, segment_len=data.max_segment, noise_before=0)
    print(f"\nmean next-token loss: first copy {losses['first_half']:.4f}, repeated copy {losses['repeated_half']:.4f} "
          f"(uniform over the tokens {losses['uniform']:.4f})")
    assert losses["first_half"] > 0.95 * losses["uniform"]  # nothing to predict there
    assert losses["repeated_half"] < 0.1  # p(next token) > 0.9 on average
    assert losses["first_half"] - losses["repeated_half"] > 3.5


def test_shipped_checkpoint_matches_its_training_record(model):
    record = json.loads((models_dir() / "induction" / TRAINING_FILE).read_text())
    assert TransformerConfig.from_dict(record["config"]) == model.config == DEFAULT_CONFIG
    assert {k: v for k, v in record["data"].items() if k != "kind"} == RepeatedTokens().to_dict()
    assert record["settings"] == dataclasses.asdict(TrainSettings())
    assert model.config.d_mlp is None and model.config.n_layers == 2


# ---------------------------------------------------------------------------- the task


def test_task_is_registered_and_well_formed(task):
    assert "induction" in task_names()
    seg = RepeatedTokens().max_segment
    assert task.clean.shape == task.corrupt.shape == (50, 1 + 2 * seg)
    assert np.all(task.clean[:, 0] == BOS)
    np.testing.assert_array_equal(task.clean[:, 1 : seg + 1], task.clean[:, seg + 1 :])  # the second half repeats the first
    assert all(len(set(row[1 : seg + 1])) == seg for row in task.clean)  # distinct tokens in a segment
    # corrupted rows are the clean rows in another order, none in its own place
    match = (task.corrupt[:, None, :] == task.clean[None, :, :]).all(-1)
    assert np.all(match.sum(1) == 1) and not np.any(np.diag(match))
    np.testing.assert_array_equal(task.positions[0], np.arange(seg + 1, 2 * seg))
    rows = np.arange(task.n_prompts)[:, None]
    np.testing.assert_array_equal(task.answers, task.clean[rows, task.positions + 1])
    assert (task.metric, task.discovery_metric, task.ablation, task.model) == ("nll", "kl", "corrupt", "induction")


def test_task_builder_is_deterministic(model):
    # 50 prompts, as the default task: the attention patterns are compiled for that shape already
    a, b = induction_task(50, seed=3, model=model), induction_task(50, seed=3, model=model)
    for field in ("clean", "corrupt", "positions", "answers"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.canonical == b.canonical
    other = induction_task(50, seed=4, model=model)
    assert not np.array_equal(a.clean, other.clean)


def test_sampler_is_deterministic_and_keeps_the_layout():
    data = RepeatedTokens()
    a, b = repeated_tokens(data, 16, 7), repeated_tokens(data, 16, 7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for row, seg, second in zip(a.tokens, a.segment_len, a.second):
        np.testing.assert_array_equal(row[second : second + seg], row[second - seg : second])
        assert len(set(row[1:])) == data.seq_len - 1 - seg  # distinct but for the repeat


# ---------------------------------------------------------------------------- heads and circuit


def test_detected_heads_have_high_scores(model, task):
    """The documented scores of the shipped model on the task's prompts (tasks/induction.py)."""
    seg = RepeatedTokens().max_segment
    batch = repeated_tokens(RepeatedTokens(), 50, 0, segment_len=seg, noise_before=0)
    batch = batch._replace(tokens=batch.tokens[:, : 1 + 2 * seg])
    heads = find_induction_heads(model, batch)
    print("\n" + heads.describe())
    print("previous-token scores\n", np.round(heads.previous_token_scores, 3))
    print("induction scores\n", np.round(heads.induction_scores, 3))
    prev, ind = heads.previous_token_scores[0], heads.induction_scores[1]
    assert heads.previous_token == (0, 1)
    assert heads.induction == (0, 1, 2, 3)
    assert np.all(prev[[0, 1]] > 0.55) and prev.max() > 0.65
    assert np.all(np.delete(prev, [0, 1]) < 0.3)  # a clear gap around the cut-off
    assert np.all(ind > 0.65) and np.sort(ind)[-3:].min() > 0.95
    # layer 0 cannot look up the earlier occurrence (only a fixed offset by position): far below the cut-off
    assert np.all(heads.induction_scores[0] < INDUCTION_CUTOFF / 2)
    assert PREVIOUS_TOKEN_CUTOFF == INDUCTION_CUTOFF == 0.4
    assert task.canonical.source.endswith(heads.describe())


def test_canonical_circuit_names_exist_in_every_graph(model, task):
    canonical = task.canonical
    assert "a0.1->a1.0.k" in canonical.edges and "a1.0->logits" in canonical.edges
    assert len(canonical.edges) == 2 * 3 + 4 * (2 + 3)
    qkv = canonical.gate_names(Graph.from_model(model))
    assert qkv == frozenset(canonical.edges)
    per_head = canonical.gate_names(Graph.from_model(model, qkv_split=False))
    # embed->a0.p, a0.p->a1.i, embed->a1.i, a1.i->logits
    assert "a0.1->a1.0" in per_head and "embed->a0.0" in per_head and len(per_head) == 2 + 4 * (2 + 1 + 1)
    internal = canonical.gate_names(Graph.from_model(model, internal_edges=True))
    assert "a1.0.k->a1.0" in internal
    nodes = canonical.gate_names(Graph.from_model(model, level="node"))
    assert nodes == {"embed", "a0.0", "a0.1", "a1.0", "a1.1", "a1.2", "a1.3"}


def test_metric_is_lower_on_clean_than_on_corrupted_gatings(model, task):
    problem = Problem.build(model, task)
    clean, ablated = problem.clean_value(), problem.ablated_value()
    circuit = problem.evaluate(problem.graph.gates_from_names(task.canonical.gate_names(problem.graph)))
    print(f"\nnll: clean {clean:.4f}, canonical circuit only {circuit:.4f}, all corrupted {ablated:.4f}")
    assert np.isfinite([clean, circuit, ablated]).all()
    assert clean < 0.1 < 3.0 < ablated
    assert clean < circuit < 0.1 * ablated  # the circuit alone keeps most of the behaviour
    kl = Problem.build(model, task, metric=task.discovery_metric)
    assert abs(kl.clean_value()) < 1e-5 and kl.ablated_value() > 3.0


# ---------------------------------------------------------------------------- the trainer

TINY_DATA = RepeatedTokens(seq_len=9, d_vocab=12, min_segment=2, max_segment=4)
TINY_CONFIG = TransformerConfig(
    n_layers=2, n_heads=2, d_model=16, d_head=8, d_mlp=None, d_vocab=12, n_ctx=9, tied_unembed=False, d_vocab_out=12
)


def test_a_few_training_steps_are_deterministic_and_lower_the_loss():
    settings = TrainSettings(induction_steps=4, full_steps=40, batch_size=16, learning_rate=1e-2, warmup_steps=2, log_every=4)
    run = lambda: train_induction(seed=1, settings=settings, config=TINY_CONFIG, data=TINY_DATA, evaluate=False)  # noqa: E731
    first, second = run(), run()
    assert first.record["train_loss"] == second.record["train_loss"]
    for a, b in zip(jax.tree.leaves(first.model), jax.tree.leaves(second.model)):
        np.testing.assert_array_equal(a, b)
    assert first.record["steps"] == 44 and len(first.record["train_loss"]) == 11
    # the full next-token loss on fixed prompts, before and after
    tokens = TINY_DATA.sample(jax.random.PRNGKey(5), 256).tokens
    key_init, _ = jax.random.split(jax.random.PRNGKey(1))
    start = initial_model(TINY_CONFIG, key_init, settings.init_std, settings.position_scale * settings.init_std)
    before, after = (float(next_token_losses(m, tokens).mean()) for m in (start, first.model))
    print(f"\nnext-token loss: {before:.4f} at initialisation, {after:.4f} after {first.record['steps']} steps")
    assert after < before - 0.05


def test_induction_phase_keeps_the_position_table():
    # the induction phase of the test above (same shapes and settings: compiled once)
    settings = TrainSettings(induction_steps=4, full_steps=0, batch_size=16, learning_rate=1e-2, warmup_steps=2, log_every=4)
    result = train_induction(seed=1, settings=settings, config=TINY_CONFIG, data=TINY_DATA, evaluate=False)
    assert result.record["eval"] is None
    key_init, _ = jax.random.split(jax.random.PRNGKey(1))
    start = initial_model(TINY_CONFIG, key_init, settings.init_std, settings.position_scale * settings.init_std)
    np.testing.assert_array_equal(result.model.embed.W_pos, start.embed.W_pos)
    assert not np.array_equal(result.model.embed.W_E, start.embed.W_E)

