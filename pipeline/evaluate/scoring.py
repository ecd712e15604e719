"""The figures of one set of OOF predictions: every registered metric and scikit-learn's others, per fold
with their mean and spread, the nested calibration's figures, and how a figure is printed."""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

from pipeline.config.schema import Config
from pipeline.core.metrics import METRICS, cv_std, logloss
from pipeline.tasks import build_task
from pipeline.tasks.calibration import calibrate, confidence_gap, ece

# Figures evaluate reports beside the registered metrics (``metrics.METRICS``), True when larger is
# better; per-fold scalars (cv_mean/cv_std, the terminal table) are both.
EXTRA_SCALARS = {"precision": True, "recall": True, "f1_macro": True, "f1_weighted": True, "ece": False}


def scalars() -> list[str]:
    """Per-fold scalars, read live: a metric registered after import is among them."""
    return list(METRICS) + [k for k in EXTRA_SCALARS if k not in METRICS]


def greater_is_better(name: str) -> bool:
    return METRICS.get(name).greater_is_better if name in METRICS else EXTRA_SCALARS.get(name, True)


# ---- metrics ---------------------------------------------------------------------------


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, eps: float = 1e-15, n_bins: int = 10, class_names: list[str] | None = None
) -> dict:
    """Every figure of one set of predictions: each registered metric, and scikit-learn's others."""
    k = probs.shape[1]
    labels = np.arange(k)
    pred = probs.argmax(1)
    m: dict = {"n": int(len(y)), **{name: metric(y, probs, eps) for name, metric in METRICS.items()}}
    p, r = build_task(k).precision_recall(y, pred, k)  # binary: of the positive class; multiclass: macro
    m.update(precision=p, recall=r)
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average=avg, labels=labels, zero_division=0)
        m.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    m["ece"] = ece(y, probs, n_bins)
    m["confidence_gap"] = confidence_gap(y, probs)
    m["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels).tolist()
    m["confusion_matrix_normalized"] = skm.confusion_matrix(y, pred, labels=labels, normalize="true").tolist()
    names = class_names or [str(c) for c in labels]
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    m["per_class"] = {
        names[c]: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]), "support": int(s[c])}
        for c in labels
    }
    return m


def fold_metrics(y, probs, fold, eps, n_bins, class_names) -> tuple[list[dict], dict, dict]:
    """Per-fold figures and their mean / standard deviation (``metrics.cv_std``) across folds."""
    folds = []
    for k in np.unique(fold):
        m = fold == k
        folds.append({"fold": int(k), **classification_metrics(y[m], probs[m], eps, n_bins, class_names)})
    mean, std = {}, {}
    for key in scalars():
        v = np.array([f[key] for f in folds], dtype=float)
        ok = v[~np.isnan(v)]
        mean[key] = float(ok.mean()) if len(ok) else float("nan")
        std[key] = cv_std(ok) if len(ok) else float("nan")
    return folds, mean, std


def _calibration(cfg: Config, y, probs, fold) -> tuple[dict, dict, np.ndarray | None]:
    """(calibration.json, metrics["calibrated"], nested-calibrated probabilities or None)."""
    from pipeline.config.auto import is_logloss

    ev, task = cfg.evaluate, build_task(probs.shape[1])
    if not ev.calibrate or "temperature" not in task.calibrations:
        return (
            {"temperature": 1.0, "kept": False, "skipped": True},
            {"skipped": True, "temperature": 1.0, "kept": False},
            None,
        )
    # the shrink toward the prior guards a log-loss against confident mistakes; other metrics do not score it
    summary, cal_probs = calibrate(
        y, probs, fold, ev.eps, ev.n_bins, shrink=is_logloss(cfg.metric) and "shrink" in task.calibrations
    )
    calib = {
        k: summary[k]
        for k in ("temperature", "kept", "nested_logloss", "raw_logloss", "in_sample_logloss", "fold_temperatures")
    }
    if "shrink" in summary:
        calib["shrink"] = summary["shrink"]
    per_fold = []
    for k in np.unique(fold):
        m = fold == k
        per_fold.append(
            {
                "fold": int(k),
                "n": int(m.sum()),
                "logloss": logloss(y[m], cal_probs[m], ev.eps),
                "ece": ece(y[m], cal_probs[m], ev.n_bins),
                "raw_ece": ece(y[m], probs[m], ev.n_bins),
                "confidence_gap": confidence_gap(y[m], cal_probs[m]),
                "raw_confidence_gap": confidence_gap(y[m], probs[m]),
            }
        )
    # honest calibrated figures: every fold calibrated by what was fitted on the other folds
    metrics = {**summary, "logloss": summary["calibrated_logloss"], "ece": summary["calibrated_ece"], "folds": per_fold}
    return calib, metrics, cal_probs


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"
