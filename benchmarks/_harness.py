"""Shared benchmark plumbing: timing that separates compilation from steady state, and a results log.

Every benchmark appends records to ``benchmarks/results.jsonl`` (one JSON object per line, with the
date, device, versions and settings) and re-renders ``benchmarks/results.md`` from that log.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import jax

HERE = Path(__file__).parent
LOG = HERE / "results.jsonl"
TABLE = HERE / "results.md"


class _CompileEvents:
    """Counts JAX's trace and backend-compile events (``jax.monitoring``) since the last ``reset``."""

    TRACE = "/jax/core/compile/jaxpr_trace_duration"
    COMPILE = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.reset()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def reset(self) -> None:
        self.traces, self.compiles, self.compile_s = 0, 0, 0.0

    def _on_event(self, event: str, seconds: float, **_) -> None:
        if event == self.TRACE:
            self.traces += 1
        elif event == self.COMPILE:
            self.compiles += 1
            self.compile_s += seconds

    def snapshot(self) -> dict:
        return {"traces": self.traces, "compiles": self.compiles, "backend_compile_s": round(self.compile_s, 3)}


compile_events = _CompileEvents()


def random_task(d_vocab: int, prompts: int, pos: int, metric: str = "kl", name: str = "ioi-shaped-random", **fields):
    """An IOI-shaped batch of random tokens read at the last position (seeded, so runs compare).

    Draws clean, then corrupted tokens, then (for ``logit_diff``) one answer and one wrong-answer
    token per prompt, all from ``np.random.RandomState(0)``.
    """
    import numpy as np

    from acdc_jax.tasks import Task

    rng = np.random.RandomState(0)
    clean = rng.randint(0, d_vocab, (prompts, pos))
    corrupt = rng.randint(0, d_vocab, clean.shape)
    if metric == "logit_diff":
        fields["answers"] = rng.randint(0, d_vocab, (prompts, 1))
        fields["wrong_answers"] = rng.randint(0, d_vocab, (prompts, 1))
    return Task(name=name, clean=clean, corrupt=corrupt, positions=np.full((prompts, 1), pos - 1), metric=metric, **fields)


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def timed(fn: Callable, *args, repeats: int = 5) -> dict:
    """Compile time (first call) and steady-state seconds (median of ``repeats`` later calls)."""
    return interleaved({"fn": (fn, *args)}, repeats)["fn"]


def interleaved(calls: dict[str, tuple], repeats: int = 5) -> dict[str, dict]:
    """``timed`` for several functions at once, ``calls[name] = (fn, *args)``: each is compiled by
    a first call, then the calls alternate round by round, so that a change in the shared machine's
    load moves every function's samples alike (ratios of medians, not of runs minutes apart)."""
    first = {}
    for name, (fn, *args) in calls.items():
        start = time.perf_counter()
        block(fn(*args))
        first[name] = time.perf_counter() - start
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, *args) in calls.items():
            start = time.perf_counter()
            block(fn(*args))
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        steady = statistics.median(ts)
        out[name] = {"first_call_s": first[name], "compile_s": max(0.0, first[name] - steady), "steady_s": steady,
                     "steady_min_s": min(ts)}
    return out


def device_name() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        import os

        return f"CPU ({os.cpu_count()} cores, {cpu})"
    return f"{dev.platform.upper()} {getattr(dev, 'device_kind', '')}".strip()


def environment() -> dict:
    import equinox

    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(),
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "equinox": equinox.__version__,
        "python": platform.python_version(),
    }


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: the process's peak RSS


def record(benchmark: str, settings: dict, results: dict) -> dict:
    """Append one run to the log and re-render the table (``ACDC_JAX_BENCH_DRY=1``: print only)."""
    import os

    entry = {"benchmark": benchmark, **environment(), "settings": settings, "results": results}
    if os.environ.get("ACDC_JAX_BENCH_DRY"):
        return entry
    with LOG.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    render_table()
    return entry


def render_table() -> None:
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()] if LOG.exists() else []
    lines = [
        "# Benchmark results",
        "",
        "Generated from `results.jsonl` by `benchmarks/_harness.py`; each row is one run of one script.",
        "Times are steady-state medians; compilation is reported separately.",
        "",
        "| date | benchmark | device | settings | results |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        results = ", ".join(f"{k}={_fmt(v)}" for k, v in r["results"].items())
        lines.append(f"| {r['date'][:10]} | {r['benchmark']} | {r['device']} | {settings} | {results} |")
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    TABLE.write_text("\n".join(lines) + "\n")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
