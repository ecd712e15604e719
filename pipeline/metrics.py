"""Scores from class probabilities, via scikit-learn. ``probs`` is (N, K) in class-index order."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

# metric -> True when larger is better
GREATER_IS_BETTER = {"logloss": False, "accuracy": True, "f1": True, "roc_auc": True}


def logloss(y: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
    p = np.clip(probs, eps, 1 - eps)
    p = p / p.sum(1, keepdims=True)
    return float(skm.log_loss(y, p, labels=np.arange(probs.shape[1])))


def cv_std(values) -> float:
    """The CV spread every stage reports: sample standard deviation (ddof 1) of per-fold scores; 0 for one fold."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def score(metric: str, y: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
    k = probs.shape[1]
    if metric == "logloss":
        return logloss(y, probs, eps)
    if metric == "accuracy":
        return float(skm.accuracy_score(y, probs.argmax(1)))
    if metric == "f1":
        if k == 2:
            return float(skm.f1_score(y, probs.argmax(1), zero_division=0))
        return float(skm.f1_score(y, probs.argmax(1), average="macro", labels=np.arange(k), zero_division=0))
    if metric == "roc_auc":
        if len(np.unique(y)) < 2:
            return float("nan")
        if k == 2:
            return float(skm.roc_auc_score(y, probs[:, 1]))
        return float(skm.roc_auc_score(y, probs, multi_class="ovr", labels=np.arange(k)))
    raise ValueError(metric)
