"""acdc-jax and auto-circuit side by side in one run, on the same random weights and prompts.

    PYTHONPATH=. python -m benchmarks.peers.side_by_side [--data DIR] [--peer-python /work/peer-venv/bin/python]

Writes the shared folders and prompts (``make_model.py``), runs acdc-jax's side, then launches
``autocircuit_run.py`` with the peer's Python as a subprocess (``PYTHONHASHSEED=0``, which fixes
auto-circuit's visit order, see README.md), and prints one table: seconds on each side, their ratio,
the cost per edge, how far each side is from the arithmetic floor it counts, and whether the two agree
(EAP: Spearman and the largest difference of the per-edge scores under one naming; ACDC: the two
circuits' edge sets). Appends one row per measurement to ``benchmarks/results.jsonl`` and writes
``benchmarks/peers/results.md`` with the table, the machine load before and after, and the versions.

Measured (every timing warm, the median of ``--repeats`` calls after an untimed one):

- EAP over every edge of the GPT-2 small shape (and of the tiny model, for agreement), the metric the
  logit difference at the last position, corrupted-prompt patching. Floor: in plain forwards of the
  same batch, measured on each side.
- ACDC on the tiny model (2 layers, 4 heads, d_model 64: 110 edges) at one threshold on the KL to the
  clean output at the last position, whole. Floor: one evaluation per tested edge, each from its
  destination's layer, in forwards of that side's plain model.
- ACDC on the GPT-2 small shape, sampled (a whole run of auto-circuit takes hours): acdc-jax runs its
  search for ``--budget`` seconds from the start (the latest layers first) and is extrapolated by its
  rate per forward-equivalent to every edge tested once; auto-circuit runs the first ``--per-layer``
  edges into each of its 25 destination layers, each edge's evaluation timed apart from the call's
  fixed setup, extrapolated the same way (plus the setup).

auto-circuit runs with ``--peer-threads`` torch threads (default 1: on the shared 2-core machine
TransformerLens's forward took 7.4-8.0 s with one thread and 19-21 s with two, both under the same
load), which favours the peer; acdc-jax runs with XLA's defaults.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

import acdc_jax as aj
from acdc_jax import acdc, eap
from acdc_jax.methods import Problem

from ._timing import median_seconds
from acdc_jax.methods.acdc import visit_order
from acdc_jax.models import forward
from acdc_jax.tasks import load_task_json

from .._harness import environment, record
from . import make_model

HERE = Path(__file__).parent
PEER_SCRIPT = HERE / "autocircuit_run.py"


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def plain_forward_s(model, task, repeats: int) -> float:
    """One plain (ungated) forward of the clean batch, logits at the read positions only."""
    run = jax.jit(lambda m, t, p: forward(m, t, positions=p))
    tokens, positions = jnp.asarray(task.clean), jnp.asarray(task.positions)
    return median_seconds(lambda: block(run(model, tokens, positions)), repeats)[0]


def gated_forward_s(problem: Problem, repeats: int) -> float:
    loss = eqx.filter_jit(Problem.loss)
    ones = problem.graph.gates(1.0, problem.model.dtype)
    return median_seconds(lambda: block(loss(problem, ones)), repeats)[0]


def setup(data: dict, metric: str):
    model = aj.load_model(data["model"])
    task = load_task_json(data["prompts"])
    return model, task, Problem.build(model, task, metric=metric)


def our_eap(data: dict, repeats: int) -> dict:
    model, task, problem = setup(data, "logit_diff")
    seconds, times, circuit = median_seconds(lambda: eap(problem), repeats)
    names = problem.graph.gate_names
    return {"n_edges": len(names), "eap_s": seconds, "eap_times_s": times,
            "scores": dict(zip(names, map(float, circuit.extra.get("signed", circuit.scores)))),
            "plain_forward_s": plain_forward_s(model, task, repeats), "clean_logit_diff": problem.clean_value()}


def forward_equivalents(problem: Problem) -> np.ndarray:
    """Per edge in visit order: the share of a forward that evaluating its removal needs at the least
    (the layers from its destination's up, the unembedding counted as one)."""
    n = problem.graph.n_layers
    layers = np.concatenate([g.layers for g in visit_order(problem.graph)])
    return (n + 1 - layers) / (n + 1)


def our_acdc(data: dict, fraction: float, repeats: int) -> dict:
    model, task, problem = setup(data, "kl")
    threshold = fraction * problem.ablated_value()
    seconds, times, circuit = median_seconds(lambda: acdc(problem, threshold=threshold), repeats)
    order = [problem.graph.gate_names[u] for g in visit_order(problem.graph) for u in g.units]
    return {"n_edges": problem.graph.n_gates, "threshold": threshold, "acdc_s": seconds, "acdc_times_s": times,
            "kept": sorted(circuit.kept), "visit_order": order, "evaluations": circuit.extra["evaluations"],
            "floor_forward_equivalents": circuit.extra["floor_forward_equivalents"],
            "all_edges_forward_equivalents": float(forward_equivalents(problem).sum()),
            "gated_forward_s": gated_forward_s(problem, repeats), "plain_forward_s": plain_forward_s(model, task, repeats)}


class _Budget(Exception):
    pass


def our_acdc_sample(data: dict, fraction: float, budget: float, repeats: int) -> dict:
    """The search run for ``budget`` seconds from its start, ``repeats`` times after an untimed one;
    the median rate per forward-equivalent, extrapolated to every edge tested once."""
    model, task, problem = setup(data, "kl")
    threshold = fraction * problem.ablated_value()
    samples = []

    def one(limit: float) -> dict:
        seen, started = {}, time.perf_counter()

        def progress(state):
            seen.update(state, seconds=time.perf_counter() - started)
            if seen["seconds"] > limit:
                raise _Budget

        try:
            acdc(problem, threshold=threshold, progress=progress)
        except _Budget:
            pass
        return seen

    one(min(5.0, budget))  # compiles
    for _ in range(repeats):
        samples.append(one(budget))
    rates = [s["seconds"] / s["forward_equivalents"] for s in samples]
    rate = statistics.median(rates)
    all_fe = float(forward_equivalents(problem).sum())
    median_sample = samples[rates.index(rate)] if rate in rates else samples[0]
    return {"n_edges": problem.graph.n_gates, "threshold": threshold, "sampled_s": median_sample["seconds"],
            "sampled_edges": median_sample["edges_done"], "sampled_forward_equivalents": median_sample["forward_equivalents"],
            "s_per_forward_equivalent": rate, "rates": rates, "all_edges_forward_equivalents": all_fe,
            "extrapolated_s": rate * all_fe, "s_per_edge": rate * all_fe / problem.graph.n_gates,
            "gated_forward_s": gated_forward_s(problem, repeats), "plain_forward_s": plain_forward_s(model, task, repeats)}


def run_peer(python: str, spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONHASHSEED": "0", "TQDM_DISABLE": "1"}
        env.pop("PYTHONPATH", None)
        done = subprocess.run([python, str(PEER_SCRIPT), str(spec_path), str(out_path)], env=env, cwd=tmp,
                              timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the peer script failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        print("\n".join(line for line in done.stderr.splitlines() if line.startswith("auto-circuit ")), file=sys.stderr)
        return json.loads(out_path.read_text())


def score_agreement(ours: dict, theirs: dict) -> dict:
    if set(ours) != set(theirs):
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise SystemExit(f"the edge names do not map one to one: only ours {missing[:5]}..., only theirs {extra[:5]}...")
    names = sorted(ours)
    a, b = np.array([ours[n] for n in names]), np.array([theirs[n] for n in names])
    return {"spearman": float(spearmanr(a, b).statistic), "max_abs_diff": float(np.abs(a - b).max()),
            "max_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()), "max_abs_score": float(np.abs(a).max())}


def circuit_agreement(ours: list[str], theirs: list[str]) -> dict:
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    return {"identical": not only_ours and not only_theirs, "kept_ours": len(ours), "kept_theirs": len(theirs),
            "only_ours": only_ours, "only_theirs": only_theirs}


def uptime() -> str:
    return subprocess.run(["uptime"], stdout=subprocess.PIPE, text=True).stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "acdc_jax_peers")
    parser.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--pos", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.01, help="ACDC threshold as a fraction of KL(fully ablated)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of each sampled acdc-jax GPT-2 ACDC run")
    parser.add_argument("--per-layer", type=int, default=1, help="sampled auto-circuit ACDC edges per destination layer")
    parser.add_argument("--peer-threads", type=int, default=1,
                        help="torch threads on the peer's side (0: torch's default; 1 was faster on the shared 2 cores)")
    parser.add_argument("--peer-timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=HERE / "results.md", help="where the table goes")
    args = parser.parse_args(argv)

    load_before = uptime()
    started = dt.datetime.now(dt.timezone.utc)
    data = make_model.write_all(args.data, args.prompts, args.pos)
    tiny, gpt2 = data["tiny"], data["gpt2"]

    ours = {"tiny_eap": our_eap(tiny, args.repeats), "gpt2_eap": our_eap(gpt2, args.repeats),
            "tiny_acdc": our_acdc(tiny, args.fraction, args.repeats),
            "gpt2_acdc": our_acdc_sample(gpt2, args.fraction, args.budget, args.repeats)}
    print("acdc-jax side done", file=sys.stderr, flush=True)
    spec = {
        "torch_threads": args.peer_threads,
        "tiny_eap": {"kind": "eap", **tiny, "repeats": args.repeats},
        "gpt2_eap": {"kind": "eap", **gpt2, "repeats": args.repeats},
        "tiny_acdc": {"kind": "acdc", **tiny, "threshold": ours["tiny_acdc"]["threshold"], "repeats": args.repeats,
                      "orders": {"auto-circuit": None, "acdc": ours["tiny_acdc"]["visit_order"]}},
        "gpt2_acdc": {"kind": "acdc_sample", **gpt2, "threshold": ours["gpt2_acdc"]["threshold"],
                      "per_layer": args.per_layer, "repeats": args.repeats},
    }
    theirs = run_peer(args.peer_python, spec, args.peer_timeout)
    load_after = uptime()

    rows, summary = report(ours, theirs, args)
    versions = {"acdc-jax": environment(), "auto-circuit side": theirs["versions"]}
    text = render(rows, summary, load_before, load_after, versions, started, args)
    args.out.write_text(text)
    print(text)
    for row in rows:
        record(f"peers_{row['what']}", {"prompts": args.prompts, "pos": args.pos, "peer": "auto-circuit 1.0.1",
                                        "setting": row["setting"], "peer_threads": args.peer_threads,
                                        "xla_flags": os.environ.get("XLA_FLAGS", "")},
               {k: v for k, v in row.items() if k not in ("what", "setting") and isinstance(v, (int, float, bool, str))})


def report(ours: dict, theirs: dict, args) -> tuple[list[dict], dict]:
    rows = []
    for name in ("tiny_eap", "gpt2_eap"):
        o, t = ours[name], theirs[name]
        agree = score_agreement(o["scores"], t["scores"])
        rows.append({
            "what": name, "setting": f"EAP, all {o['n_edges']} edges, logit diff", "n_edges": o["n_edges"],
            "ours_s": o["eap_s"], "theirs_s": t["eap_s"], "ratio": t["eap_s"] / o["eap_s"],
            "ours_s_per_edge": o["eap_s"] / o["n_edges"], "theirs_s_per_edge": t["eap_s"] / t["n_edges"],
            "ours_plain_forward_s": o["plain_forward_s"], "theirs_plain_forward_s": t["plain_forward_s"],
            "ours_in_plain_forwards": o["eap_s"] / o["plain_forward_s"],
            "theirs_in_plain_forwards": t["eap_s"] / t["plain_forward_s"],
            "clean_logit_diff_ours": o["clean_logit_diff"], "clean_logit_diff_theirs": t["clean_logit_diff"],
            **{f"scores_{k}": v for k, v in agree.items()},
        })
    o, t = ours["tiny_acdc"], theirs["tiny_acdc"]
    stock, same_order = t["runs"]["auto-circuit"], t["runs"]["acdc"]
    ours_floor = o["floor_forward_equivalents"] * o["plain_forward_s"]
    theirs_floor = o["all_edges_forward_equivalents"] * t["plain_forward_s"]  # it tests every edge
    vs_stock, vs_same = circuit_agreement(o["kept"], stock["kept"]), circuit_agreement(o["kept"], same_order["kept"])
    rows.append({
        "what": "tiny_acdc", "setting": f"ACDC, whole, tau={o['threshold']:.4g} (KL)", "n_edges": o["n_edges"],
        "ours_s": o["acdc_s"], "theirs_s": stock["acdc_s"], "ratio": stock["acdc_s"] / o["acdc_s"],
        "ours_s_per_edge": o["acdc_s"] / o["n_edges"], "theirs_s_per_edge": stock["acdc_s"] / t["n_edges"],
        "ours_plain_forward_s": o["plain_forward_s"], "theirs_plain_forward_s": t["plain_forward_s"],
        "ours_evaluations": o["evaluations"], "theirs_evaluations": t["n_edges"],
        "ours_over_floor": o["acdc_s"] / ours_floor, "theirs_over_floor": stock["acdc_s"] / theirs_floor,
        "kept_ours": len(o["kept"]), "kept_theirs": len(stock["kept"]),
        "identical_circuit": vs_stock["identical"], "identical_circuit_same_order": vs_same["identical"],
    })
    o, t = ours["gpt2_acdc"], theirs["gpt2_acdc"]
    floor_fe = o["all_edges_forward_equivalents"]
    rows.append({
        "what": "gpt2_acdc", "setting": f"ACDC, sampled, extrapolated to all {o['n_edges']} edges tested",
        "n_edges": o["n_edges"], "ours_s": o["extrapolated_s"], "theirs_s": t["extrapolated_s"],
        "ratio": t["extrapolated_s"] / o["extrapolated_s"],
        "ours_s_per_edge": o["s_per_edge"], "theirs_s_per_edge": t["s_per_edge"],
        "ours_plain_forward_s": o["plain_forward_s"], "theirs_plain_forward_s": t["plain_forward_s"],
        "ours_over_floor": o["extrapolated_s"] / (floor_fe * o["plain_forward_s"]),
        "theirs_over_floor": t["extrapolated_s"] / (floor_fe * t["plain_forward_s"]),
        "ours_sampled_edges": o["sampled_edges"], "ours_sampled_s": o["sampled_s"],
        "theirs_sampled_edges": t["sampled_edges"], "theirs_setup_s": t["setup_s"],
    })
    summary = {"tiny_acdc_vs_stock_order": vs_stock, "tiny_acdc_vs_same_order": vs_same,
               "tiny_acdc_thresholds": ours["tiny_acdc"]["threshold"],
               "stock_order_head": stock["visit_order"][:24], "ours_order_head": ours["tiny_acdc"]["visit_order"][:24],
               "peer_parity_tl_vs_hf": {k: theirs[k]["tl_vs_hf_max_rel_diff"] for k in ("tiny_eap", "gpt2_eap")},
               "ours": {k: {kk: vv for kk, vv in v.items() if kk not in ("scores", "visit_order", "kept")} for k, v in ours.items()},
               "theirs": {k: ({kk: vv for kk, vv in v.items() if kk not in ("scores", "runs")} if isinstance(v, dict) else v)
                          for k, v in theirs.items()}}
    return rows, summary


def _g(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def render(rows, summary, load_before, load_after, versions, started, args) -> str:
    lines = [
        "# acdc-jax vs auto-circuit, side by side",
        "",
        f"One run of `python -m benchmarks.peers.side_by_side` started {started.isoformat(timespec='seconds')}: same random",
        f"weights and prompts on both sides ({args.prompts} prompts x {args.pos} tokens), acdc-jax first, then",
        "auto-circuit in its own process, back to back on the same machine. Times are warm medians of",
        f"{args.repeats} calls. Other agents share this machine's 2 cores, so absolute seconds move between runs;",
        "the ratio, measured in one run, is the figure that counts.",
        "",
        f"- threads: auto-circuit {args.peer_threads or 'torch default'} torch thread(s); acdc-jax with"
        f" XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(unset: XLA defaults)'}",
        f"- load before: `{load_before}`",
        f"- load after: `{load_after}`",
        "",
        "| measurement | edges | acdc-jax s | auto-circuit s | ratio | s/edge ours | s/edge theirs | floor: ours | floor: theirs | agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "scores_spearman" in r:
            floor_o = f"{r['ours_in_plain_forwards']:.1f} plain fwd"
            floor_t = f"{r['theirs_in_plain_forwards']:.1f} plain fwd"
            agree = (f"Spearman {r['scores_spearman']:.6f}, max diff {r['scores_max_abs_diff']:.2g} "
                     f"({r['scores_max_rel_diff']:.2g} of the largest)")
        else:
            floor_o, floor_t = f"{r['ours_over_floor']:.1f}x floor", f"{r['theirs_over_floor']:.1f}x floor"
            agree = ("same circuit" if r.get("identical_circuit") else
                     f"circuits differ (same visit order: {'identical' if r.get('identical_circuit_same_order') else 'differ'})"
                     ) if "identical_circuit" in r else "timing sample (no circuit)"
        lines.append(f"| {r['setting']} | {r['n_edges']} | {_g(r['ours_s'])} | {_g(r['theirs_s'])} | {r['ratio']:.1f}x | "
                     f"{r['ours_s_per_edge']:.3g} | {r['theirs_s_per_edge']:.3g} | {floor_o} | {floor_t} | {agree} |")
    lines += ["", "Floors: EAP in plain forwards of the same batch on that side (one forward and one backward is about",
              "3); ACDC as the time of one evaluation per tested edge, each from its destination's layer, in that",
              "side's plain forwards (acdc-jax tests fewer edges: it skips the inputs of nodes that feed nothing, as",
              "the original ACDC does; auto-circuit tests every edge).", ""]
    vs_stock, vs_same = summary["tiny_acdc_vs_stock_order"], summary["tiny_acdc_vs_same_order"]
    lines += ["## ACDC circuits (tiny model)", "",
              f"- acdc-jax kept {vs_stock['kept_ours']} edges; auto-circuit in its own visit order kept {vs_stock['kept_theirs']}"
              f" ({'identical' if vs_stock['identical'] else 'different'}); auto-circuit visiting in acdc-jax's (the original"
              f" ACDC's) order kept {vs_same['kept_theirs']} ({'identical' if vs_same['identical'] else 'different'}).",
              f"- own order, only acdc-jax: {vs_stock['only_ours'] or 'none'}; only auto-circuit: {vs_stock['only_theirs'] or 'none'}",
              f"- same order, only acdc-jax: {vs_same['only_ours'] or 'none'}; only auto-circuit: {vs_same['only_theirs'] or 'none'}",
              f"- auto-circuit's order starts `{', '.join(summary['stock_order_head'][:12])}, ...`; acdc-jax's (ACDC's) starts"
              f" `{', '.join(summary['ours_order_head'][:12])}, ...`",
              "", "## Details", "", "```json", json.dumps({k: v for k, v in summary.items() if k not in
                                                           ("stock_order_head", "ours_order_head")}, indent=1, default=str),
              "```", "", "## Versions", "", "```json", json.dumps(versions, indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
