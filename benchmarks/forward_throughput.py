"""Tokens per second of the ungated and the gated forward, GPT-2 small shape, random weights.

    python -m benchmarks.forward_throughput [--batch 8] [--pos 16] [--size gpt2]

The gated forward runs with every gate at 1 on a q/k/v-split graph (32,491 gates; ``--no-qkv-split``
for one input per head, ``--level node`` for node gates) and a corrupted
ablation cache, which is what every patching method evaluates; the ratio gated/ungated is the
price of having a gate on every edge. The arithmetic of each (counted analytically) gives the
floor of that ratio and the FLOP rate each reaches.

At gates 1 every layer of an edge graph reads the run's carried residual instead of the difference
buffer (``gated_forward``); a layer with a pruned input reads the buffer. So the script also times
the worst case for that shortcut (``pruned_*``): one edge into every destination (each layer's
first attention input, each MLP, the logits) at 0, so that every layer reads the buffer. Node
gates never read the buffer, whatever their values.
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import numpy as np

import acdc_jax as aj
from acdc_jax.models import TransformerConfig, forward

from ._harness import interleaved, random_task, record


def analytic_mflop_per_token(cfg: TransformerConfig, graph: aj.Graph, pos: int) -> tuple[float, float]:
    """Multiply-adds x 2 per token of the ungated and the gated forward (logits at every position).

    Ungated: the q/k/v/o projections, the MLP, attention scores and mixing, and the unembedding.
    Gated adds, per edge, one multiply-add per residual dimension (the gate-weighted sum of source
    differences into the destination input) and a LayerNorm per destination input; the per-head
    q/k/v projections read separate inputs but cost what the shared ones cost. (XLA's cost analysis
    counts a loop body once, so it undercounts the layer scan and is not used.)
    """
    d, heads = cfg.d_model, cfg.n_heads * cfg.d_head
    per_layer = 2 * (3 * d * heads + heads * d) + 2 * 2 * pos * heads
    if cfg.d_mlp:
        per_layer += 2 * 2 * d * cfg.d_mlp
    ungated = cfg.n_layers * per_layer + 2 * d * cfg.d_vocab
    n_inputs = len({name.split("->")[1] for name in graph.gate_names}) if graph.level == "edge" else 0
    gated = ungated + 2 * d * (graph.n_gates if graph.level == "edge" else 0) + 5 * d * n_inputs
    return ungated / 1e6, gated / 1e6


def pruned_everywhere(graph: aj.Graph):
    """Gates 1 except one edge into every destination at 0: the first edge into each layer's first
    attention input, into each MLP and into the logits (every layer then reads the buffer)."""
    gates = np.ones(graph.n_gates, np.float32)
    seen = set()
    for i, edge in enumerate(graph.edges):
        dst = edge.split("->")[1]
        key = dst if not dst.startswith("a") else dst.split(".")[0]
        if key not in seen:
            seen.add(key)
            gates[i] = 0.0
    return gates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--qkv-split", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--level", choices=("edge", "node"), default="edge")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)

    cfg = TransformerConfig.gpt2(args.size)
    model = aj.init_model(cfg, jax.random.PRNGKey(0))
    if args.dtype == "bfloat16":
        model = model.astype(jax.numpy.bfloat16)
    task = random_task(cfg.d_vocab, args.batch, args.pos)
    graph = aj.Graph.from_model(model, qkv_split=args.qkv_split, level=args.level)
    run = aj.GatedRun(model, graph, task.clean, aj.corrupt_ablation(model, task.corrupt))
    gates = graph.gates(1.0)

    ungated = eqx.filter_jit(forward)
    calls = {"plain": (ungated, model, run.tokens), "gated": (run, gates)}
    if graph.level == "edge":
        calls["pruned"] = (run, pruned_everywhere(graph))
    timings = interleaved(calls, repeats=args.repeats)
    t_plain, t_gated, t_pruned = timings["plain"], timings["gated"], timings.get("pruned")
    tokens = args.batch * args.pos
    mflop_plain, mflop_gated = analytic_mflop_per_token(cfg, graph, args.pos)
    results = {
        "ungated_tok_per_s": tokens / t_plain["steady_s"],
        "gated_tok_per_s": tokens / t_gated["steady_s"],
        "gated_over_ungated": t_gated["steady_s"] / t_plain["steady_s"],
        "ungated_s": t_plain["steady_s"],
        "gated_s": t_gated["steady_s"],
        "ungated_compile_s": t_plain["compile_s"],
        "gated_compile_s": t_gated["compile_s"],
        "ungated_mflop_per_tok": mflop_plain,
        "gated_mflop_per_tok": mflop_gated,
        "flop_ratio_floor": mflop_gated / mflop_plain,
        "ungated_gflop_per_s": mflop_plain * tokens / t_plain["steady_s"] / 1e3,
        "gated_gflop_per_s": mflop_gated * tokens / t_gated["steady_s"] / 1e3,
    }
    if t_pruned is not None:
        results |= {"pruned_s": t_pruned["steady_s"], "pruned_over_ungated": t_pruned["steady_s"] / t_plain["steady_s"]}
    settings = {"model": args.size, "batch": args.batch, "pos": args.pos, "graph": graph.describe().split(" (")[0], "n_gates": graph.n_gates,
                "dtype": args.dtype}
    entry = record("forward_throughput", settings, results)
    for k, v in entry["results"].items():
        print(f"{k:>22}: {v:.4g}")


if __name__ == "__main__":
    main()
