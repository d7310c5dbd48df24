"""EAP, EAP-IG (inputs) and EAP-IG (activations) against the scores of the EAP-IG library itself.

The fixture ``tests/fixtures/eap_ig_library/<case>/`` was made outside this project (its README says
how): hannamw/EAP-IG at commit 795f5607b25638935aec89aee3c1cb4bd9ed72f1 (the code behind MIB's
circuit-track baselines), run with torch 2.13.0 (CPU), transformer-lens 2.16.1 and transformers
4.57.6 on random GPT-2s (``GPT2LMHeadModel``, 4 heads, d_model 64, vocabulary 100, n_positions 32,
initializer_range 0.25, biases and LayerNorm parameters perturbed; ``gpt2_l2``: 2 layers, torch
seed 0; ``gpt2_l3``: 3 layers, seed 1), saved with ``save_pretrained`` and loaded into a
HookedTransformer by TransformerLens's own GPT-2 weight conversion (no folding or centring; its
logits match Hugging Face's to 1e-5). Eight prompts of 14 random token ids, corrupted prompts
other random ids; answers per prompt: the token whose last-position logit the clean run raises
most over the corrupted run, and the one it lowers most. ``attribute(model, Graph.from_model(model),
batches, metric, method=..., ig_steps=5)`` with the library's defaults otherwise (patching,
q/k/v-split head inputs, sum over d_model), methods ``EAP``, ``EAP-IG-inputs`` and
``EAP-IG-activations``; the metric was MIB's loss, minus the batch-mean logit difference at the last
position; batches of 8 (``gpt2_l2``) and 4 (``gpt2_l3``) prompts. Two shims only: the score matrix
on the CPU (the library hard-codes ``device='cuda'``) and token ids passed through instead of
tokenised strings (no BOS). ``inputs.json`` records all of it; the edge scores are the library's
``Graph.to_json``.

**Conventions.** The library's score is ``(x~ - x) . d(-LD)/d in`` summed over batches of
batch-mean metrics and divided by the number of prompts, i.e. this project's signed score divided by
the prompts per batch: ``export.from_mib(..., prompts_per_batch=batch_size)`` converts it.
EAP-IG-inputs is ``eap_ig(variant="inputs", rule="left")`` (the library's alpha = k/m, k = 0..m-1),
EAP-IG-activations ``eap_ig_activations(groups="all")`` (alpha = k/m, k = 1..m, every group's runs
summed for every edge, divided by n_groups * m).

**Tolerance.** Both sides run in float32. Measured against float64 runs when the fixture was made
(fractions of the largest |score|): the library's float32 scores are within 4.0e-6 of its own
float64 run (EAP, ``gpt2_l3``), ours in float32 within 3.7e-6 of that float64 run (also with this
suite's XLA flags), ours and the library in float64 agree to 3e-15 (the estimators are the same), and
ours against the library, both float32, differ by at most 3.0e-6. ``RTOL``, 1e-5 of the largest
|score|, is the sum of the two sides' worst rounding (7.7e-6) with a little room; the estimators
differ from one another by 0.36 to 1.2 of the largest |score|, and the own-group activations
estimator from the library's by 0.34 (checked below), so it cannot pass a wrong estimator.
"""

import functools
import json
from pathlib import Path

import numpy as np
import pytest

import acdc_jax
from acdc_jax import export
from acdc_jax.methods import Problem
from acdc_jax.methods.eap import eap
from acdc_jax.methods.eap_ig import eap_ig
from acdc_jax.methods.eap_ig_activations import eap_ig_activations
from acdc_jax.tasks import Task

FIXTURES = Path(__file__).parent / "fixtures" / "eap_ig_library"
RTOL = 1e-5  # of the largest |library score| (module docstring)
STEPS = 5

METHODS = {
    "eap": lambda problem: eap(problem),
    "eap_ig_inputs": lambda problem: eap_ig(problem, steps=STEPS, rule="left", variant="inputs"),
    "eap_ig_activations": lambda problem: eap_ig_activations(problem, steps=STEPS),
}


@functools.cache
def _case(name):
    folder = FIXTURES / name
    meta = json.loads((folder / "inputs.json").read_text())
    n = meta["n_prompts"]
    task = Task(
        name=name,
        clean=np.array(meta["clean"]),
        corrupt=np.array(meta["corrupt"]),
        positions=np.full((n, 1), meta["read_position"]),
        metric="logit_diff",
        answers=np.array(meta["answers"])[:, None],
        wrong_answers=np.array(meta["wrong_answers"])[:, None],
        ablation="corrupt",
    )
    problem = Problem.build(acdc_jax.load_model(folder), task, metric="logit_diff", ablation="corrupt")
    return meta, problem


def _library(name, method):
    meta = json.loads((FIXTURES / name / "inputs.json").read_text())
    data = json.loads((FIXTURES / name / f"{method}.json").read_text())
    return export.from_mib(data, prompts_per_batch=meta["batch_size"])


def test_fixture_model_and_metric_match_the_library_run():
    for name in ("gpt2_l2", "gpt2_l3"):
        meta, problem = _case(name)
        scale = np.abs(meta["hf_last_logits"]).max()
        np.testing.assert_allclose(np.asarray(problem.inputs.clean_logits)[:, -1], meta["hf_last_logits"], rtol=0, atol=1e-5 * scale)
        # the library's metric is minus our logit difference
        np.testing.assert_allclose(problem.clean_value(), -meta["metric_clean"], rtol=1e-5)


@pytest.mark.parametrize(("name", "method"), [
    ("gpt2_l2", "eap"), ("gpt2_l2", "eap_ig_inputs"), ("gpt2_l2", "eap_ig_activations"),
    ("gpt2_l3", "eap_ig_activations"),
])
def test_scores_match_the_eap_ig_library(name, method):
    _, problem = _case(name)
    library = _library(name, method)
    assert library.graph.gate_names == problem.graph.gate_names
    ours = METHODS[method](problem)
    signed = np.asarray(ours.extra["signed"], np.float64)
    scale = np.abs(library.scores).max()
    np.testing.assert_allclose(signed, library.scores, rtol=0, atol=RTOL * scale)


def test_the_library_estimators_are_far_apart():
    """The tolerance separates the three estimators (and the activations' own-group variant)."""
    for name in ("gpt2_l2", "gpt2_l3"):
        scores = {method: _library(name, method).scores for method in METHODS}
        for a in METHODS:
            for b in METHODS:
                if a < b:
                    gap = np.abs(scores[a] - scores[b]).max() / np.abs(scores[b]).max()
                    assert gap > 100 * RTOL, (name, a, b, gap)
    # the library's activations estimator is the all-groups one, not the own-group integral
    _, problem = _case("gpt2_l2")
    own = np.asarray(eap_ig_activations(problem, steps=STEPS, groups="own").extra["signed"])
    library = _library("gpt2_l2", "eap_ig_activations").scores
    assert np.abs(own - library).max() > 100 * RTOL * np.abs(library).max()
