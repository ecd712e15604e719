"""The evaluation report: PNG plots of the OOF predictions and one ``report.html`` beside them.

Everything is drawn with ``matplotlib.figure.Figure`` (no pyplot, no display); the page is
``templates/report.html.j2`` (jinja2, autoescaped) and refers to the PNGs by relative path, so
``report/`` opens offline and can be zipped or copied whole.
The folder is built under a temporary name and swapped in at the end: a crash leaves the old
report intact and a rerun leaves no stale pictures.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.data.table import Table
from pipeline.models.gradcam import NoFeatureMap, gradcam
from pipeline.runs.layout import RunDir
from pipeline.runs.predictions import probs_of
from pipeline.tasks import build_task

log = logging.getLogger(__name__)

GALLERY_SIZE = 12  # most confidently wrong samples shown
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


def write_report(
    cfg: Config, table: Table, oof: pd.DataFrame, metrics: dict, calibrated: np.ndarray | None, shift=None
) -> Path:
    """Draw every picture and write ``report/report.html``; returns its path.

    ``oof`` is the checked OOF (oof.csv or oof_tta.csv) in the training table's row order; ``calibrated``
    the probabilities with the kept calibration, nested over folds (None when calibration is off);
    ``shift`` evaluate's adversarial analysis (``adversarial.EvaluateShift``) or None.
    """
    run = cfg.run_dir
    final = RunDir(path=run).report_dir
    tmp = Path(tempfile.mkdtemp(prefix=".report.", dir=run))
    try:
        figs = Figures(tmp)
        names = list(table.class_names)
        y = oof["target"].to_numpy()
        fold = oof["fold"].to_numpy()
        probs = probs_of(oof, names)
        plot_confusion(figs, metrics, names)
        plot_roc_pr(figs, y, probs, fold, names)
        plot_reliability(figs, y, probs, calibrated, cfg.evaluate.n_bins, metrics)
        plot_training_curves(figs, run, cfg.metric)
        plot_confident_errors(figs, table, oof, probs, names)
        if cfg.evaluate.gradcam_samples:
            plot_gradcam(figs, cfg, table, oof, probs, names)
        adv = plot_adversarial(tmp, table, shift) if shift is not None and shift.record is not None else None
        (tmp / "report.html").write_text(render_html(cfg, metrics, figs, adv))
        for note in figs.notes:
            log.info(f"note: {note}")
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be shared
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / "report.html"


# ---- pictures --------------------------------------------------------------------------


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


def display_image(img: np.ndarray, value_range: tuple[float, float]) -> tuple[np.ndarray, str | None]:
    """(C, H, W) raw-scale image -> (H, W) or (H, W, 3) in [0, 1], and the colour map.

    SAR (2 bands, dB) shows band_1 in grey stretched between its 2nd and 98th percentiles
    (dB images are dark and low-contrast on a fixed scale); grey and RGB photos use the data's range.
    """
    img = np.asarray(img, dtype=np.float32)
    c = img.shape[0]
    if c == 2 or img.dtype.kind == "f" and (value_range[0] < 0):
        lo, hi = np.percentile(img[0], [2, 98])
        return np.clip((img[0] - lo) / max(hi - lo, 1e-6), 0, 1), "gray"
    lo, hi = value_range
    x = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    if c >= 3:
        return np.transpose(x[:3], (1, 2, 0)), None
    return x[0], "gray"


def _short(text: str, n: int = 18) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def plot_confident_errors(figs: Figures, table: Table, oof: pd.DataFrame, probs: np.ndarray, names: list[str]) -> None:
    y = oof["target"].to_numpy()
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    if len(wrong) == 0:
        figs.note("No misclassified OOF samples: no gallery of confident mistakes.")
        return
    order = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:GALLERY_SIZE]
    n = len(order)
    cols = min(n, 6)
    rows = -(-n // cols)
    fig = Figure(layout="constrained", figsize=(2.3 * cols, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, i in zip(axes, order):
        img, cmap = display_image(table.images[i], table.value_range)
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(
            f"id {_short(oof['id'].iloc[i])}\ntrue {names[y[i]]}, pred {names[pred[i]]}\np(pred) {probs[i, pred[i]]:.3f}",
            fontsize=8,
        )
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"Most confidently wrong OOF predictions ({n} of {len(wrong)} errors)")
    figs.save(
        fig,
        "confident_errors.png",
        "Most confidently wrong samples",
        "The misclassified out-of-fold samples the model was surest about, surest first: label noise, "
        "look-alike classes or a shortcut the model learned show up here.",
    )


def pick_gradcam_samples(y: np.ndarray, probs: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Row indices to explain: the surest correct predictions, taking the classes in turn (so every
    class shows up), and the surest wrong ones."""
    pred = probs.argmax(1)
    conf = probs[np.arange(len(y)), pred]
    right = np.flatnonzero(pred == y)
    per_class = [
        list(right[y[right] == c][np.argsort(-conf[right[y[right] == c]], kind="stable")])
        for c in range(probs.shape[1])
    ]
    correct = []
    while len(correct) < n and any(per_class):
        for lst in per_class:
            if lst and len(correct) < n:
                correct.append(lst.pop(0))
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:n]
    return {"correct": np.array(correct, dtype=int), "wrong": wrong}


def _heat(cam: np.ndarray) -> np.ndarray:
    """RGBA jet colours whose opacity grows with the map, so the image stays visible where the model did not look."""
    from matplotlib import colormaps

    rgba = colormaps["jet"](cam)
    rgba[..., 3] = 0.1 + 0.6 * cam
    return rgba


def plot_gradcam(
    figs: Figures, cfg: Config, table: Table, oof: pd.DataFrame, probs: np.ndarray, names: list[str]
) -> None:
    """Grad-CAM of the predicted class over a few correct and wrong samples, each explained by the
    fold model that did not train on it (the one whose prediction is in oof.csv)."""
    import torch

    from pipeline.models.backbones import load_checkpoint
    from pipeline.models.inference import features_tensor

    y = oof["target"].to_numpy()
    fold = oof["fold"].to_numpy()
    pred = probs.argmax(1)
    picks = {k: v for k, v in pick_gradcam_samples(y, probs, cfg.evaluate.gradcam_samples).items() if len(v)}
    rows = np.concatenate(list(picks.values())) if picks else np.array([], dtype=int)
    if len(rows) == 0:
        figs.note("No samples to explain with Grad-CAM.")
        return
    run = RunDir.of(cfg)
    cams, layer = {}, None
    for k in np.unique(fold[rows]):
        idx = np.sort(rows[fold[rows] == k])
        d = run.job_dir(int(k), run.seeds[0]).path
        try:
            model, meta = load_checkpoint(d / "best.safetensors")
        except PipelineError as e:
            figs.note(f"Grad-CAM skipped: {e}")
            return
        if list(meta["class_names"]) != names or meta["in_chans"] != table.channels:
            figs.note(
                f"Grad-CAM skipped: {d}/best.json describes classes {meta['class_names']} with {meta['in_chans']} channels; "
                f"the data has {names} with {table.channels}"
            )
            return
        x = torch.from_numpy(np.ascontiguousarray(table.images[idx], dtype=np.float32))
        try:
            maps, _, layer = gradcam(model, x, features_tensor(table.features, idx, torch.device("cpu")), pred[idx])
        except NoFeatureMap as e:
            figs.note(f"Grad-CAM skipped: {cfg.model.backbone}: {e}.")
            return
        cams.update(zip(idx.tolist(), maps))
    n = max(len(v) for v in picks.values())
    fig = Figure(layout="constrained", figsize=(2.3 * n, 2.5 * 2 * len(picks)))
    axes = fig.subplots(2 * len(picks), n, squeeze=False)
    for r, (kind, idx) in enumerate(picks.items()):
        for j in range(n):
            a_img, a_cam = axes[2 * r, j], axes[2 * r + 1, j]
            for a in (a_img, a_cam):
                a.set_xticks([]), a.set_yticks([])
            if j >= len(idx):
                a_img.set_visible(False), a_cam.set_visible(False)
                continue
            i = idx[j]
            img, cmap = display_image(table.images[i], table.value_range)
            a_img.imshow(img, cmap=cmap, vmin=0, vmax=1)
            truth = f"true {names[y[i]]}" + ("" if kind == "correct" else f", pred {names[pred[i]]}")
            a_img.set_title(
                f"{kind}: id {_short(oof['id'].iloc[i])}\n{truth} ({probs[i, pred[i]]:.2f})",
                fontsize=8,
                color="tab:green" if kind == "correct" else "tab:red",
            )
            a_cam.imshow(img, cmap=cmap, vmin=0, vmax=1)
            a_cam.imshow(_heat(cams[i]))
            a_cam.set_title(f"why {names[pred[i]]} (fold {fold[i]} model)", fontsize=8)
    fig.suptitle(f"Grad-CAM on {layer} of {cfg.model.backbone}")
    figs.save(
        fig,
        "gradcam.png",
        "Grad-CAM",
        "Each sample above its heat map: red areas raised the score of the predicted class most. "
        "Each sample is explained by the fold model that did not see it in training. A model that looks at "
        "the background rather than the object has learned a shortcut.",
    )


# ---- adversarial validation ----------------------------------------------------------------


def plot_adversarial(out: Path, train: Table, shift) -> dict:
    """The adversarial section's pictures (p(test) histogram; thumbnails of the most test-like train
    rows and of the duplicate pairs) and its tables, for the template."""
    rec = shift.record
    pictures = [
        ("adversarial_hist.png", "p(test) of the training rows", _adversarial_hist(out / "adversarial_hist.png", rec))
    ]
    rows = pd.Index(train.ids.astype(str)).get_indexer([t["id"] for t in rec["top_test_like"]])
    tiles = [
        (train.images[i], f"{_short(t['id'])}\np(test) {t['p_test']:.2f}")
        for i, t in zip(rows[:GALLERY_SIZE], rec["top_test_like"])
    ]
    if tiles:
        _thumbnails(out / "adversarial_top.png", tiles, train.value_range, "Most test-like training rows")
        pictures.append(("adversarial_top.png", "Most test-like training rows", "Highest out-of-fold p(test) first."))
    pairs = rec["duplicates"]["exact"] + rec["duplicates"]["near"]
    if pairs:
        tr = pd.Index(train.ids.astype(str)).get_indexer([p["train_id"] for p in pairs])
        te = pd.Index(shift.test.ids.astype(str)).get_indexer([p["test_id"] for p in pairs])
        tiles = []
        for i, j, p in list(zip(tr, te, pairs))[: GALLERY_SIZE // 2]:
            tiles += [
                (train.images[i], f"train {_short(p['train_id'])}\n{p['train_label']}"),
                (shift.test.images[j], f"test {_short(p['test_id'])}\ncos {p['similarity']:.4f}"),
            ]
        _thumbnails(out / "adversarial_pairs.png", tiles, train.value_range, "Train/test duplicate pairs")
        pictures.append(
            (
                "adversarial_pairs.png",
                "Train/test duplicate pairs",
                "Each training image beside the test image it duplicates (exact pairs first).",
            )
        )
    dup = [
        [p["train_id"], p["test_id"], p["train_label"] or "", f"{p['similarity']:.4f}", kind]
        for kind in ("exact", "near")
        for p in rec["duplicates"][kind]
    ]
    top = [[t["id"], f"{t['p_test']:.4f}", t["label"] or ""] for t in rec["top_test_like"]]
    return {"record": rec, "pictures": pictures, "top_rows": top, "dup_rows": dup}


def _adversarial_hist(path: Path, rec: dict) -> str:
    h = rec["p_test_train"]["histogram"]
    edges = np.asarray(h["edges"])
    fig = Figure(layout="constrained", figsize=(7, 3.4))
    ax = fig.add_subplot()
    width = np.diff(edges)
    ax.bar(edges[:-1], h["train"], width=width, align="edge", alpha=0.7, label="train rows")
    ax.bar(edges[:-1], h["test"], width=width, align="edge", alpha=0.5, label="test rows")
    ax.axvline(0.5, ls=":", color="grey")
    ax.set(xlabel="out-of-fold p(test)", ylabel="rows", xlim=(0, 1), title=f"Train vs test ROC AUC {rec['auc']:.3f}")
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110)
    return (
        "Without a shift both histograms sit around the same value; training rows far to the right look like "
        "test and are the ones whose validation predicts the leaderboard best."
    )


def _thumbnails(path: Path, tiles: list, value_range, title: str) -> None:
    cols = min(len(tiles), 6)
    rows = -(-len(tiles) // cols)
    fig = Figure(layout="constrained", figsize=(2.0 * cols, 2.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (img, label) in zip(axes, tiles):
        im, cmap = display_image(img, value_range)
        ax.imshow(im, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes[len(tiles) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=110)


# ---- HTML ------------------------------------------------------------------------------

_SCORE_COLUMNS = ("logloss", "accuracy", "precision", "recall", "f1", "f1_macro", "f1_weighted", "roc_auc", "ece")


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


@functools.cache
def _template():
    """report.html.j2, shipped in the package. Autoescape is on for it (select_autoescape's default list
    has no ``.j2``, hence the explicit one), so a class name or id can never inject markup."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("pipeline.evaluate", "templates"),
        undefined=StrictUndefined,
        autoescape=select_autoescape(["html", "html.j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2")


def render_html(cfg: Config, m: dict, figs: Figures, adv: dict | None = None) -> str:
    """The report page from metrics.json's contents and the pictures drawn; the markup is the template's."""
    metric = m["metric"]
    cols = [metric] + [c for c in _SCORE_COLUMNS if c != metric]
    rows = [[f"fold {f['fold']}", str(f["n"])] + [_f(f[c]) for c in cols] for f in m["folds"]]
    rows.append(["mean over folds", ""] + [_f(m["cv_mean"][c]) for c in cols])
    rows.append(["std over folds", ""] + [_f(m["cv_std"][c]) for c in cols])
    rows.append(["all OOF rows", str(m["n"])] + [_f(m[c]) for c in cols])
    per_class = [
        [c, _f(v["precision"]), _f(v["recall"]), _f(v["f1"]), str(v["support"])]
        for c, v in (m.get("per_class") or {}).items()
    ]
    cal = m.get("calibrated") or {}
    cal_rows = [
        [
            f"fold {f['fold']}",
            str(f["n"]),
            _f(f["raw_confidence_gap"]),
            _f(f["raw_ece"]),
            _f(f["confidence_gap"]),
            _f(f["ece"]),
            _f(f["logloss"]),
        ]
        for f in cal.get("folds", [])
    ]
    return (
        _template().render(
            cal_header=[
                "",
                "rows",
                "confidence - accuracy",
                "ECE",
                "calibrated: confidence - accuracy",
                "calibrated: ECE",
                "calibrated: log-loss",
            ],
            cal_rows=cal_rows,
            competition=cfg.competition,
            name=cfg.name,
            config_path=str(cfg.path),
            run_dir=str(cfg.run_dir),
            m=m,
            metric=metric,
            classes=list(m["classes"]),
            f=_f,
            scores_note=build_task(len(m["classes"])).scores_note(list(m["classes"])),
            score_header=["", "rows"] + cols,
            score_rows=rows,
            per_class_rows=per_class,
            cal=m.get("calibrated") or {},
            threshold=m.get("threshold"),
            notes=figs.notes,
            figures=figs.items,
            adv=adv,
            adv_metrics=m.get("adversarial") or {},
        )
        + "\n"
    )
