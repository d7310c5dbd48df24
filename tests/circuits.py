"""Circuits for the draw and export tests: a real one (ACDC on tracr-reverse, found once per test
session) and GPT-2-sized ones with random scores (no weights needed)."""

from __future__ import annotations

import copy
import functools

import numpy as np

import acdc_jax as aj
from acdc_jax.methods import Circuit

GPT2 = aj.TransformerConfig.gpt2()


@functools.lru_cache(maxsize=None)
def _tracr_reverse_acdc() -> dict:
    return aj.discover("tracr-reverse", "tracr-reverse", "acdc", threshold=0.01).to_dict()


def tracr_reverse_acdc() -> Circuit:
    """ACDC at threshold 0.01 on tracr-reverse (a fresh copy each call: tests may change it)."""
    return Circuit.from_dict(copy.deepcopy(_tracr_reverse_acdc()))


def random_circuit(graph: aj.Graph, seed: int = 0, *, nan_fraction: float = 0.1, kept_fraction: float = 0.05,
                   task: str = "ioi", extra: dict | None = None) -> Circuit:
    """Signed normal scores (a fraction NaN, as for never-tested units) and a random kept set."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=graph.n_gates)
    scores[rng.random(graph.n_gates) < nan_fraction] = np.nan
    kept = tuple(graph.gate_names[i] for i in np.flatnonzero(rng.random(graph.n_gates) < kept_fraction))
    return Circuit("eap", task, graph, scores, kept, "logit_diff", "corrupt", threshold=0.5, metric_value=1.25,
                   extra=extra or {})
