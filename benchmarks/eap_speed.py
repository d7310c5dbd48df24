"""Seconds for EAP's score of every edge of GPT-2 small (random weights, IOI-shaped batch).

    python -m benchmarks.eap_speed [--prompts 20] [--pos 16] [--size gpt2] [--per-head]

EAP is one forward and one backward pass of the gated model at all gates 1: the gradient of the
task metric (here IOI's: the logit difference of an answer and a wrong-answer token at the last
position; KL to the clean output would have gradient zero at the clean point) with respect to all 32,491
gates of the q/k/v-split graph. The first call is reported apart (tracing and compilation); the
steady state is the median of later calls with the same shapes, which reuse the compiled program
(the trace and compile counts show that they do).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import acdc_jax as aj
from acdc_jax import eap
from acdc_jax.methods import Problem
from acdc_jax.methods._gradients import gate_point_logits, pullback
from acdc_jax.models import TransformerConfig, forward

from ._harness import compile_events, peak_memory_bytes, random_task, record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-head", action="store_true", help="one input per head (11,611 edges)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-read comparison (slow at large batches)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--atp", action="store_true",
                        help="also AtP* (QK fix, GradDrop), on the split path and on the gated forward")
    args = parser.parse_args(argv)

    cfg = TransformerConfig.gpt2(args.size)
    model = aj.init_model(cfg, jax.random.PRNGKey(0))
    if args.dtype == "bfloat16":
        model = model.astype(jax.numpy.bfloat16)
    task = random_task(cfg.d_vocab, args.prompts, args.pos, metric="logit_diff")
    problem = Problem.build(model, task, qkv_split=not args.per_head)

    compile_events.reset()
    start = time.perf_counter()
    first = eap(problem)
    first_s = time.perf_counter() - start
    cold = compile_events.snapshot()
    compile_events.reset()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        again = eap(problem)
        times.append(time.perf_counter() - start)
    assert np.array_equal(first.scores, again.scores) and np.all(np.isfinite(first.scores))
    steady = compile_events.snapshot()
    results = {
        "n_edges": problem.graph.n_gates,
        "eap_s": float(np.median(times)),
        "first_call_s": first_s,
        "first_call_traces": cold["traces"],
        "first_call_compiles": cold["compiles"],
        "backend_compile_s": cold["backend_compile_s"],
        "steady_traces": steady["traces"],
        "steady_compiles": steady["compiles"],
        "peak_rss_bytes": peak_memory_bytes(),
    }
    plain = jax.jit(lambda m, t, p: forward(m, t, positions=p))
    tokens, positions = problem.run.tokens, problem.run.positions
    plain_times = _median_seconds(lambda: plain(model, tokens, positions).block_until_ready(), args.repeats)
    ones = problem.graph.gates(1.0, model.dtype)[None]

    def gated_eap(shared_rows: bool):
        aux = {"gates": ones, "shared_rows": shared_rows}
        return np.asarray(pullback(problem, gate_point_logits, n_points=1, weights=np.ones(1), aux=aux,
                                   shared=np.zeros_like(ones))[1][0])

    results |= {"plain_forward_s": plain_times, "eap_in_plain_forwards": round(results["eap_s"] / plain_times, 2)}
    # the gated forward's own gradient at gates 1, as EAP computed it before the split-input path
    for name, shared_rows in (("shared_read", True),) + ((("dense_read", False),) if not args.no_dense else ()):
        seconds = _median_seconds(lambda s=shared_rows: gated_eap(s), args.repeats)
        scores = -gated_eap(shared_rows)
        results |= {
            f"{name}_eap_s": seconds,
            f"{name}_in_plain_forwards": round(seconds / plain_times, 2),
            f"max_rel_diff_to_{name}": float(np.abs(first.scores - scores).max() / np.abs(scores).max()),
        }
    if args.atp:
        results |= _atp_star(problem, plain_times, args.repeats)
    settings = {"model": args.size, "prompts": args.prompts, "pos": args.pos,
                "graph": "per-head" if args.per_head else "q/k/v-split", "metric": "logit_diff", "dtype": args.dtype}
    entry = record("eap_speed", settings, results)
    for k, v in entry["results"].items():
        print(f"{k:>22}: {v}")


def _atp_star(problem, plain_s: float, repeats: int) -> dict:
    """AtP* (L + 1 GradDrop passes with pattern gradients, then the QK fix) on the one-residual path
    and, forced, on the gated forward's probes (as before the split path)."""
    from acdc_jax.methods import atp_star as atp_module

    split = atp_module.atp_star(problem).scores
    split_s = _median_seconds(lambda: atp_module.atp_star(problem), repeats)
    original = atp_module.uniform_alphas
    atp_module.uniform_alphas = lambda graph, points: None
    unrolled = problem.with_remat(False)  # GradDrop's traced layer under remat fails in the gated path (a known bug)
    try:
        gated = atp_module.atp_star(unrolled).scores
        gated_s = _median_seconds(lambda: atp_module.atp_star(unrolled), max(1, repeats // 3))
    finally:
        atp_module.uniform_alphas = original
    return {"atp_star_s": split_s, "atp_star_in_plain_forwards": round(split_s / plain_s, 2),
            "gated_atp_star_s": gated_s, "gated_atp_star_in_plain_forwards": round(gated_s / plain_s, 2),
            "max_rel_diff_atp_star": float(np.abs(split - gated).max() / np.abs(gated).max())}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


if __name__ == "__main__":
    main()
