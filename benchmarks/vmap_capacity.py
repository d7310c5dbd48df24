"""Thousands of ablations in one call: the metric of N random gate configurations of GPT-2 small
(random weights), vmapped and chunked automatically to fit memory.

    python -m benchmarks.vmap_capacity [--configs 4096] [--prompts 1] [--pos 16]

Reports the chunk size the memory estimate chose, configurations per second, and the peak memory
of the process (CPU) or device (GPU), so the per-configuration footprint can be read off.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import acdc_jax as aj
from acdc_jax.methods import Problem
from acdc_jax.models import TransformerConfig
from acdc_jax.patching import auto_chunk_size, bytes_per_configuration

from ._harness import block, peak_memory_bytes, random_task, record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=None, help="override the automatic chunk size")
    args = parser.parse_args(argv)

    cfg = TransformerConfig.gpt2()
    model = aj.init_model(cfg, jax.random.PRNGKey(0))
    task = random_task(cfg.d_vocab, args.prompts, args.pos, name="random")
    problem = Problem.build(model, task, metric="kl")
    gates = jax.random.bernoulli(jax.random.PRNGKey(1), 0.9, (args.configs, problem.graph.n_gates)).astype(np.float32)
    chunk = args.chunk or auto_chunk_size(problem.run, args.configs)

    def value(run, g):
        return problem.metric(run.logits(g), problem.inputs)

    warm = gates[: min(chunk, args.configs)]
    start = time.perf_counter()
    block(problem.run.map_gates(value, warm, chunk_size=chunk))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    values = block(problem.run.map_gates(value, gates, chunk_size=chunk))
    seconds = time.perf_counter() - start
    assert np.all(np.isfinite(np.asarray(values)))
    results = {
        "configs": args.configs,
        "chunk": chunk,
        "estimated_bytes_per_config": bytes_per_configuration(problem.run),
        "seconds": seconds,
        "configs_per_s": args.configs / seconds,
        "first_chunk_s_incl_compile": compile_s,
        "peak_memory_bytes": peak_memory_bytes(),
    }
    settings = {"model": "gpt2 (random)", "prompts": args.prompts, "pos": args.pos, "n_gates": problem.graph.n_gates}
    entry = record("vmap_capacity", settings, results)
    for k, v in entry["results"].items():
        print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
