"""Tokens per second of the ungated and the gated forward, GPT-2 small shape, random weights.

    python -m benchmarks.forward_throughput [--batch 8] [--pos 16] [--size gpt2]

The gated forward runs with every gate at 1 on a q/k/v-split graph (32,491 gates) and a corrupted
ablation cache, which is what every patching method evaluates; the ratio gated/ungated is the
price of having a gate on every edge.
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import numpy as np

import acdc_jax as aj
from acdc_jax.models import TransformerConfig, forward

from ._harness import record, timed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--qkv-split", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    cfg = TransformerConfig.gpt2(args.size)
    model = aj.init_model(cfg, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    clean = rng.randint(0, cfg.d_vocab, (args.batch, args.pos))
    corrupt = rng.randint(0, cfg.d_vocab, (args.batch, args.pos))
    graph = aj.Graph.from_model(model, qkv_split=args.qkv_split)
    run = aj.GatedRun(model, graph, clean, aj.corrupt_ablation(model, corrupt))
    gates = graph.gates(1.0)

    ungated = eqx.filter_jit(forward)
    t_plain = timed(ungated, model, run.tokens, repeats=args.repeats)
    t_gated = timed(run, gates, repeats=args.repeats)
    tokens = args.batch * args.pos
    results = {
        "ungated_tok_per_s": tokens / t_plain["steady_s"],
        "gated_tok_per_s": tokens / t_gated["steady_s"],
        "gated_over_ungated": t_gated["steady_s"] / t_plain["steady_s"],
        "ungated_s": t_plain["steady_s"],
        "gated_s": t_gated["steady_s"],
        "ungated_compile_s": t_plain["compile_s"],
        "gated_compile_s": t_gated["compile_s"],
    }
    settings = {"model": args.size, "batch": args.batch, "pos": args.pos, "graph": graph.describe().split(" (")[0], "n_gates": graph.n_gates}
    entry = record("forward_throughput", settings, results)
    for k, v in entry["results"].items():
        print(f"{k:>22}: {v:.4g}")


if __name__ == "__main__":
    main()
