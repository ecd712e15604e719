"""Scores from class probabilities, via scikit-learn. ``probs`` is (N, K) in class-index order.

``METRICS`` is the one registry of competition metrics: the config's ``metric:`` is checked against
it when the config loads, training reports it per epoch, evaluate, tune and ensemble score with it.
Adding a metric is one line::

    METRICS.register("brier", Metric(lambda y, p: float(((p - np.eye(p.shape[1])[y]) ** 2).sum(1).mean()),
                                     greater_is_better=False))

A metric function takes ``(y, probs)``, or ``(y, probs, eps)`` when it clips probabilities.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.core.registry import Registry


@functools.cache
def _takes_eps(fn: Callable) -> bool:  # once per function: inspect costs more than a numpy log-loss
    return "eps" in inspect.signature(fn).parameters


@dataclass(frozen=True)
class Metric:
    fn: Callable[..., float]
    greater_is_better: bool

    def __call__(self, y: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
        if _takes_eps(self.fn):
            return float(self.fn(y, probs, eps=eps))
        return float(self.fn(y, probs))


# logloss and accuracy in numpy, with scikit-learn's definitions: its input checks cost ~10 ms a call,
# and ensemble selection (pipeline/ensemble/blend.py, hillclimb) scores thousands of candidate blends.


def logloss(y: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative log-probability of the true class, probabilities clipped to [eps, 1 - eps] and renormalised."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    p = p / p.sum(1, keepdims=True)
    y = np.asarray(y, dtype=np.int64)
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(1) == np.asarray(y)).mean())


# ``metric: <name>``; a new one is ``METRICS.register("my_score", Metric(fn, greater_is_better=True))``
METRICS = Registry(
    "metric",
    entries={"logloss": Metric(logloss, greater_is_better=False), "accuracy": Metric(accuracy, greater_is_better=True)},
)
# what "F1" and "AUC" mean depends on the target kind: its task scores them (pipeline/tasks/)
METRICS.register_lazy("f1", "pipeline.tasks.metrics:F1")
METRICS.register_lazy("roc_auc", "pipeline.tasks.metrics:ROC_AUC")


def build_metric(name: str) -> Metric:
    return METRICS.get(name)


def score(metric: str, y: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
    return build_metric(metric)(y, probs, eps)


class _Directions(Mapping):
    """metric -> True when larger is better, read live from ``METRICS`` (a metric registered later is in it)."""

    def __getitem__(self, name: str) -> bool:
        return METRICS.get(name).greater_is_better

    def __iter__(self):
        return iter(METRICS)

    def __len__(self) -> int:
        return len(METRICS)


GREATER_IS_BETTER: Mapping[str, bool] = _Directions()  # ensemble.py reads it by this name


def cv_std(values) -> float:
    """The CV spread every stage reports: sample standard deviation (ddof 1) of per-fold scores; 0 for one fold."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0
