"""How stable a method's ranking is: agreement of scores between disjoint halves of the prompts.

``rank_agreement`` compares two score vectors (Spearman's rho, Kendall's tau-b, top-k overlap);
``split_half_stability`` runs a method on two disjoint random halves of a problem's prompts, once
per seed, and compares the halves. Pairs of prompts (``group_size=2``: rows 2i and 2i+1, e.g. IOI's
swapped pairs) stay together in one half.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from ._circuit import Circuit
from ._problem import Problem


def rank_agreement(a, b, *, top_k: int | None = None) -> dict[str, float]:
    """Spearman and Kendall (tau-b) correlation of two score vectors, and the overlap of their top ``k``.

    ``top_k_overlap`` is ``|top_k(a) & top_k(b)| / k`` (1: the same k units, in any order). NaN
    scores rank last. Correlations of a constant vector are NaN.
    """
    a = np.nan_to_num(np.asarray(a, np.float64), nan=-np.inf)
    b = np.nan_to_num(np.asarray(b, np.float64), nan=-np.inf)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"score vectors must be 1-d and of the same length, got {a.shape} and {b.shape}")
    ranks_a, ranks_b = stats.rankdata(a), stats.rankdata(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        spearman = float(stats.spearmanr(ranks_a, ranks_b).statistic) if np.ptp(a) and np.ptp(b) else float("nan")
        kendall = float(stats.kendalltau(ranks_a, ranks_b).statistic) if np.ptp(a) and np.ptp(b) else float("nan")
    k = len(a) if top_k is None else int(top_k)
    if not 1 <= k <= len(a):
        raise ValueError(f"top_k must be between 1 and {len(a)}, got {top_k}")
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return {"spearman": spearman, "kendall": kendall, "top_k_overlap": len(top_a & top_b) / k, "top_k": k}


def split_half_stability(
    problem: Problem,
    method: str | Callable[..., Circuit] = "eap",
    *,
    seeds: Sequence[int] = (0, 1, 2),
    top_k: int = 20,
    group_size: int = 1,
    absolute: bool = False,
    **options,
) -> dict:
    """Run ``method`` on two disjoint random halves of the prompts per seed and compare the halves.

    ``method`` is a registered name or a function ``fn(problem, **options) -> Circuit``; its
    ``circuit.scores`` are compared (``absolute=True`` compares ``|scores|``). The prompts are cut
    into consecutive groups of ``group_size`` rows, shuffled by the seed and dealt into two halves
    of equal size (with an odd number of groups one group sits out), so both halves compile once.
    Returns per-seed lists of ``spearman``, ``kendall`` and ``top_k_overlap``, and their means.
    """
    if isinstance(method, str):
        from . import get_method

        fn = get_method(method).fn
    else:
        fn = method
    n_rows = problem.run.tokens.shape[0]
    if group_size < 1 or n_rows % group_size:
        raise ValueError(f"{n_rows} prompts cannot be split into groups of {group_size}")
    n_groups = n_rows // group_size
    if n_groups < 2:
        raise ValueError("split-half stability needs at least two groups of prompts")
    top_k = min(int(top_k), problem.graph.n_gates)
    results: dict[str, list] = {"seed": [], "spearman": [], "kendall": [], "top_k_overlap": []}
    for seed in seeds:
        order = np.random.RandomState(seed).permutation(n_groups)
        half = n_groups // 2
        halves = [order[:half], order[half : 2 * half]]  # equal sizes: one compilation for both halves
        scores = []
        for groups in halves:
            rows = (np.sort(groups)[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
            circuit = fn(problem.subset(rows), **options)
            scores.append(np.abs(circuit.scores) if absolute else circuit.scores)
        agreement = rank_agreement(scores[0], scores[1], top_k=top_k)
        results["seed"].append(int(seed))
        for key in ("spearman", "kendall", "top_k_overlap"):
            results[key].append(agreement[key])
    results["mean"] = {key: float(np.nanmean(results[key])) for key in ("spearman", "kendall", "top_k_overlap")}
    results["top_k"] = top_k
    return results
