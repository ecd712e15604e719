"""One label per image: ``binary`` (two classes, a positive one) and ``multiclass`` (more than two).

Both train a softmax head of one logit per class with cross-entropy and predict class probabilities
(``p_<class>`` columns), calibrated by a temperature and a shrink toward the class prior. They differ
where a competitor expects them to: a binary task scores the positive class (F1 of class 1, the ROC
of P(class 1), an F1-optimal threshold), its reliability diagram plots P(positive), its second stage
reads log-odds and a submission may ask for P(positive); a multiclass task averages over classes
(macro F1, one-vs-rest ROC), plots the top-label confidence and stacks log-probabilities.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from markupsafe import Markup
from sklearn import metrics as skm

from pipeline.config.auto import is_logloss
from pipeline.tasks.base import Task

AUTO_LABEL_SMOOTHING = 0.1


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class Classification(Task):
    """What binary and multiclass share: a softmax over one logit per class."""

    averages: ClassVar[tuple[str, ...]] = ("prob", "logit")
    calibrations: ClassVar[tuple[str, ...]] = ("temperature", "shrink")
    per_fold_curves: ClassVar[bool] = False  # the report draws each fold's ROC and PR curves

    def head_width(self, n_classes: int) -> int:
        return n_classes

    def loss(self, *, weight, label_smoothing: float):
        from torch import nn

        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def row_loss(self, logits, target, *, weight, label_smoothing: float):
        from torch import nn

        return nn.functional.cross_entropy(
            logits, target, weight=weight, label_smoothing=label_smoothing, reduction="none"
        )

    def activate(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def encode(self, probs: np.ndarray, class_names: list[str], how: str) -> np.ndarray:
        if how == "index":
            return probs.argmax(1)
        if how == "name":
            return np.asarray(class_names, dtype=object)[probs.argmax(1)]
        raise ValueError(f"a {self.name} task has no submission value {how!r}; expected index or name")

    # ---- scores -----------------------------------------------------------------------------

    def precision_recall(self, y: np.ndarray, pred: np.ndarray, k: int) -> tuple[float, float]:
        """The headline precision and recall of arg-max predictions."""
        raise NotImplementedError

    def f1(self, y: np.ndarray, probs: np.ndarray) -> float:
        raise NotImplementedError

    def roc_auc(self, y: np.ndarray, probs: np.ndarray) -> float:
        raise NotImplementedError

    def threshold_summary(self, y: np.ndarray, probs: np.ndarray, fold: np.ndarray) -> dict | None:
        """A decision threshold fitted on the OOF (and nested over folds), where the kind has one."""
        return None

    # ---- the report -------------------------------------------------------------------------

    def curves(self, y: np.ndarray, probs: np.ndarray, names: list[str]):
        """The report's ROC and PR curves: ([(label, 0/1 truth, score)] drawn thin or per class, the black
        overall curve as (label, truth, score), the title's note)."""
        raise NotImplementedError

    def scores_note(self, names: list[str]) -> str:
        """The report's sentence on what precision, recall and F1 average over (HTML, names escaped)."""
        raise NotImplementedError

    def reliability(self, y: np.ndarray, probs: np.ndarray, names: list[str]):
        """The reliability diagram: (x of each row, 1 where the event happened, x label, y label, how to read it)."""
        raise NotImplementedError

    # ---- the second stage -------------------------------------------------------------------

    def stack_features(self, p: np.ndarray) -> np.ndarray:
        """Members' predictions (M, N, K) as the columns a second stage fits on: (N, M*K')."""
        raise NotImplementedError

    def stack_names(self, members: list[str], k: int) -> list[str]:
        raise NotImplementedError

    def gbm_params(self, k: int) -> dict:
        raise NotImplementedError

    def gbm_probs(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Binary(Classification):
    name = "binary"
    encodings = ("probability", "index", "name", "per_class")
    per_fold_curves = True

    def auto_label_smoothing(self, metric: str) -> float:
        return 0.0  # with two classes the temperature alone keeps the probabilities off the edges

    def encode(self, probs: np.ndarray, class_names: list[str], how: str) -> np.ndarray:
        return probs[:, 1] if how == "probability" else super().encode(probs, class_names, how)

    def precision_recall(self, y, pred, k):
        p, r, _, _ = skm.precision_recall_fscore_support(y, pred, average="binary", pos_label=1, zero_division=0)
        return float(p), float(r)

    def f1(self, y, probs):
        """F1 of class 1 at arg-max."""
        return float(skm.f1_score(y, probs.argmax(1), zero_division=0))

    def roc_auc(self, y, probs):
        """AUC of P(class 1); NaN when a fold holds one class only."""
        if len(np.unique(y)) < 2:
            return float("nan")
        return float(skm.roc_auc_score(y, probs[:, 1]))

    def threshold_summary(self, y, probs, fold):
        """F1 at 0.5 (argmax) beside F1 at the OOF-optimal threshold, and that gain nested over folds:
        each fold cut at the threshold chosen on the other folds, so the gain is not in-sample."""
        p1 = probs[:, 1]
        t, f1_best = best_f1_threshold(y, p1)
        pred_nested = np.zeros(len(y), dtype=int)
        fold_t = []
        for k in np.unique(fold):
            m = fold == k
            tk, _ = best_f1_threshold(y[~m], p1[~m])
            fold_t.append(tk)
            pred_nested[m] = p1[m] >= tk
        return {
            "f1_at_0.5": float(skm.f1_score(y, probs.argmax(1), zero_division=0)),
            "best_threshold": t,
            "f1_at_best_threshold": f1_best,
            "f1_nested": float(skm.f1_score(y, pred_nested, zero_division=0)),
            "fold_thresholds": fold_t,
        }

    def curves(self, y, probs, names):
        return [], ("OOF", y, probs[:, 1]), f" (positive class: {names[1]})"

    def scores_note(self, names):
        return Markup(
            "Binary: precision, recall and f1 are for the positive class <b>{}</b> at the arg-max (0.5) cut."
        ).format(names[1])

    def reliability(self, y, probs, names):
        return (
            probs[:, 1],
            y,
            f"predicted P({names[1]})",
            "observed frequency",
            f"Below it, {names[1]} is predicted more often than it occurs; above it, less often. ",
        )

    def stack_features(self, p):
        """Members' log-odds, side by side."""
        lp = np.log(np.clip(p, 1e-6, 1))
        return np.concatenate(list(lp[:, :, 1:] - lp[:, :, :1]), axis=1)

    def stack_names(self, members, k):
        return [f"{n}:logodds" for n in members]

    def gbm_params(self, k):
        return {"objective": "binary"}

    def gbm_probs(self, raw):
        return np.stack([1 - raw, raw], 1)


class Multiclass(Classification):
    name = "multiclass"
    encodings = ("index", "name", "per_class")

    def auto_label_smoothing(self, metric: str) -> float:
        # a soft target keeps a multi-class model off saturated probabilities, which log-loss punishes
        return AUTO_LABEL_SMOOTHING if is_logloss(metric) else 0.0

    def precision_recall(self, y, pred, k):
        p, r, _, _ = skm.precision_recall_fscore_support(y, pred, average="macro", labels=np.arange(k), zero_division=0)
        return float(p), float(r)

    def f1(self, y, probs):
        """Macro F1: every class counts the same."""
        k = probs.shape[1]
        return float(skm.f1_score(y, probs.argmax(1), average="macro", labels=np.arange(k), zero_division=0))

    def roc_auc(self, y, probs):
        """One-vs-rest macro AUC; NaN when a class is absent (a fold without it has no AUC)."""
        k = probs.shape[1]
        if len(np.unique(y)) < k:
            return float("nan")
        # scikit-learn insists rows sum to 1 to machine precision; oof.csv is written with 8 digits
        return float(skm.roc_auc_score(y, probs / probs.sum(1, keepdims=True), multi_class="ovr", labels=np.arange(k)))

    def scores_note(self, names):
        return Markup(
            "Multiclass: precision, recall and f1 are macro averages; <code>*_weighted</code> weigh classes by support."
        )

    def curves(self, y, probs, names):
        k = len(names)
        per_class = [(names[c], (y == c).astype(int), probs[:, c]) for c in range(k)]
        onehot = np.eye(k)[y]  # micro average: every (row, class) pair is one binary decision
        return per_class, ("micro-average", onehot.ravel(), probs.ravel()), " (one class vs the rest)"

    def reliability(self, y, probs, names):
        return (
            probs.max(1),
            (probs.argmax(1) == y).astype(int),
            "confidence of the predicted class",
            "accuracy",
            "Below it the model is over-confident, above it under-confident. ",
        )

    def stack_features(self, p):
        """Members' log-probabilities, side by side."""
        return np.concatenate(list(np.log(np.clip(p, 1e-6, 1))), axis=1)

    def stack_names(self, members, k):
        return [f"{n}:logp_{c}" for n in members for c in range(k)]

    def gbm_params(self, k):
        return {"objective": "multiclass", "num_class": k}

    def gbm_probs(self, raw):
        return raw


def best_f1_threshold(y: np.ndarray, p1: np.ndarray) -> tuple[float, float]:
    """(t, F1) for the cut ``p1 >= t`` with the highest F1."""
    prec, rec, thr = skm.precision_recall_curve(y, p1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * prec * rec / (prec + rec))[:-1]  # the last point has no threshold
    if len(thr) == 0:
        return 0.5, 0.0
    i = int(np.argmax(f1))
    return float(thr[i]), float(f1[i])


# the entries of TASKS (pipeline/config/registries.py)
BINARY = Binary()
MULTICLASS = Multiclass()
