"""How noisy are the wrong-answer gradients? Split-half stability and AUC of every loss, at the gates
and at the weights, next to EAP and EAP-IG on the same prompts.

    python -m experiments.wrong_answer_noise [--tasks tracr-reverse tracr-xproportion induction ioi-random]
                                             [--seeds 0 1 2] [--losses ...] [--out results]

For each task and each row (EAP, EAP-IG, the wrong-answer gradient with every loss the task
supports, at the gates and at the weights):

- **stability**: ``split_half_stability`` over ``--seeds`` (the prompts dealt into two disjoint
  halves per seed, each half scored on its own): the mean Spearman correlation of the two halves'
  |scores| and the mean overlap of their top k units (k = a fifth of the units, at least 3);
- **AUC** of the |scores| on all prompts against the task's canonical circuit: edge level for the
  gate scores (when the canonical circuit lists edges), node level (``nodes="sources"``: a node
  scores the sum of its outgoing edges' |scores|) for every row, so gates and weights compare;
- **rho vs EAP**: Spearman of the gate scores with EAP's on all prompts (1: EAP reweighted). On a
  task whose metric is minimal at the clean model (tracr's ``l2``, induction's ``kl``) EAP at gates 1
  is zero, so the EAP row takes its gradient at gates 0 (``point="corrupted"``).

``ioi-random`` is IOI on a random 2-layer GPT-2 (d_model 64, weights of std 0.1 so every edge matters):
stability only, since the canonical IOI heads belong to GPT-2 small. Writes
``<out>/wrong_answer_noise.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from scipy import stats

from acdc_jax.evaluate import node_scores_from_edges, reference_labels, roc_auc
from acdc_jax.graph import GraphError
from acdc_jax.methods import Problem, get_method
from acdc_jax.methods._gradients import MINIMUM_AT_CLEAN
from acdc_jax.methods.stability import split_half_stability
from acdc_jax.methods.wrong_answer import is_swapped_pairs
from acdc_jax.metrics import WRONG_ANSWER_LOSSES
from acdc_jax.models import TransformerConfig, init_model, load_model
from acdc_jax.tasks import TaskError, get_task

from ._runner import RANDOM_WEIGHTS_LABEL

TASKS = ("tracr-reverse", "tracr-xproportion", "induction", "ioi-random")
NEEDS_ANSWERS = ("mse", "ce", "flip", "logit_diff")


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    method: str
    options: dict
    target: str  # "gates" or "weights"


def rows_for(task, losses, eap_ig_steps: int = 20) -> list[Row]:
    metric = getattr(task.metric, "name", task.metric)
    # EAP at the clean point of a metric minimal there is zero up to float error: take it at gates 0
    eap = Row("EAP (at gates 0)", "eap", {"point": "corrupted"}, "gates") if metric in MINIMUM_AT_CLEAN else \
        Row("EAP", "eap", {}, "gates")
    rows = [eap, Row(f"EAP-IG ({eap_ig_steps} steps)", "eap-ig", {"steps": eap_ig_steps}, "gates")]
    has_answers = task.answers is not None and task.wrong_answers is not None
    for target in ("gates", "weights"):
        for loss in losses:
            if loss in NEEDS_ANSWERS and not has_answers:
                continue
            rows.append(Row(f"wrong-answer {loss}", "wrong-answer", {"loss": loss, "target": target}, target))
    return rows


def task_and_model(name: str, n_prompts: int | None):
    """The task and its model: the shipped one, or for ``ioi-random`` a labelled random GPT-2."""
    if name == "ioi-random":
        task = get_task("ioi", n_prompts=n_prompts or 32)
        cfg = TransformerConfig.gpt2("gpt2", name="gpt2-random-2l")
        cfg = dataclasses.replace(cfg, n_layers=2, n_heads=4, d_model=64, d_head=16, d_mlp=256, name=cfg.name)
        model = init_model(cfg, jax.random.PRNGKey(0), std=0.1)
        return task, model, f"{cfg.name} [{RANDOM_WEIGHTS_LABEL}]"
    task = get_task(name)
    if n_prompts is not None and task.n_prompts > n_prompts:
        task = task.subset(np.arange(n_prompts))
    return task, load_model(task.model), task.model


def _abs_scores(circuit) -> np.ndarray:
    return np.abs(np.nan_to_num(np.asarray(circuit.scores, np.float64)))


def _aucs(circuit, task) -> dict:
    canonical = task.canonical
    if canonical is None:
        return {}
    graph, scores = circuit.graph, _abs_scores(circuit)
    out = {}
    try:
        if graph.level == "edge":
            if canonical.has_edges:
                out["edge_auc"] = roc_auc(scores, reference_labels(graph, task, "edge"))
            scores = node_scores_from_edges(graph, scores, "sources")
        out["node_auc"] = roc_auc(scores, reference_labels(graph, task, "node", "sources"))
    except (GraphError, TaskError):  # e.g. GPT-2 small's IOI heads on a smaller model
        return {"note": "the canonical circuit does not fit this model: stability only"}
    return out


def measure(task, model, row: Row, seeds, eap_scores=None) -> dict:
    spec = get_method(row.method)
    metric = task.discovery_metric if spec.uses_discovery_metric else task.metric
    problem = Problem.build(model, task, metric=metric)
    started = time.perf_counter()
    circuit = spec.fn(problem, **row.options)
    seconds = time.perf_counter() - started
    n_units = circuit.graph.n_gates
    top_k = max(3, n_units // 5)
    group = 2 if task.answers is not None and task.wrong_answers is not None and is_swapped_pairs(problem) else 1
    with warnings.catch_warnings():  # a constant half (every score 0) has no correlation: NaN, reported below
        warnings.simplefilter("ignore", RuntimeWarning)
        stability = split_half_stability(problem, spec.fn, seeds=seeds, top_k=top_k, group_size=group, absolute=True,
                                         **row.options)
    result = {"row": row.label, "target": row.target, "units": n_units, "seconds": round(seconds, 3)}
    scores = _abs_scores(circuit)
    if not np.any(scores):
        result["note"] = "every score 0: no ranking (no stability, AUC or correlation)"
        return result, circuit
    per_seed = np.asarray(stability["spearman"], np.float64)
    result |= {"spearman": stability["mean"]["spearman"], "top_k": top_k, "top_k_overlap": stability["mean"]["top_k_overlap"],
               "spearman_min": float(np.nanmin(per_seed)) if np.isfinite(per_seed).any() else float("nan")}
    result |= _aucs(circuit, task)
    if eap_scores is not None and np.ptp(eap_scores) and row.target == "gates":
        result["rho_vs_eap"] = float(stats.spearmanr(scores, eap_scores).statistic)
    return result, circuit


def run(tasks=TASKS, *, seeds=(0, 1, 2), losses=tuple(WRONG_ANSWER_LOSSES), n_prompts=None, eap_ig_steps=20,
        out="results", echo=print) -> Path:
    unknown = sorted(set(losses) - set(WRONG_ANSWER_LOSSES))
    if unknown:
        raise SystemExit(f"unknown losses {unknown}; the wrong-answer losses are {list(WRONG_ANSWER_LOSSES)}")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; this experiment runs {list(TASKS)}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for name in tasks:
        task, model, model_name = task_and_model(name, n_prompts)
        echo(f"{name} ({task.n_prompts} prompts, {model_name}):")
        eap_scores = None
        for row in rows_for(task, losses, eap_ig_steps):
            result, circuit = measure(task, model, row, seeds, eap_scores)
            if row.method == "eap":
                eap_scores = _abs_scores(circuit)
            result |= {"task": name, "model": model_name, "prompts": task.n_prompts}
            results.append(result)
            echo(f"  {row.label} [{row.target}]: split-half rho {result.get('spearman', float('nan')):.3f}")
            # every finished row on disk at once: a later failure loses nothing
            (folder / "wrong_answer_noise.json").write_text(json.dumps(results, indent=1))
    text = markdown(results, seeds)
    (folder / "wrong_answer_noise.md").write_text(text)
    echo(text)
    return folder / "wrong_answer_noise.md"


COLUMNS = [("task", "task"), ("row", "scores"), ("target", "at"), ("units", "units"), ("spearman", "split-half rho"),
           ("spearman_min", "min rho"), ("top_k_overlap", "top-k overlap"), ("top_k", "k"), ("edge_auc", "edge AUC"),
           ("node_auc", "node AUC"), ("rho_vs_eap", "rho vs EAP"), ("note", "note")]


def markdown(results: list[dict], seeds) -> str:
    lines = [f"## Wrong-answer gradients: split-half stability ({len(seeds)} seeds) and AUC", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in results:
        cells = []
        for key, _ in COLUMNS:
            value = r.get(key)
            cells.append("-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.wrong_answer_noise", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--losses", nargs="*", default=list(WRONG_ANSWER_LOSSES))
    parser.add_argument("--prompts", type=int, help="use at most this many prompts per task")
    parser.add_argument("--eap-ig-steps", type=int, default=20)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    run(args.tasks, seeds=tuple(args.seeds), losses=tuple(args.losses), n_prompts=args.prompts,
        eap_ig_steps=args.eap_ig_steps, out=args.out)


if __name__ == "__main__":
    main()
