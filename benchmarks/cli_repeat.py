"""Wall time of the README's first command, run twice in fresh processes with one new compilation cache.

    python -m benchmarks.cli_repeat [--repeats 3]

The first run fills an empty persistent compilation cache (``ACDC_JAX_CACHE_DIR`` set to a new
temporary folder); the later runs are the same command on the same shapes, which read the compiled
code back instead of compiling it. A third measurement runs with the cache turned off
(``ACDC_JAX_COMPILE_CACHE=0``), which is what every run cost before the cache. Each is a whole
process: interpreter start, imports, model build, search, scoring and output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from ._harness import record

COMMAND = ["discover", "--task", "tracr-reverse", "--method", "acdc", "--threshold", "0.01"]


def _run(env: dict, out_dir: str) -> float:  # in an empty folder, whatever the command writes
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from acdc_jax.cli import main; main()", *COMMAND], cwd=out_dir, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cached runs (and uncached ones) after the first")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "ACDC_JAX_CACHE_DIR": cache, "ACDC_JAX_COMPILE_CACHE": "1"}
        first = _run(env, out)
        cached = [_run(env, out) for _ in range(args.repeats)]
        uncached = [_run({**env, "ACDC_JAX_COMPILE_CACHE": "0"}, out) for _ in range(args.repeats)]
    results = {"first_run_s": round(first, 2), "cached_run_s": round(statistics.median(cached), 2),
               "uncached_run_s": round(statistics.median(uncached), 2),
               "cached_over_uncached": round(statistics.median(cached) / statistics.median(uncached), 3)}
    entry = record("cli_repeat", {"command": "acdc-jax " + " ".join(COMMAND), "repeats": args.repeats}, results)
    for k, v in entry["results"].items():
        print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
