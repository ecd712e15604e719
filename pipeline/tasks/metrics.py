"""The metrics whose meaning depends on the target kind, scored by the kind's task: entries of
``METRICS`` (pipeline/core/metrics.py), imported when first used."""

from __future__ import annotations

import numpy as np

from pipeline.core.metrics import Metric
from pipeline.tasks import build_task


def f1(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary: F1 of class 1 at argmax. Multiclass: macro F1 (every class counts the same)."""
    return build_task(probs.shape[1]).f1(y, probs)


def roc_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUC of P(class 1). Multiclass: one-vs-rest macro AUC. NaN when a class is absent
    (a fold without one class has no AUC, rather than an error mid-training)."""
    return build_task(probs.shape[1]).roc_auc(y, probs)


F1 = Metric(f1, greater_is_better=True)
ROC_AUC = Metric(roc_auc, greater_is_better=True)
