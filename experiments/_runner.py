"""Run every discovery method on one task and score it the way the ACDC paper's comparison does.

For each method: edge-level ROC AUC against the task's canonical circuit (on the graph with ACDC's
internal edges, as the paper counts; ACDC itself as a threshold family, the others by their
scores), node-level AUC, the size of the circuit it keeps, the KL of that circuit to the clean
model, the task metric of that circuit, the MIB faithfulness scores CPR and CMD of its ranking,
and wall-clock seconds. Methods that only score (EAP, EAP-IG, AtP*, HISP, the wrong-answer
gradient) report their top-n circuit with n = the size of ACDC's circuit on the same task (the
middle of its threshold sweep), so the columns compare circuits of equal size. Results go to ``<out>/<task>/``: one circuit JSON per method,
``rows.json``, ``table.md``, ``roc.png`` and ``faithfulness.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import time
from pathlib import Path

import jax
import numpy as np

from acdc_jax.evaluate import faithfulness_curve, kl_to_clean, plot_faithfulness, plot_roc, roc_curve
from acdc_jax.graph import Graph, GraphError
from acdc_jax.methods import Problem, get_method
from acdc_jax.models import GPT2_SHAPES, TransformerConfig, init_model, load_model, model_directory
from acdc_jax.tasks import Task, TaskError, get_task, takes_tokenizer, tokenizer_for_model

RANDOM_WEIGHTS_LABEL = "RANDOM WEIGHTS (dry run, not a result)"


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One row of the comparison: a registered method, its options, and how to score it."""

    method: str
    label: str
    options: dict = dataclasses.field(default_factory=dict)
    thresholds: tuple[float, ...] | None = None  # run once per threshold; ROC from the kept sets
    internal_edges: bool = True  # the paper's graph; path patching needs False
    metric: str | None = None  # default: the method's (discovery metric for pruning, task metric otherwise)
    needs: tuple[str, ...] = ()  # task features the method needs: "answers", "aligned_labels"


def default_methods(task: Task, small: bool) -> list[MethodRun]:
    """The comparison's methods for a task; ``small`` shrinks sweeps and step counts for a quick run."""
    acdc_thresholds = (0.001, 0.03, 0.3) if small else tuple(np.logspace(-4, 0, 9).round(6))
    return [
        MethodRun("acdc", "ACDC", thresholds=acdc_thresholds),
        MethodRun("eap", "EAP"),
        MethodRun("eap-ig", "EAP-IG", {"steps": 3 if small else 20}),
        MethodRun("atp-star", "AtP*", {"graddrop": not small}),
        MethodRun("learned-mask", "Edge Pruning", {"steps": 60 if small else 1000}),
        MethodRun("hisp", "HISP"),
        MethodRun("learned-mask-nodes", "Subnetwork Probing", {"steps": 60 if small else 1000}),
        MethodRun("node-patching", "node patching"),
        MethodRun("wrong-answer", "wrong-answer gradient", needs=("answers",)),
        MethodRun("path-patching", "path patching", {"threshold": 0.05, "relative": True, "grouped": True},
                  internal_edges=False, needs=("aligned_labels",)),
    ]


def supports(task: Task, run: MethodRun) -> str | None:
    """Why the method cannot run on this task, or None."""
    if "answers" in run.needs and (task.answers is None or task.wrong_answers is None):
        return "the task has no answer / wrong-answer tokens"
    if "aligned_labels" in run.needs:
        if not np.all(task.positions == task.positions[:1]):
            return "read positions differ between prompts"
        if any(not np.all(v == v[0]) for v in task.labels.values()):
            return "labelled positions differ between prompts"
    return None


def _run_method(model, task: Task, run: MethodRun, ablation: str | None, top_n: int | None):
    spec = get_method(run.method)
    metric = run.metric or (task.discovery_metric if spec.uses_discovery_metric else task.metric)
    problem = Problem.build(model, task, level=spec.level, internal_edges=run.internal_edges and spec.level == "edge",
                            metric=metric, ablation=ablation)
    options = dict(run.options)
    if top_n is not None and "top_n" in inspect.signature(spec.fn).parameters and "top_n" not in options:
        # score-only methods keep nothing by themselves: report their top-n circuit at ACDC's size
        options["top_n"] = top_n if spec.level == "edge" else max(1, round(top_n * problem.graph.n_gates / _edge_count(problem)))
    started = time.perf_counter()
    if run.thresholds is None:
        circuits = [spec.fn(problem, **options)]
    else:
        circuits = [spec.fn(problem, threshold=t, **options) for t in run.thresholds]
    seconds = time.perf_counter() - started
    return problem, circuits, seconds


def _fits(canonical, problem: Problem) -> bool:
    graph = Graph.from_model(problem.model, problem.graph.qkv_split, internal_edges=problem.graph.internal_edges)
    try:
        canonical.gate_names(graph if canonical.has_edges else dataclasses.replace(graph, level="node", internal_edges=False))
    except GraphError:
        return False
    return True


def _edge_count(problem: Problem) -> int:
    return Graph.from_model(problem.model, problem.graph.qkv_split).n_edges


def score_method(model, task: Task, run: MethodRun, ablation: str | None, top_n: int | None = None):
    """One row of the table, the circuits the method returned, and its ROC/faithfulness curves."""
    problem, circuits, seconds = _run_method(model, task, run, ablation, top_n)
    main = circuits[len(circuits) // 2]
    row = {"task": task.name, "method": run.label, "n_units": problem.graph.n_gates, "kept": main.n_kept,
           "seconds": round(seconds, 2)}
    if np.all(np.nan_to_num(main.scores) == 0):
        row["note"] = "all scores 0 (a gradient at the metric's minimum?)"
    curves = {}
    canonical = task.canonical
    if canonical is not None and not _fits(canonical, problem):
        row["note"] = "the canonical circuit names nodes this model does not have: no AUC"
        canonical = None
    if canonical is not None:
        family = circuits if run.thresholds is not None else circuits[0]
        if canonical.has_edges:
            curves["roc"] = roc_curve(family, canonical, level="edge", label=run.label)
            row["edge_auc"] = round(curves["roc"].auc, 4)
        convention = "acdc" if canonical.has_edges else "sources"
        row["node_auc"] = round(roc_curve(family, canonical, level="node", nodes=convention, label=run.label).auc, 4)
    task_problem = problem.with_metric(task.get_metric())
    row["metric_of_circuit"] = round(float(task_problem.evaluate(main.gates(model.dtype))), 6) + 0.0
    row["kl_of_circuit"] = round(float(kl_to_clean(problem, main)), 6) + 0.0
    scores = main.scores
    if np.any(np.isfinite(scores)) and not np.all(np.nan_to_num(scores) == 0):
        try:
            faith = faithfulness_curve(task_problem, main, label=run.label)
            row["cpr"], row["cmd"] = round(faith.cpr, 4), round(
                faithfulness_curve(task_problem, main, absolute=True).cmd, 4)
            curves["faithfulness"] = faith
        except ValueError as err:  # e.g. the metric does not move between full and empty circuits
            row["note"] = str(err)
    return row, circuits, curves


def load_experiment_model(task: Task, model: str | None, random_weights: bool, small: bool):
    """The task's model, the user's directory, or (``random_weights``) a labelled random GPT-2."""
    name = model or task.model
    if random_weights:
        cfg = TransformerConfig.gpt2("gpt2", name="gpt2-random")
        if small:
            cfg = dataclasses.replace(cfg, n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, name="gpt2-tiny-random")
        return init_model(cfg, jax.random.PRNGKey(0)), cfg.name
    if name in GPT2_SHAPES and model is None:
        raise SystemExit(
            f"task {task.name!r} runs on GPT-2, whose weights are not shipped and cannot be downloaded here: pass "
            "--model DIR (a local Hugging Face GPT-2 directory), or --random-weights for a labelled dry run of the pipeline"
        )
    return load_model(name), name


def run_experiment(
    task_name: str,
    *,
    model: str | None = None,
    random_weights: bool = False,
    small: bool = False,
    methods: list[str] | None = None,
    out: str | Path = "results",
    ablation: str | None = None,
    task_options: dict | None = None,
    echo=print,
) -> list[dict]:
    """Run the comparison on one task and write its results; returns the table rows.

    A text task (IOI, Greater-Than, Docstring) on ``model`` (a directory) is tokenized with that
    model's own tokenizer, as ``acdc-jax discover`` does.
    """
    task_options = dict(task_options or {})
    preloaded = None
    if model is not None and not random_weights and takes_tokenizer(task_name) and "tokenizer" not in task_options:
        try:
            preloaded = load_model(model)
            task_options["tokenizer"], note = tokenizer_for_model(model_directory(model), preloaded.config.d_vocab)
        except (TaskError, ValueError) as err:
            raise SystemExit(str(err)) from None
        if note:
            echo(note)
    task = get_task(task_name, **task_options)
    if small and task.n_prompts > 16:
        task = task.subset(np.arange(16))
    if preloaded is not None:
        the_model, model_name = preloaded, model
    else:
        the_model, model_name = load_experiment_model(task, model, random_weights, small)
    runs = default_methods(task, small)
    if methods is not None:
        unknown = sorted(set(methods) - {r.method for r in runs})
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; the comparison has {[r.method for r in runs]}")
        runs = [r for r in runs if r.method in methods]
    folder = Path(out) / (task.name + ("-random-weights" if random_weights else ""))
    folder.mkdir(parents=True, exist_ok=True)
    rows, rocs, faiths = [], [], []
    top_n = None
    for run in runs:
        reason = supports(task, run)
        if reason is not None:
            echo(f"  skip {run.label}: {reason}")
            continue
        echo(f"  {run.label} ...")
        row, circuits, curves = score_method(the_model, task, run, ablation, top_n)
        if run.method == "acdc":
            top_n = max(1, row["kept"])
        row["model"] = model_name + (f" [{RANDOM_WEIGHTS_LABEL}]" if random_weights else "")
        rows.append(row)
        circuits[len(circuits) // 2].save(folder / f"{run.method}.json")
        if "roc" in curves:
            rocs.append(curves["roc"])
        if "faithfulness" in curves:
            faiths.append(curves["faithfulness"])
    title = f"{task.name} on {model_name}" + (f" - {RANDOM_WEIGHTS_LABEL}" if random_weights else "")
    (folder / "rows.json").write_text(json.dumps(rows, indent=1))
    (folder / "table.md").write_text(markdown_table(rows, title))
    if rocs:
        plot_roc(rocs, folder / "roc.png", title=title)
    if faiths:
        plot_faithfulness(faiths, folder / "faithfulness.png", title=title)
    echo(f"wrote {folder}")
    return rows


COLUMNS = [("method", "method"), ("edge_auc", "edge AUC"), ("node_auc", "node AUC"), ("kept", "kept"),
           ("n_units", "of"), ("kl_of_circuit", "KL"), ("metric_of_circuit", "metric"), ("cpr", "CPR"),
           ("cmd", "CMD"), ("seconds", "s"), ("note", "note")]


def markdown_table(rows: list[dict], title: str, with_task: bool = False) -> str:
    columns = ([("task", "task")] if with_task else []) + COLUMNS
    lines = [f"## {title}", "", "| " + " | ".join(h for _, h in columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(task_name: str, argv=None, description: str | None = None) -> None:
    """Command-line entry point shared by the per-task experiment modules."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{task_name.replace('-', '_')}",
                                     description=description or f"Every discovery method on {task_name}.")
    parser.add_argument("--model", help="model name or local directory (default: the task's model)")
    parser.add_argument("--random-weights", action="store_true", help="GPT-2 tasks: a labelled dry run on random weights")
    parser.add_argument("--small", action="store_true", help="small settings (few prompts, short sweeps): minutes on a CPU")
    parser.add_argument("--methods", nargs="*", help="run only these methods")
    parser.add_argument("--ablation", choices=["corrupt", "zero", "mean"], help="default: the task's")
    parser.add_argument("--out", default="results", help="results folder (default: results/)")
    args = parser.parse_args(argv)
    rows = run_experiment(task_name, model=args.model, random_weights=args.random_weights, small=args.small,
                          methods=args.methods, out=args.out, ablation=args.ablation)
    print(markdown_table(rows, task_name))

