"""ACDC wall time (the search on the device, evaluations from the destination's layer on cached
clean differences) vs. the plain one-edge-at-a-time loop, on a GPT-2-width model with random
weights and IOI-shaped batches.

    python -m benchmarks.acdc_speed [--layers 2] [--prompts 20] [--pos 16] [--plain] [--max-batch K]

Beside the time: the work done, in gated forwards' worth of layers (a run from layer l costs
(L + 1 - l) / (L + 1) of one), the floor of that work (one evaluation per tested edge), and the
time of one full gated forward on the same batch, so that ``acdc_s / (floor x forward_s)`` says
how far the run is from its arithmetic floor.

The plain loop is ACDC written directly: for every edge in ACDC's order, one full forward pass of
the current gating (compiled once). Both must return the identical circuit; the script checks it.
The threshold is a fixed fraction of the KL of the fully ablated model, so it bites on random weights.
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import numpy as np

import acdc_jax as aj
from acdc_jax import acdc
from acdc_jax.methods import Problem
from acdc_jax.methods.acdc import visit_order
from acdc_jax.models import TransformerConfig

from ._harness import peak_memory_bytes, random_task, record


def plain_acdc(problem: Problem, threshold: float) -> tuple[set[str], int]:
    """The reference, as ACDC's own code runs: ACDC's visit order and node skipping, the current
    metric recomputed once per destination, then one full forward pass per edge."""
    graph = problem.graph
    loss = eqx.filter_jit(Problem.loss)
    gates = np.ones(graph.n_gates, np.float32)
    _, kind, _, srcs = graph._edge_table
    evaluations = 0
    for group in visit_order(graph):
        if group.consumer >= 0:
            used = np.any(gates[(kind == 0) & (srcs == group.consumer)] > 0) and (group.via < 0 or gates[group.via] > 0)
            if not used:
                gates[group.units] = 0
                continue
        current = float(loss(problem, gates))
        evaluations += 1
        for unit in group.units:
            gates[unit] = 0
            after = float(loss(problem, gates))
            evaluations += 1
            if after - current >= threshold:
                gates[unit] = 1
            else:
                current = after
    return {graph.name(i) for i in np.flatnonzero(gates)}, evaluations


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.01, help="threshold as a fraction of KL(fully ablated)")
    parser.add_argument("--max-batch", type=int, default=None, help="configurations per step (default: the library's)")
    parser.add_argument("--plain", action="store_true", help="also time the plain loop (slow)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="stop the warm run after this many seconds and extrapolate (a sample of the search)")
    args = parser.parse_args(argv)

    cfg = TransformerConfig.gpt2("gpt2", n_layers=args.layers, name=f"gpt2-width-{args.layers}l")
    model = aj.init_model(cfg, jax.random.PRNGKey(0), std=0.05)
    if args.dtype == "bfloat16":
        model = model.astype(jax.numpy.bfloat16)
    task = random_task(cfg.d_vocab, args.prompts, args.pos)
    problem = Problem.build(model, task, metric="kl")
    threshold = args.fraction * problem.ablated_value()

    if args.time_budget is not None:
        return sample(problem, threshold, args, cfg)
    start = time.perf_counter()
    acdc(problem, threshold=threshold, max_batch=args.max_batch)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = acdc(problem, threshold=threshold, max_batch=args.max_batch)
    warm_s = time.perf_counter() - start
    results = {
        "n_edges": problem.graph.n_gates,
        "kept": warm.n_kept,
        "batched_s": warm_s,
        "batched_first_call_s": cold_s,
        "configs_evaluated": warm.extra["evaluations"],
        "steps": warm.extra["batches"],
        "forward_equivalents": warm.extra["forward_equivalents"],
        "floor_forward_equivalents": warm.extra["floor_forward_equivalents"],
        "peak_rss_bytes": peak_memory_bytes(),
    }
    full = eqx.filter_jit(Problem.loss)
    ones = problem.graph.gates(1.0, model.dtype)
    full(problem, ones).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        full(problem, ones).block_until_ready()
    forward_s = (time.perf_counter() - start) / 5
    results |= {"gated_forward_s": forward_s,
                "over_floor": round(warm_s / (results["floor_forward_equivalents"] * forward_s), 2)}
    if args.plain:
        plain_acdc(problem, threshold)  # compile
        start = time.perf_counter()
        kept, evaluations = plain_acdc(problem, threshold)
        plain_s = time.perf_counter() - start
        results |= {"plain_s": plain_s, "plain_evaluations": evaluations, "speedup": plain_s / warm_s,
                    "identical_circuit": kept == set(warm.kept)}
    settings = {"model": cfg.name, "prompts": args.prompts, "pos": args.pos, "threshold": f"{threshold:.3g}",
                "max_batch": args.max_batch or "default", "graph": "q/k/v-split", "dtype": args.dtype}
    entry = record("acdc_speed", settings, results)
    for k, v in entry["results"].items():
        print(f"{k:>22}: {v}")


class _Budget(Exception):
    pass


def sample(problem: Problem, threshold: float, args, cfg) -> None:
    """A timed sample of the search (warm), and the whole run extrapolated from its rate per
    forward-equivalent to the upper bound of the work (every edge tested once)."""
    seen = {}

    def stop_after(budget):
        started = time.perf_counter()

        def progress(state):
            seen.update(state, seconds=time.perf_counter() - started)
            if seen["seconds"] > budget:
                raise _Budget

        return progress

    for budget in (min(5.0, args.time_budget), args.time_budget):  # the first compiles
        try:
            acdc(problem, threshold=threshold, max_batch=args.max_batch, progress=stop_after(budget))
        except _Budget:
            pass
    graph = problem.graph
    layers = np.concatenate([g.layers for g in visit_order(graph)])
    all_edges_work = float(((cfg.n_layers + 1 - layers) / (cfg.n_layers + 1)).sum())
    rate = seen["seconds"] / max(seen["forward_equivalents"], 1e-9)
    results = {"n_edges": graph.n_gates, "sampled_s": seen["seconds"], "sampled_edges": seen["edges_done"],
               "sampled_forward_equivalents": seen["forward_equivalents"], "s_per_forward_equivalent": rate,
               "all_edges_forward_equivalents": round(all_edges_work, 1),
               "extrapolated_upper_bound_s": rate * all_edges_work, "peak_memory_bytes": peak_memory_bytes()}
    settings = {"model": cfg.name, "prompts": args.prompts, "pos": args.pos, "threshold": f"{threshold:.3g}",
                "max_batch": args.max_batch or "default", "graph": "q/k/v-split", "dtype": args.dtype,
                "sample": f"{args.time_budget:g} s"}
    entry = record("acdc_speed", settings, results)
    for k, v in entry["results"].items():
        print(f"{k:>30}: {v}")


if __name__ == "__main__":
    main()
