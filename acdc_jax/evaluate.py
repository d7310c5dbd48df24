"""Scoring circuits against a reference: ROC curves and AUC, precision and recall.

Positives are the gate units (edges, or nodes for node-level graphs) of the canonical circuit in
the graph's own granularity; negatives are every other unit of that graph. A score-based ROC
ranks units by score (higher = more likely in the circuit; NaN = never tested, ranked last);
a threshold family (several ACDC runs) gives one (FPR, TPR) point per kept set.
"""

from __future__ import annotations

import numpy as np


def roc_from_scores(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of every cut of the ranking by score, from (0, 0) to (1, 1); ties move together."""
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    labels = np.asarray(labels, bool)
    if labels.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs at least one positive and one negative unit")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    cut = np.flatnonzero(s[1:] != s[:-1])  # last index of each group of tied scores (-inf ties too)
    ends = np.concatenate([cut, [len(s) - 1]])
    tp = np.cumsum(y)[ends]
    fp = np.cumsum(~y)[ends]
    tpr = np.concatenate([[0.0], tp / n_pos])
    fpr = np.concatenate([[0.0], fp / n_neg])
    return fpr, tpr


def roc_from_masks(masks, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) points of a family of kept sets (e.g. ACDC at several thresholds), with the
    corners (0, 0) and (1, 1) added, sorted by FPR then TPR."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    points = {(0.0, 0.0), (1.0, 1.0)}
    for mask in masks:
        mask = np.asarray(mask, bool)
        points.add((float((mask & ~labels).sum() / n_neg), float((mask & labels).sum() / n_pos)))
    fpr, tpr = map(np.array, zip(*sorted(points)))
    return fpr, tpr


def auc(fpr, tpr) -> float:
    """Area under a ROC curve by the trapezoid rule."""
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def roc_auc(scores, labels) -> float:
    return auc(*roc_from_scores(scores, labels))


def precision_recall(kept_mask, labels) -> tuple[float, float]:
    """Precision and recall of a kept set against the reference (precision is 1 for an empty set)."""
    kept, labels = np.asarray(kept_mask, bool), np.asarray(labels, bool)
    tp = int((kept & labels).sum())
    precision = tp / kept.sum() if kept.any() else 1.0
    recall = tp / labels.sum() if labels.any() else 1.0
    return float(precision), float(recall)
