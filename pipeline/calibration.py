"""Calibration of out-of-fold probabilities: expected calibration error and temperature scaling.

Temperature scaling divides the log-probabilities by one number T (softmax(log p / T)); T > 1
softens over-confident predictions, T < 1 sharpens timid ones, and the predicted class never
changes. This module owns the temperature: ``apply_temperature`` is the one scaling every stage
uses (so the gain measured here is the gain predict delivers), and ``load_temperature`` reads the
T the evaluate stage kept in the run's ``calibration.json``. Prediction files hold raw
probabilities; ``predictions.read_predictions(..., scaled=True)`` applies a kept T.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from .errors import PipelineError
from .metrics import logloss
from .runs import RunDir

# log T is searched in [log 0.05, log 20]: wider than any useful temperature, and bounded so a
# degenerate fold (e.g. all predictions right with p = 1) cannot send T to 0 or infinity.
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))


def apply_temperature(probs: np.ndarray, t: float | None) -> np.ndarray:
    """softmax(log(p) / T): temperature scaling applied to probabilities (T > 1 softens)."""
    if t is None or t == 1.0:
        return probs
    z = np.log(np.clip(probs, 1e-15, 1.0)) / t
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def load_temperature(run_dir: str | Path) -> float | None:
    """T from the run's ``calibration.json`` ({"temperature": T, "kept": bool}) when evaluation kept it, else None."""
    path = RunDir(path=run_dir).calibration_json
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        t, kept = d["temperature"], d.get("kept", False)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise PipelineError(f"{path}: expected JSON {{\"temperature\": T, \"kept\": true|false}}; rerun `pipeline evaluate`") from None
    if not kept:
        return None
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise PipelineError(f"{path}: temperature is {t!r}; expected a positive number")
    return float(t)


def ece(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of the top-label confidence, in ``n_bins`` equal-width bins.

    sum over bins of (rows in bin / N) * |accuracy in bin - mean confidence in bin|.
    """
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(float)
    # bin b holds confidences in (b/n, (b+1)/n]; the first bin also takes 0
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for k in range(n_bins):
        m = b == k
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / max(len(y), 1))


def fit_temperature(y: np.ndarray, probs: np.ndarray) -> float:
    """The T minimising the log-loss of softmax(log p / T) on (y, probs)."""
    z = np.log(np.clip(probs, 1e-15, 1.0))  # the same clip as apply_temperature
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, y].mean())

    res = minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def nested_temperature(y: np.ndarray, probs: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, dict[int, float]]:
    """Each fold's probabilities scaled by the T fitted on the other folds (an honest estimate of the gain)."""
    out = np.empty_like(probs)
    temps = {}
    for k in np.unique(fold):
        m = fold == k
        t = fit_temperature(y[~m], probs[~m]) if (~m).any() else 1.0
        temps[int(k)] = t
        out[m] = apply_temperature(probs[m], t)
    return out, temps


# Smallest honest gain worth applying: 0.1% of the log-loss (0.0003 at 0.3). Below it the
# nested gain on calibrated predictions is fold-to-fold noise, either sign.
MIN_GAIN = 1e-3


def calibrate(y: np.ndarray, probs: np.ndarray, fold: np.ndarray, eps: float = 1e-15, n_bins: int = 10) -> tuple[dict, np.ndarray]:
    """Fit T on all OOF rows and, nested over folds, measure what it gains.

    Returns (summary, nested-calibrated probabilities). ``kept`` is true only when the nested
    log-loss is lower than the raw one by more than ``MIN_GAIN`` (relative): a temperature that
    merely fits noise in-sample is dropped.
    """
    t_all = fit_temperature(y, probs)
    nested, per_fold = nested_temperature(y, probs, fold)
    raw_ll, nested_ll = logloss(y, probs, eps), logloss(y, nested, eps)
    summary = {
        "temperature": t_all,
        "kept": bool(nested_ll < raw_ll * (1 - MIN_GAIN)),
        "raw_logloss": raw_ll,
        "nested_logloss": nested_ll,
        "in_sample_logloss": logloss(y, apply_temperature(probs, t_all), eps),
        "fold_temperatures": [per_fold[k] for k in sorted(per_fold)],
        "raw_ece": ece(y, probs, n_bins),
        "nested_ece": ece(y, nested, n_bins),
    }
    return summary, nested
