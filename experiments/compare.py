"""The ACDC paper's comparison table: task x method -> edge AUC, node AUC, edges kept, KL and metric
of the circuit, CPR/CMD, seconds.

    python -m experiments.compare [--tasks tracr-reverse tracr-xproportion induction] [--small]
    python -m experiments.compare --tasks ioi greater-than docstring --model ~/models/gpt2

Writes every task's results (see ``experiments/_runner.py``) and ``<out>/compare.md`` with all rows,
next to the ACDC paper's own edge AUCs for ACDC where it reports them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._runner import RANDOM_WEIGHTS_LABEL, markdown_table, run_experiment

SHIPPED_TASKS = ("tracr-reverse", "tracr-xproportion", "induction")
GPT2_TASKS = ("ioi", "greater-than", "docstring")
# ACDC paper, edge-level ROC AUC of ACDC (its table; reproduced from its stored ROC points in tests)
PAPER_ACDC_EDGE_AUC = {"ioi": 0.869, "greater-than": 0.853, "docstring": 0.982}


def compare(tasks, *, model=None, random_weights=False, small=False, methods=None, out="results", echo=print) -> Path:
    rows = []
    for task in tasks:
        echo(f"{task}:")
        rows += run_experiment(task, model=model, random_weights=random_weights, small=small, methods=methods, out=out,
                               echo=echo)
    title = "Comparison" + (f" - {RANDOM_WEIGHTS_LABEL}" if random_weights else "") + (" (small settings)" if small else "")
    text = markdown_table(rows, title, with_task=True)
    reported = [t for t in tasks if t in PAPER_ACDC_EDGE_AUC]
    if reported:
        text += "\nThe ACDC paper's edge AUC for ACDC: " + ", ".join(f"{t} {PAPER_ACDC_EDGE_AUC[t]}" for t in reported) + "\n"
    path = Path(out) / "compare.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    echo(text)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(SHIPPED_TASKS))
    parser.add_argument("--model", help="a local GPT-2 directory for the GPT-2 tasks")
    parser.add_argument("--random-weights", action="store_true", help="GPT-2 tasks: a labelled dry run on random weights")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--methods", nargs="*")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    compare(args.tasks, model=args.model, random_weights=args.random_weights, small=args.small, methods=args.methods,
            out=args.out)


if __name__ == "__main__":
    main()
