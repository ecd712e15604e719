"""Calibration of out-of-fold probabilities: expected calibration error, temperature scaling and a
shrink toward the class prior.

Temperature scaling divides the log-probabilities by one number T (softmax(log p / T)); T > 1
softens over-confident predictions, T < 1 sharpens timid ones, and the predicted class never
changes. This module owns the temperature: ``apply_temperature`` is the one scaling every stage
uses (so the gain measured here is the gain predict delivers). The run's ``calibration.json``, what
the evaluate stage kept, is read by ``pipeline.runs.predictions.load_calibration``. Prediction files
hold raw probabilities; ``predictions.read_predictions(..., scaled=True)`` applies what was kept.

For a log-loss metric a second, optional step follows the temperature: p' = (1 - a) p + a prior,
with ``prior`` the training labels' class frequencies and a in [0, SHRINK_MAX]. It floors every
probability at a * prior_k, so a confident mistake on test data unlike the training data costs at
most -log(a prior_k). It is fitted and judged like the temperature: nested over folds (fold k's a
from the other folds' rows, after their T), kept only when that honest gain beats MIN_GAIN.
``Calibration`` is what a run kept (T and a); ``Calibration.apply`` is the one code path that applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from pipeline.core.metrics import logloss

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


def apply_shrink(probs: np.ndarray, a: float, prior) -> np.ndarray:
    """(1 - a) p + a prior: every row pulled toward the class prior by the share ``a``."""
    if not a:
        return probs
    return (1 - a) * probs + a * np.asarray(prior, dtype=np.float64)[None, :]


@dataclass(frozen=True)
class Calibration:
    """What a run's evaluation kept: a temperature (None: none) and a shrink share toward ``prior`` (0: none)."""

    temperature: float | None = None
    shrink: float = 0.0
    prior: tuple[float, ...] | None = None

    def apply(self, probs: np.ndarray) -> np.ndarray:
        return apply_shrink(apply_temperature(probs, self.temperature), self.shrink, self.prior)


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


def confidence_gap(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean top-label confidence minus accuracy: > 0 over-confident, < 0 timid (the sign ECE hides)."""
    return float(probs.max(1).mean() - (probs.argmax(1) == y).mean()) if len(y) else float("nan")


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


# The largest shrink: half-way to the prior already floors each probability at prior / 2.
SHRINK_MAX = 0.5


def class_prior(y: np.ndarray, k: int) -> np.ndarray:
    """Class frequencies of ``y`` over ``k`` classes (a class never seen gets none)."""
    return np.bincount(y, minlength=k) / max(len(y), 1)


def fit_shrink(y: np.ndarray, probs: np.ndarray, prior: np.ndarray, a_max: float = SHRINK_MAX) -> float:
    """The a in [0, a_max] minimising the log-loss of (1 - a) p + a prior on (y, probs)."""
    p_true, q_true = probs[np.arange(len(y)), y], np.asarray(prior)[y]

    def nll(a: float) -> float:
        return float(-np.log(np.clip((1 - a) * p_true + a * q_true, 1e-15, 1.0)).mean())

    res = minimize_scalar(nll, bounds=(0.0, a_max), method="bounded", options={"xatol": 1e-6})
    a = float(res.x)
    return 0.0 if nll(0.0) <= nll(a) else a  # the bounded search never lands exactly on 0


def nested_shrink(
    y: np.ndarray, probs: np.ndarray, fold: np.ndarray, temps: dict[int, float] | None
) -> tuple[np.ndarray, dict[int, float]]:
    """Each fold scaled by its T (``temps``: fitted on the other folds; None: no temperature), then
    shrunk by the a fitted on the other folds' rows (scaled by the same T) toward their class prior."""
    out, shares, k_cls = np.empty_like(probs), {}, probs.shape[1]
    for k in np.unique(fold):
        m = fold == k
        t = temps[int(k)] if temps else None
        prior = class_prior(y[~m], k_cls)
        a = fit_shrink(y[~m], apply_temperature(probs[~m], t), prior) if (~m).any() else 0.0
        shares[int(k)] = a
        out[m] = apply_shrink(apply_temperature(probs[m], t), a, prior)
    return out, shares


def _fit_shrink_summary(y, probs, fold, t_all, temps, base, eps) -> tuple[dict, np.ndarray]:
    """The shrink on top of what the temperature step delivers (``base``), judged nested like T."""
    nested, shares = nested_shrink(y, probs, fold, temps)
    prior = class_prior(y, probs.shape[1])
    base_ll, nested_ll = logloss(y, base, eps), logloss(y, nested, eps)
    out = {
        "a": fit_shrink(y, apply_temperature(probs, t_all), prior),
        "prior": prior.tolist(),
        "kept": bool(nested_ll < base_ll * (1 - MIN_GAIN)),
        "base_logloss": base_ll,
        "nested_logloss": nested_ll,
        "fold_shares": [shares[k] for k in sorted(shares)],
    }
    out["kept"] = out["kept"] and out["a"] > 0
    return out, nested


def calibrate(
    y: np.ndarray, probs: np.ndarray, fold: np.ndarray, eps: float = 1e-15, n_bins: int = 10, shrink: bool = False
) -> tuple[dict, np.ndarray]:
    """Fit T on all OOF rows and, nested over folds, measure what it gains; with ``shrink`` (log-loss
    metrics) the shrink toward the prior after it, the same way.

    Returns (summary, nested-calibrated probabilities: each fold with what is kept, fitted on the
    other folds). ``kept`` is true only when the nested log-loss is lower than the raw one by more
    than ``MIN_GAIN`` (relative): a temperature that merely fits noise in-sample is dropped; the
    shrink's ``kept`` compares with what the temperature step delivers.
    """
    t_all = fit_temperature(y, probs)
    nested, per_fold = nested_temperature(y, probs, fold)
    raw_ll, nested_ll = logloss(y, probs, eps), logloss(y, nested, eps)
    kept = bool(nested_ll < raw_ll * (1 - MIN_GAIN))
    summary = {
        "temperature": t_all,
        "kept": kept,
        "raw_logloss": raw_ll,
        "nested_logloss": nested_ll,
        "in_sample_logloss": logloss(y, apply_temperature(probs, t_all), eps),
        "fold_temperatures": [per_fold[k] for k in sorted(per_fold)],
        "raw_ece": ece(y, probs, n_bins),
        "nested_ece": ece(y, nested, n_bins),
    }
    delivered = nested if kept else probs
    if shrink:
        summary["shrink"], shrunk = _fit_shrink_summary(
            y, probs, fold, t_all if kept else None, per_fold if kept else None, delivered, eps
        )
        if summary["shrink"]["kept"]:
            delivered = shrunk
    summary["calibrated_logloss"] = logloss(y, delivered, eps)
    summary["calibrated_ece"] = ece(y, delivered, n_bins)
    return summary, delivered
