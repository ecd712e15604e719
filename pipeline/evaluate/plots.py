"""The report's charts of the OOF scores: ``Figures`` (the pictures collected, with title and caption), the
confusion matrix, ROC and precision-recall curves, the reliability diagram and the training curves.

Everything is drawn with ``matplotlib.figure.Figure`` (no pyplot, no display).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from pipeline.runs.layout import RunDir
from pipeline.tasks import build_task

MAX_LEGEND_CLASSES = 10


class Figures:
    """Collects the report's pictures: file name, title and a caption saying how to read it."""

    def __init__(self, out: Path):
        self.out, self.items, self.notes = out, [], []

    def save(self, fig: Figure, name: str, title: str, caption: str) -> None:
        fig.savefig(self.out / name, format="png", dpi=110)
        self.items.append((name, title, caption))

    def note(self, text: str) -> None:
        self.notes.append(text)


def plot_confusion(figs: Figures, metrics: dict, names: list[str]) -> None:
    cm = np.array(metrics["confusion_matrix"])
    norm = np.array(metrics["confusion_matrix_normalized"])
    k = len(names)
    side = min(max(3.6, 0.55 * k + 2), 16)
    fig = Figure(layout="constrained", figsize=(side + 1, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 60:  # beyond that, class names cannot be read at any size
        long = max(map(len, names)) > 3
        fs = 10 if k <= 20 else 6
        ax.set_xticks(range(k), names, rotation=45 if long else 0, ha="right" if long else "center", fontsize=fs)
        ax.set_yticks(range(k), names, fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 20:  # beyond that the numbers would overlap
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{cm[i, j]}\n{norm[i, j]:.0%}" if k <= 6 else f"{cm[i, j]}",
                    ha="center",
                    va="center",
                    fontsize=9 if k <= 10 else 7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_title(f"Confusion matrix (OOF, {int(cm.sum())} rows)")
    figs.save(
        fig,
        "confusion_matrix.png",
        "Confusion matrix",
        "Rows are the true class, columns the predicted (arg-max) class. Colour is the row share "
        "(recall on the diagonal); numbers are counts" + (" and row shares." if k <= 6 else "."),
    )


def plot_roc_pr(figs: Figures, y: np.ndarray, probs: np.ndarray, fold: np.ndarray, names: list[str]) -> None:
    fig = Figure(layout="constrained", figsize=(11, 4.8))
    ax_roc, ax_pr = fig.subplots(1, 2)
    task = build_task(len(names))
    thin, (label, truth, scores), pos = task.curves(y, probs, names)  # what the curves are is the task's
    if task.per_fold_curves:
        for f in np.unique(fold):  # thin per-fold curves show the spread behind the CV score
            m = fold == f
            if len(np.unique(truth[m])) == 2:
                fpr, tpr, _ = skm.roc_curve(truth[m], scores[m])
                ax_roc.plot(fpr, tpr, lw=0.8, alpha=0.45, label=f"fold {f}")
                pr, rc, _ = skm.precision_recall_curve(truth[m], scores[m])
                ax_pr.plot(rc, pr, lw=0.8, alpha=0.45, label=f"fold {f}")
    legend = len(thin) <= MAX_LEGEND_CLASSES
    for name, t, sc in thin:
        if 0 < t.sum() < len(t):
            fpr, tpr, _ = skm.roc_curve(t, sc)
            pr, rc, _ = skm.precision_recall_curve(t, sc)
            kw = (
                dict(lw=1.1, label=f"{name} (AUC {skm.auc(fpr, tpr):.3f})")
                if legend
                else dict(lw=0.6, color="grey", alpha=0.5)
            )
            ax_roc.plot(fpr, tpr, **kw)
            ax_pr.plot(
                rc, pr, **({**kw, "label": f"{name} (AP {skm.average_precision_score(t, sc):.3f})"} if legend else kw)
            )
    if len(np.unique(truth)) == 2:
        fpr, tpr, _ = skm.roc_curve(truth, scores)
        ax_roc.plot(fpr, tpr, lw=2.2, color="black", label=f"{label} (AUC {skm.auc(fpr, tpr):.4f})")
        pr, rc, _ = skm.precision_recall_curve(truth, scores)
        ax_pr.plot(
            rc, pr, lw=2.2, color="black", label=f"{label} (AP {skm.average_precision_score(truth, scores):.4f})"
        )
    if task.per_fold_curves:
        ax_pr.axhline(truth.mean(), ls=":", color="grey", label=f"chance ({truth.mean():.2f})")
    ax_roc.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax_roc.set(
        xlabel="false positive rate", ylabel="true positive rate", title="ROC" + pos, xlim=(0, 1), ylim=(0, 1.01)
    )
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision-recall" + pos, xlim=(0, 1), ylim=(0, 1.01))
    for ax in (ax_roc, ax_pr):
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
        ax.grid(alpha=0.3)
    figs.save(
        fig,
        "roc_pr.png",
        "ROC and precision-recall curves",
        "Out-of-fold predictions of every fold"
        + (
            " (thin: each fold; black: all OOF rows)."
            if task.per_fold_curves
            else "; one curve per class against the rest, black the micro-average."
        ),
    )


def plot_reliability(
    figs: Figures, y: np.ndarray, probs: np.ndarray, calibrated: np.ndarray | None, n_bins: int, metrics: dict
) -> None:
    fig = Figure(layout="constrained", figsize=(6, 6.4))
    ax, hx = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    task = build_task(probs.shape[1])  # binary: P(positive class); multiclass: the top label's confidence

    def curve(p):
        x, hit, *_ = task.reliability(y, p, metrics["classes"])
        return calibration_curve(hit, x, n_bins=n_bins, strategy="uniform")

    xs, _, what, ylabel, reading = task.reliability(y, probs, metrics["classes"])
    frac, mean = curve(probs)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    ax.plot(mean, frac, "o-", label=f"OOF (ECE {metrics['ece']:.4f})")
    c = metrics.get("calibrated") or {}
    if calibrated is not None and not c.get("skipped"):
        frac_c, mean_c = curve(calibrated)
        kept = (f"T {c['temperature']:.2f}" if c.get("kept") else "no T") + (
            f", shrink {c['shrink']['a']:.3f}" if (c.get("shrink") or {}).get("kept") else ""
        )
        ax.plot(mean_c, frac_c, "s--", label=f"calibrated as kept, nested ({kept}, ECE {c['ece']:.4f})")
    ax.set(ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=f"Reliability diagram ({n_bins} bins)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    hx.hist(xs, bins=n_bins, range=(0, 1), color="tab:blue", alpha=0.7)
    hx.set(xlabel=what, ylabel="rows")
    figs.save(
        fig,
        "reliability.png",
        "Reliability diagram",
        "Points on the diagonal are calibrated. "
        + reading
        + "The histogram shows how many predictions fall in each bin.",
    )


def plot_training_curves(figs: Figures, run: Path, metric: str) -> None:
    items = RunDir(path=run).histories()
    if not items:
        figs.note("No fold_*/history.csv found: no training curves.")
        return
    n = len(items)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(layout="constrained", figsize=(4.6 * cols, 3.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    mcol = f"val_{metric}"
    for ax, (label, path) in zip(axes, items):
        h = pd.read_csv(path)
        if h.empty or "epoch" not in h:
            ax.set_title(f"{label}: empty history")
            continue
        ax.plot(h["epoch"], h["train_loss"], "o-", ms=3, label="train loss")
        if h["val_loss"].notna().any():
            ax.plot(h["epoch"], h["val_loss"], "o-", ms=3, label="val log-loss")
            best = h.loc[h["val_loss"].idxmin()]
            ax.axvline(best["epoch"], ls=":", color="grey")
            ax.set_title(f"{label}: best epoch {int(best['epoch'])} (val log-loss {best['val_loss']:.4f})", fontsize=9)
        ax.set(xlabel="epoch", ylabel="loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        lines, labels = ax.get_legend_handles_labels()
        if metric != "logloss" and mcol in h and h[mcol].notna().any():
            ax2 = ax.twinx()
            ax2.plot(h["epoch"], h[mcol], "s--", ms=3, color="tab:green", label=f"val {metric}")
            ax2.set_ylabel(f"val {metric}", color="tab:green")
            l2, lab2 = ax2.get_legend_handles_labels()
            lines, labels = lines + l2, labels + lab2
        ax.legend(lines, labels, fontsize=7, loc="best")
    for ax in axes[n:]:
        ax.set_visible(False)
    figs.save(
        fig,
        "training_curves.png",
        "Training curves",
        "Per fold: training loss and validation log-loss per epoch"
        + ("" if metric == "logloss" else f", validation {metric} on the right axis")
        + "; the dotted line marks the best epoch (the one kept).",
    )
