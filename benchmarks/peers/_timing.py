"""Timing both sides of the comparison share (no imports beyond the standard library, so the peer's
own virtual environment can load it next to its script)."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int) -> tuple[float, list[float], object]:
    """``fn`` once untimed (compilation, caches), then the median seconds of ``repeats`` calls, the
    times, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result
