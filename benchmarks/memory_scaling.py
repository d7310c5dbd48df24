"""Peak memory of EAP and EAP-IG against model size, with and without recomputed layers (remat),
in float32 and bfloat16, and the extrapolation to an 8B model on one 80 GB accelerator.

    python -m benchmarks.memory_scaling [--prompts 8] [--pos 16] [--steps 5] [--sizes 4x128,8x256,12x384,16x512]

The models are scaled-down Llama-3 shapes (RMSNorm, rotary, grouped-query attention with 4 query heads
per key/value head, gated SiLU MLP at 3.5 x d_model, untied unembedding), random weights, IOI-shaped
batches read at the last position. Each method runs for real (its result is computed) and, on the
way, the compiled program of its pullback is read for XLA's buffer assignment: ``peak`` is the
program's arguments plus outputs plus temporaries, the memory it needs on a device (on a CPU, RSS
would add the Python process and every other compiled program). The ratio ``temp / (chunk x
bytes_per_configuration)`` is the number of gated forwards' worth the backward pass keeps per
configuration: it grows with the depth for the plain backward, and is a constant with remat.

The extrapolation applies the largest measured float32 ratio per configuration (XLA's CPU backend
computes bf16 arithmetic in float32 with float32 copies, so the CPU's bf16 programs are not what an
accelerator with bf16 units compiles) to the shapes of
Llama-3.1-8B (32 layers, 32 query and 8 key/value heads, d_model 4096, d_mlp 14336, 128,256 tokens)
in bf16: weights, bytes per (step, prompt) configuration, and how many configurations fit one
80 GB device beside the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import acdc_jax as aj
from acdc_jax.memory import human, weight_bytes
from acdc_jax.methods import Problem
from acdc_jax.methods import _gradients
from acdc_jax.models import TransformerConfig
from acdc_jax.patching import activation_bytes, backward_forwards

from ._harness import random_task, record

LLAMA_8B = TransformerConfig(
    n_layers=32, n_heads=32, n_kv_heads=8, d_model=4096, d_head=128, d_mlp=14336, d_vocab=128256, n_ctx=8192,
    act_fn="silu", normalization="rms", positional="rotary", gated_mlp=True, tied_unembed=False,
)


def scaled(n_layers: int, d_model: int) -> TransformerConfig:
    """A Llama-3-shaped model of this depth and width (head size 32, 4 query heads per kv head)."""
    n_heads = max(4, d_model // 32)
    return dataclasses.replace(LLAMA_8B, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads // 4, d_model=d_model,
                               d_head=d_model // n_heads, rotary_dim=d_model // n_heads, d_mlp=int(3.5 * d_model), d_vocab=2048, d_vocab_out=2048,
                               n_ctx=64)


class Recorder:
    """Reads the compiled memory of every pullback the methods run (the same arguments, compiled once more)."""

    def __init__(self):
        self.programs = []
        self._inner = _gradients._jit_pullback

    def __enter__(self):
        def spy(*args):
            compiled = self._inner.lower(*args).compile()
            m = compiled.compiled.memory_analysis()
            self.programs.append(dict(temp=m.temp_size_in_bytes, arguments=m.argument_size_in_bytes,
                                      outputs=m.output_size_in_bytes, chunk=int(args[-1]),
                                      n_configs=int(args[5].shape[0]), remat=bool(args[0].run.remat)))
            return self._inner(*args)

        _gradients._jit_pullback = spy
        return self

    def __exit__(self, *exc):
        _gradients._jit_pullback = self._inner


def measure(config: TransformerConfig, dtype, *, prompts: int, pos: int, steps: int) -> list[dict]:
    model = aj.init_model(config, jax.random.PRNGKey(0)).astype(dtype)
    task = random_task(config.d_vocab, prompts, pos, metric="logit_diff")
    problem = Problem.build(model, task)
    per_config = activation_bytes(config, problem.graph.n_in, 1, pos, jnp.dtype(dtype).itemsize)
    rows = []
    for method, run, n_configs in (("eap", lambda p: aj.eap(p, chunk_size=prompts), prompts),
                                   (f"eap-ig ({steps} steps)", lambda p: aj.eap_ig(p, steps=steps, chunk_size=prompts),
                                    steps * prompts)):
        scores = {}
        for remat in (False, True):
            with Recorder() as rec:
                scores[remat] = run(problem.with_remat(remat)).scores
            (prog,) = rec.programs
            peak = prog["temp"] + prog["arguments"] + prog["outputs"]
            rows.append(dict(
                method=method, remat=remat, dtype=jnp.dtype(dtype).name, n_layers=config.n_layers,
                d_model=config.d_model, params=int(weight_bytes(config, 1)), n_configs=n_configs, chunk=prog["chunk"],
                peak_bytes=int(peak), temp_bytes=int(prog["temp"]), weight_bytes=int(weight_bytes(config, jnp.dtype(dtype).itemsize)),
                forwards_per_config=prog["temp"] / (prog["chunk"] * per_config),
                estimate_forwards=backward_forwards(config.n_layers, remat),
            ))
        scale = np.abs(scores[False]).max()
        rows[-1]["scores_max_rel_diff"] = float(np.abs(scores[True] - scores[False]).max() / scale)
    return rows


def extrapolate(rows: list[dict], *, pos: int, device_gb: float = 80.0) -> dict:
    """Llama-3.1-8B in bf16 at this prompt length, with the largest measured forwards per configuration."""
    cfg = LLAMA_8B
    n_in = aj.Graph.from_model(cfg).n_in
    per_config = activation_bytes(cfg, n_in, 1, pos, 2)
    weights = weight_bytes(cfg, 2)
    free = device_gb * 2**30 - weights
    out = {"weights_GB": weights / 2**30, "forward_GB_per_config": per_config / 2**30}
    # float32 rows: XLA's CPU backend computes bf16 arithmetic in float32 and keeps float32 copies, so
    # its bf16 programs hold more than an accelerator's would; the float32 ratio is the buffer count
    for remat in (False, True):
        measured = [r for r in rows if r["remat"] == remat and r["dtype"] == "float32"]
        if remat:
            forwards = max(r["forwards_per_config"] for r in measured)  # a constant in depth: the largest
        else:  # grows with depth: a least-squares line in n_layers, carried to 32 layers
            slope, intercept = np.polyfit([r["n_layers"] for r in measured], [r["forwards_per_config"] for r in measured], 1)
            forwards = slope * cfg.n_layers + intercept
            out["plain_forwards_fit"] = f"{slope:.2f} x n_layers + {intercept:.2f}"
        key = "remat" if remat else "plain"
        out[f"{key}_forwards_per_config"] = float(forwards)
        out[f"{key}_GB_per_config"] = forwards * per_config / 2**30
        out[f"{key}_configs_per_80GB"] = int(free // (forwards * per_config))
    return out


def report(ext: dict, *, pos: int, steps: int) -> None:
    print("Llama-3.1-8B, bf16, %d tokens: weights %.1f GB; per configuration %.2f GB plain (%.1f forwards), %.2f GB remat "
          "(%.1f forwards); configurations per 80 GB: %d plain, %d remat" % (
              pos, ext["weights_GB"], ext["plain_GB_per_config"], ext["plain_forwards_per_config"],
              ext["remat_GB_per_config"], ext["remat_forwards_per_config"],
              ext["plain_configs_per_80GB"], ext["remat_configs_per_80GB"]))
    n_ioi = 200 * steps
    print(f"EAP-IG on IOI-200 with {steps} steps = {n_ioi} configurations: "
          f"{math.ceil(n_ioi / max(1, ext['remat_configs_per_80GB']))} chunks with remat, "
          f"{math.ceil(n_ioi / max(1, ext['plain_configs_per_80GB']))} without")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sizes", default="4x128,8x256,12x384,16x512", help="LAYERSxD_MODEL,...")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes.split(","):
        n_layers, d_model = map(int, size.split("x"))
        for dtype in (jnp.float32, jnp.bfloat16):
            for row in measure(scaled(n_layers, d_model), dtype, prompts=args.prompts, pos=args.pos, steps=args.steps):
                rows.append(row)
                print(f"{row['method']:<18} L={row['n_layers']:<3} d={row['d_model']:<4} {row['dtype']:<8} "
                      f"params={row['params'] / 1e6:7.2f}M remat={row['remat']!s:<5} chunk={row['chunk']:<3} "
                      f"peak={human(row['peak_bytes']):>9}  forwards/config={row['forwards_per_config']:.1f} "
                      f"(estimate {row['estimate_forwards']})", flush=True)
    ext = extrapolate(rows, pos=args.pos)
    report(ext, pos=args.pos, steps=args.steps)
    common = dict(prompts=args.prompts, pos=args.pos, steps=args.steps)
    for row in rows:
        keys = ("method", "n_layers", "d_model", "dtype", "remat", "chunk")
        record("memory_scaling", {**common, **{k: row[k] for k in keys}},
               {k: v for k, v in row.items() if k not in keys})
    record("memory_scaling_extrapolation", {**common, "model": "Llama-3.1-8B shape, bf16", "sizes": args.sizes}, ext)


if __name__ == "__main__":
    main()
