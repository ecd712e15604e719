"""Helpers shared by several test modules: fabricated run folders, ensemble members and pseudo-label
sources, corrupted input files, and their constants. Plain functions and values only; fixtures stay in
conftest.py or in the test modules (a module's fixture may wrap a helper here, e.g. ``make_base_cfg``)."""

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import copy_json, write_yaml
from hypothesis import strategies as st

from pipeline.config.load import load_config
from pipeline.data.folds import load_folds
from pipeline.data.formats import read_table
from pipeline.runs.predictions import pred_frame, write_predictions

# ---- bad statoil_json files (test_formats, test_boundary) -------------------------------------


def _bad_statoil(tmp_path, iceberg_dir, mutate, split="train"):
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    for s in ("train", "test"):
        if s == split:
            copy_json(iceberg_dir / f"{s}.json", d / f"{s}.json", mutate)
        else:
            shutil.copy(iceberg_dir / f"{s}.json", d / f"{s}.json")
    return d


def _set(i, key, value):
    def mutate(recs):
        recs[i][key] = value

    return mutate


# ---- submissions and experiment runs (test_submission, test_own_files) ------------------------

NOW = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
DIGITS = [str(i) for i in range(10)]


def digits_probs(n=100, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(10), n)


def fake_run(name, probs, y, folds, metrics=None):
    run = Path("runs/comp") / name
    run.mkdir(parents=True)
    df = pd.DataFrame({"id": [str(i) for i in range(len(y))], "fold": folds, "target": y})
    for k in range(probs.shape[1]):
        df[f"p_{k}"] = probs[:, k]
    df.to_csv(run / "oof.csv", index=False)
    (run / "config.train.hash").write_text(f"hash{name}\n")
    if metrics:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


# ---- ensemble members (test_ensemble, test_second_stage, test_staging, test_own_files) ---------


def binary(p1):
    """(M, N) probabilities of class 1 -> (M, N, 2)."""
    p1 = np.asarray(p1, float)
    return np.stack([1 - p1, p1], -1)


N_TRAIN, N_TEST = 600, 100
CLASSES = [str(i) for i in range(10)]


def fake_member(name, seed, folds=None, quality=0.5, extra=None, temperature=None):
    """A run dir like predict leaves it: oof.csv, test_pred.csv (raw), predict.json (digits ids and classes);
    ``temperature``: the one its evaluation kept (calibration.json)."""
    rng = np.random.default_rng(seed)
    y = np.arange(N_TRAIN) % 10
    folds = np.arange(N_TRAIN) % 3 if folds is None else folds
    run = Path("runs/comp") / name
    run.mkdir(parents=True, exist_ok=True)

    def probs(n, labels):
        p = rng.dirichlet(np.ones(10), n)
        if labels is not None:
            p = (1 - quality) * p + quality * np.eye(10)[labels]
        return p

    oof = pd.DataFrame({"id": [str(i) for i in range(1, N_TRAIN + 1)], "fold": folds, "target": y})
    oof[[f"p_{c}" for c in CLASSES]] = probs(N_TRAIN, y)
    oof.to_csv(run / "oof.csv", index=False)
    test = pd.DataFrame({"id": [str(i) for i in range(1, N_TEST + 1)]})
    test[[f"p_{c}" for c in CLASSES]] = probs(N_TEST, np.arange(N_TEST) % 10)
    test.to_csv(run / "test_pred.csv", index=False)
    (run / "predict.json").write_text(json.dumps({"oof": "oof.csv", "temperature": temperature, **(extra or {})}))
    if temperature is not None:
        (run / "calibration.json").write_text(json.dumps({"temperature": temperature, "kept": True}))
    return run


def make_base_cfg(make_config, sk_digits_dir):
    """The competition config the ensemble files point at (body of the modules' ``base_cfg`` fixtures)."""
    return make_config(sk_digits_dir, "pixel_csv", name="base", metric="logloss")


def ens_file(base_cfg, members, **kw):
    return write_yaml(Path("blend.yaml"), {"competition": "comp", "config": str(base_cfg), "members": members, **kw})


# ---- pseudo-label sources (test_pseudo, test_ray) ---------------------------------------------

SRC = Path("runs/comp/src")
RUN = Path("runs/comp/exp")
TRAIN = {
    "epochs": 1,
    "batch_size": 32,
    "lr": 3e-3,
    "optimizer": "adam",
    "patience": 0,
    "device": "cpu",
    "max_steps_per_epoch": 1,
}


def _tables(path):
    cfg = load_config(path)
    train, test = read_table(cfg, "train"), read_table(cfg, "test")
    return cfg, train, test, load_folds(cfg, train)


def confident(n: int, rows, labels, conf=0.99, rest=0.6) -> np.ndarray:
    """(n, 2) probabilities: ``conf`` for ``labels`` on ``rows``, ``rest`` for class 0 elsewhere."""
    p = np.tile([rest, 1 - rest], (n, 1))
    for i, c in zip(rows, labels):
        p[i] = [conf, 1 - conf] if c == 0 else [1 - conf, conf]
    return p


def fold_pattern(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold k's own confident rows (i % 3 == k) and labels ((i + k) % 2): each fold's file differs."""
    rows = np.arange(n)[np.arange(n) % 3 == k]
    return rows, (rows + k) % 2


def craft_source(path, fold_probs=None, all_probs=None):
    """A source run folder as train + predict leave it: oof.csv on our folds, test_pred_fold<k>.csv, test_pred.csv."""
    cfg, train, test, fold_of = _tables(path)
    names = train.class_names
    if fold_probs is None:
        fold_probs = {k: confident(len(test), *fold_pattern(len(test), k)) for k in range(3)}
    SRC.mkdir(parents=True, exist_ok=True)
    uniform = np.full((len(train), 2), 0.5)
    write_predictions(SRC / "oof.csv", pred_frame(train.ids, uniform, names, fold=fold_of, target=train.labels), "oof")
    for k, p in fold_probs.items():
        write_predictions(SRC / f"test_pred_fold{k}.csv", pred_frame(test.ids, p, names), "test")
    mean = np.mean(list(fold_probs.values()), 0) if all_probs is None else all_probs
    write_predictions(SRC / "test_pred.csv", pred_frame(test.ids, mean, names), "test")
    return train, test, fold_of


# ---- corrupted files for the property tests (test_readers_property, test_submission_property) ---

CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("delete_line"), st.floats(0, 1)),
    st.tuples(st.just("duplicate_line"), st.floats(0, 1)),
    st.tuples(st.just("swap_columns"), st.tuples(st.integers(0, 5), st.integers(0, 5))),
    st.tuples(st.just("nonfinite"), st.tuples(st.floats(0, 1), st.sampled_from(["nan", "inf", "-inf", "1e999", ""]))),
)


def corrupt(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[: int(len(data) * arg)]
    if kind == "flip":
        b = bytearray(data)
        for where, value in arg:
            if b:
                b[min(int(where * len(b)), len(b) - 1)] = value
        return bytes(b)
    lines = data.split(b"\n")
    i = min(int(arg * len(lines)) if kind != "swap_columns" and kind != "nonfinite" else 0, len(lines) - 1)
    if kind == "delete_line":
        return b"\n".join(lines[:i] + lines[i + 1 :])
    if kind == "duplicate_line":
        return b"\n".join(lines[: i + 1] + lines[i:])
    if kind == "swap_columns":
        a, c = arg
        out = []
        for line in lines:
            cells = line.split(b",")
            if max(a, c) < len(cells):
                cells[a], cells[c] = cells[c], cells[a]
            out.append(b",".join(cells))
        return b"\n".join(out)
    where, token = arg  # a number replaced by a non-finite or empty one
    cells = data.split(b",")
    j = min(int(where * len(cells)), len(cells) - 1)
    cells[j] = token.encode()
    return b",".join(cells)
