"""The report's pictures of the images themselves: the most confidently wrong OOF samples, Grad-CAM heat maps
of correct and wrong ones, and the adversarial section (p(test) histogram, most test-like training rows,
train/test duplicate pairs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.data.table import Table
from pipeline.evaluate.plots import Figures
from pipeline.models.gradcam import NoFeatureMap, gradcam
from pipeline.runs.layout import RunDir

GALLERY_SIZE = 12  # most confidently wrong samples shown


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
            f"id {_short(oof['id'].iloc[i])}\ntrue {names[y[i]]}, pred {names[pred[i]]}"
            f"\np(pred) {probs[i, pred[i]]:.3f}",
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
                f"Grad-CAM skipped: {d}/best.json describes classes {meta['class_names']} "
                f"with {meta['in_chans']} channels; the data has {names} with {table.channels}"
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
