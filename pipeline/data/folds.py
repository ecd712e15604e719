"""Folds stage: ``folds/<competition>.csv`` with ``id,fold`` (plus ``fold_r`` per extra repeat)."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.config.load import write_snapshot
from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_csv
from pipeline.data.table import Table

log = logging.getLogger(__name__)


def fold_column(repeat: int) -> str:
    return "fold" if repeat == 0 else f"fold_{repeat}"


def check_learnable(cfg: Config, table: Table) -> np.ndarray:
    """Refuse training data with fewer than two classes (nothing to learn); returns the class counts.
    ``pipeline fold`` and ``pipeline train`` both ask, before they write or delete anything."""
    counts = np.bincount(table.labels, minlength=table.num_classes)
    present = np.flatnonzero(counts)
    if len(present) < 2:
        only = f"class {table.class_names[int(present[0])]!r}" if len(present) else "no labelled row"
        raise PipelineError(
            f"{cfg.data_dir}: the training data has only {only} ({len(table)} rows); "
            f"expected at least two classes to learn from"
        )
    return counts


def make_folds(cfg: Config, table: Table) -> pd.DataFrame:
    """Stratified (optionally grouped, repeated) K-fold assignment, seeded."""
    fc = cfg.folds
    counts = check_learnable(cfg, table)
    smallest = int(counts[counts > 0].min())
    if smallest < fc.n_splits:
        cls = table.class_names[int(np.flatnonzero(counts == smallest)[0])]
        raise PipelineError(
            f"{cfg.path}: folds.n_splits is {fc.n_splits} but class {cls!r} has only {smallest} rows; "
            "expected n_splits <= the smallest class count"
        )
    groups = _groups(cfg, table) if fc.group else None
    if groups is not None and len(np.unique(groups)) < fc.n_splits:
        raise PipelineError(
            f"{cfg.path}: folds.group {fc.group!r} has {len(np.unique(groups))} distinct values for "
            f"{fc.n_splits} folds; expected more groups than folds.n_splits"
        )
    strata = adversarial_strata(cfg, table) if fc.adversarial else table.labels
    # scikit-learn numbers strata by first appearance and deals them round-robin in that order: rows
    # sorted by the (bin-major) stratum make each p(test) bin's share per fold exact
    order = np.argsort(strata, kind="stable") if fc.adversarial else np.arange(len(table))
    out = pd.DataFrame({"id": table.ids})
    for r in range(fc.repeats):
        seed = fc.seed + r
        if groups is None:
            split = StratifiedKFold(fc.n_splits, shuffle=True, random_state=seed).split(order, strata[order])
        else:
            split = StratifiedGroupKFold(fc.n_splits, shuffle=True, random_state=seed).split(
                order, strata[order], groups[order]
            )
        fold = np.full(len(table), -1, np.int64)
        for k, (_, val) in enumerate(split):
            fold[order[val]] = k
        empty = [k for k in range(fc.n_splits) if not (fold == k).any()]
        if empty:
            raise PipelineError(
                f"{cfg.path}: folds.group {fc.group!r} leaves fold {empty[0]} empty; "
                "expected more groups than folds.n_splits"
            )
        out[fold_column(r)] = fold
    return out


def adversarial_strata(cfg: Config, table: Table) -> np.ndarray:
    """``folds.adversarial``: label x quantile bin (within the class) of the adversarial p(test)
    (pipeline/data/shift.py, no trained model needed), so every fold's validation part holds its share of
    the most test-like rows while every row is still validated exactly once. Deterministic: the
    embedding, the classifier's CV and the rank bins are all seeded or order-stable."""
    from pipeline.data.formats import read_table
    from pipeline.data.shift import quantile_bins, shift_scores

    test = read_table(cfg, "test")
    _, p, auc = shift_scores(table, test, cfg.adversarial)
    strata = quantile_bins(p[: len(table)], table.labels, cfg.folds.adversarial_bins, cfg.folds.n_splits)
    log.info(
        f"folds.adversarial: train vs test ROC AUC {auc:.3f}; stratified by label x {len(np.unique(strata))} "
        f"strata of p(test) (up to {cfg.folds.adversarial_bins} bins per class)"
    )
    return strata


def _groups(cfg: Config, table: Table) -> np.ndarray:
    meta = table.meta if table.meta is not None else pd.DataFrame(index=range(len(table)))
    if cfg.folds.group not in meta.columns:
        avail = ", ".join(map(str, meta.columns)) or "none"
        raise PipelineError(
            f"{cfg.path}: folds.group: column {cfg.folds.group!r} is not in the {cfg.data.format} data; "
            f"available: {avail}"
        )
    col = meta[cfg.folds.group]
    codes = pd.factorize(col, use_na_sentinel=True)[0].astype(np.int64)
    # Rows with a missing group value each form their own group.
    miss = codes < 0
    codes[miss] = codes.max(initial=-1) + 1 + np.arange(miss.sum())
    return codes


def balance_table(folds: pd.DataFrame, table: Table, column: str = "fold") -> pd.DataFrame:
    """Rows per fold and class share, for printing."""
    df = pd.DataFrame({"fold": folds[column].to_numpy(), "label": np.asarray(table.class_names)[table.labels]})
    counts = pd.crosstab(df["fold"], df["label"])[table.class_names]
    share = counts.div(counts.sum(1), axis=0)
    out = counts.astype(str) + share.map(lambda v: f" ({v:.1%})")
    out.insert(0, "rows", counts.sum(1))
    return out


def run_fold(cfg: Config, table: Table | None = None) -> pd.DataFrame:
    from pipeline.data.formats import read_table

    table = table if table is not None else read_table(cfg, "train")
    folds = make_folds(cfg, table)
    atomic_write_csv(cfg.folds_path, folds)
    write_snapshot(cfg, cfg.folds_path.with_suffix(".config.yaml"), "fold")
    how = "StratifiedGroupKFold on " + repr(cfg.folds.group) if cfg.folds.group else "StratifiedKFold"
    log.info(
        f"wrote {cfg.folds_path}: {len(folds)} rows, {cfg.folds.n_splits} folds x {cfg.folds.repeats} repeat(s), "
        f"{how}, seed {cfg.folds.seed}"
    )
    log.info(balance_table(folds, table).to_string())
    return folds


def folds_digest(cfg: Config) -> str:
    """Short digest of the folds file's bytes: which fold assignments a trained fold belongs to."""
    return hashlib.sha256(cfg.folds_path.read_bytes()).hexdigest()[:8]


def load_folds(cfg: Config, table: Table, repeat: int = 0) -> np.ndarray:
    """Fold index per row of ``table``; refuses a file made for other data."""
    path = cfg.folds_path
    if not path.is_file():
        raise PipelineError(f"{path}: folds file not found; run `pipeline fold {cfg.path}` first")
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(
            f"{path}: corrupt folds file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"rebuild it with `pipeline fold {cfg.path}`"
        ) from None
    col = fold_column(repeat)
    if "id" not in df.columns or col not in df.columns:
        raise PipelineError(
            f"{path}: missing column 'id' or {col!r}; expected id,fold as written by `pipeline fold {cfg.path}`"
        )
    ids = pd.Index(table.ids.astype(str))
    file_ids = pd.Index(df["id"])
    if len(df) != len(ids) or not file_ids.equals(ids) and set(file_ids) != set(ids):
        missing = ids.difference(file_ids)
        extra = file_ids.difference(ids)
        ex = (
            f"{len(missing)} training ids missing (e.g. {missing[0]!r})"
            if len(missing)
            else f"{len(extra)} ids not in the training data (e.g. {extra[0]!r})"
            if len(extra)
            else f"{len(df)} rows for {len(ids)} training rows"
        )
        raise PipelineError(
            f"{path}: folds file does not match the training data: {ex}; rerun `pipeline fold {cfg.path}`"
        )
    fold = df.set_index("id")[col].reindex(ids).to_numpy()
    if not np.issubdtype(fold.dtype, np.integer) or fold.min() < 0:
        raise PipelineError(
            f"{path}: column {col!r} must hold fold numbers 0..K-1; rebuild it with `pipeline fold {cfg.path}`"
        )
    n = int(fold.max()) + 1
    empty = [k for k in range(n) if not (fold == k).any()]
    if empty:
        raise PipelineError(f"{path}: fold {empty[0]} is empty; expected every fold 0..{n - 1} to have rows")
    return fold.astype(np.int64)


def n_folds(cfg: Config) -> int:
    """Folds in the folds file training used (a user-supplied file may differ from folds.n_splits)."""
    p = cfg.folds_path
    if p.is_file():
        try:
            return int(pd.read_csv(p, usecols=["fold"])["fold"].max()) + 1
        except (ValueError, KeyError):
            pass  # not a folds file: training would have refused it
    return cfg.folds.n_splits
