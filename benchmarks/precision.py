"""The effect of bf16 activations: metric values and the ACDC circuit, bf16 against fp32.

    python -m benchmarks.precision [--threshold 0.01]

On the shipped induction model (a trained model with a known circuit) and on a GPT-2-width
random model (2 layers, IOI-shaped random batch) it runs the same problem in float32 and with
``model.astype(jnp.bfloat16)`` (bf16 weights and activations; LayerNorm statistics, softmax and the
metric in float32), and reports: the largest logit difference, the task metric of the clean and of
the fully ablated model in each precision, and ACDC at one threshold in each precision: edges kept,
edges that differ (symmetric difference), and the AUC against the known circuit where there is one.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import acdc_jax as aj
from acdc_jax.evaluate import roc_auc
from acdc_jax import acdc
from acdc_jax.methods import Problem
from acdc_jax.models import Transformer, TransformerConfig
from acdc_jax.tasks import Task, get_task

from ._harness import random_task, record


def _random_problem(dtype) -> tuple[Transformer, Task]:
    cfg = TransformerConfig.gpt2("gpt2", n_layers=2, name="gpt2-width-2l")
    model = aj.init_model(cfg, jax.random.PRNGKey(0), std=0.05).astype(dtype)
    return model, random_task(cfg.d_vocab, 20, 16, metric="logit_diff", discovery_metric="kl")


def _induction_problem(dtype) -> tuple[Transformer, Task]:
    return aj.load_model("induction").astype(dtype), get_task("induction")


def compare(build, threshold_fraction: float) -> dict:
    out = {}
    circuits = {}
    logits = {}
    for label, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        model, task = build(dtype)
        paper = Problem.build(model, task)
        search = paper.with_metric(task.get_metric(task.discovery_metric))
        graph = paper.graph
        out[f"{label}_metric_clean"] = float(paper.value(graph.gates(1.0)))
        out[f"{label}_metric_ablated"] = float(paper.value(graph.gates(0.0)))
        logits[label] = np.asarray(paper.run.logits(graph.gates(1.0)), np.float32)
        if label == "fp32":
            threshold = threshold_fraction * float(search.ablated_value())
        start = time.perf_counter()
        circuits[label] = acdc(search, threshold=threshold)
        out[f"{label}_acdc_s"] = time.perf_counter() - start
        out[f"{label}_kept"] = circuits[label].n_kept
        if task.canonical is not None:
            out[f"{label}_auc"] = roc_auc(circuits[label].scores, task.canonical.labels(graph))
    out["max_abs_logit_diff"] = float(np.abs(logits["fp32"] - logits["bf16"]).max())
    out["threshold"] = threshold
    out["edges_changed"] = len(set(circuits["fp32"].kept) ^ set(circuits["bf16"].kept))
    out["n_edges"] = circuits["fp32"].graph.n_gates
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.01, help="ACDC threshold as a fraction of the fp32 ablated metric")
    args = parser.parse_args(argv)
    for name, build in (("induction", _induction_problem), ("gpt2-width-2l random", _random_problem)):
        results = compare(build, args.fraction)
        entry = record("precision_bf16", {"model": name, "threshold_fraction": args.fraction}, results)
        print(name)
        for k, v in entry["results"].items():
            print(f"  {k:>22}: {v}")


if __name__ == "__main__":
    main()
