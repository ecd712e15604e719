"""Pseudo-labels: confident test rows of a source experiment or ensemble join the training part of every fold.

``pseudo: {from: SOURCE, threshold: 0.95, weight: 0.5, max_share: 0.5, soft: false}`` in a training
config (``pipeline.config.sections.PseudoConfig``; the source is an experiment config, or an experiment's
or ensemble's run folder, found by ``pseudo_source`` below). What keeps every OOF score honest:

- fold k's pseudo rows are labelled by the source's fold-k model alone (its ``test_pred_fold<k>.csv``),
  which never saw fold k's validation rows. The all-fold ``test_pred.csv`` averages models that did,
  and would make fold k's OOF optimistic. An ensemble source's fold-k file blends its members' fold-k
  models by weights (or a second stage) fitted without fold k (``ensemble.fold_blends``); an ensemble
  whose members kept no per-fold files has none, and is refused like any source missing them;
- the source was trained on our folds file (its oof.csv's fold of every id is ours);
- pseudo rows are in every fold's training part and in no validation part (``trainer.TRAIN_ONLY``),
  so oof.csv holds exactly the training rows, scored on their real labels;
- the source's probabilities are its raw ones: its calibration (calibration.json) was fitted on every
  fold's OOF labels, fold k's included.
The refit (no validation rows, no OOF) takes its labels from the source's all-fold ``test_pred.csv``.

Per fold: the rows whose max probability is at least ``threshold``, most confident first (ties by id),
at most ``max_share`` of the training part (P pseudo rows beside R real ones: P <= max_share * (R + P)).
Hard labels are the argmax, soft ones the probability vector (cross-entropy against it); each pseudo
row's loss is weighted by ``weight``. The CV driver decides which rows a fold trains on; the trainer
sees a Table with per-row weights (and soft targets) and a fold_of where test rows are TRAIN_ONLY or UNUSED.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.data.folds import n_folds
from pipeline.data.table import Table
from pipeline.runs.layout import RunDir
from pipeline.runs.predictions import probs_of, read_predictions
from pipeline.runs.records import stale_predictions
from pipeline.train.trainer import TRAIN_ONLY, UNUSED

REFIT = -1  # the refit job's fold (``runs.JobDir``): its selection comes from the all-fold test_pred.csv


def check_source(cfg: Config) -> RunDir:
    """The source run, with the files pseudo-labels need; checked before anything is read or written."""
    run = RunDir.of(cfg)
    src, where = pseudo_source(cfg), f"{cfg.path}: pseudo.from"
    if src.path.resolve() == run.path.resolve():
        raise PipelineError(f"{where}: {cfg.pseudo.source} is this experiment's own run; expected another experiment")
    if not src.oof.is_file():
        raise PipelineError(
            f"{where}: {src} has no oof.csv; train the source first (`pipeline train <config of {src.name}>`)"
        )
    stale = stale_predictions(src)
    if stale:
        raise PipelineError(f"{where}: {stale}; rerun `pipeline predict <config of {src.name}>`")
    for p in pseudo_files(cfg):
        if not p.is_file():
            why = (
                "the refit's labels come from the source's all-fold test predictions"
                if p == src.test_pred
                else "fold k's pseudo-labels come from the source's fold-k model alone, never the all-fold average"
            )
            how = (
                f"rerun `pipeline ensemble` for {src.name} once every member's `pipeline predict` wrote its "
                f"test_pred_fold<k>.csv"
                if src.is_ensemble
                else f"run `pipeline predict <config of {src.name}>` first"
            )
            raise PipelineError(f"{where}: {p} not found ({why}); {how}")
    return src


@dataclass(frozen=True, kw_only=True)
class Selection:
    """One job's pseudo rows."""

    rows: np.ndarray  # test-table rows, most confident first
    targets: np.ndarray  # (n, K) float32: one-hot of the argmax, or the source's probabilities (soft)
    candidates: int  # rows at or above the threshold, before max_share


def select(
    probs: np.ndarray, ids: np.ndarray, *, threshold: float, max_share: float, n_real: int, soft: bool
) -> Selection:
    """The rows of ``probs`` (test rows x classes) a job with ``n_real`` real training rows trains on."""
    conf = probs.max(1)
    order = np.lexsort((ids.astype(str), -conf))  # most confident first, ties by id
    order = order[conf[order] >= threshold]
    cap = len(order) if max_share >= 1 else math.floor(max_share * n_real / (1 - max_share) + 1e-9)
    rows = order[:cap]
    p = probs[rows]
    if soft:
        targets = (p / p.sum(1, keepdims=True)).astype(np.float32)
    else:
        targets = np.eye(probs.shape[1], dtype=np.float32)[p.argmax(1)]
    return Selection(rows=rows, targets=targets, candidates=len(order))


class StackedImages:
    """The rows of ``a`` then those of ``b``, gathered per index: a memory-mapped training set is never copied."""

    def __init__(self, a, b):
        if tuple(a.shape[1:]) != tuple(b.shape[1:]):
            raise ValueError(f"rows of shape {tuple(a.shape[1:])} and {tuple(b.shape[1:])} cannot be stacked")
        self.a, self.b = a, b
        self.shape = (len(a) + len(b),) + tuple(a.shape[1:])
        self.ndim, self.dtype = len(self.shape), np.result_type(a.dtype, b.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        one = idx.ndim == 0
        idx = np.atleast_1d(idx)
        out = np.empty((len(idx),) + self.shape[1:], self.dtype)
        in_a = idx < len(self.a)
        out[in_a] = self.a[idx[in_a]]
        out[~in_a] = self.b[idx[~in_a] - len(self.a)]
        return out[0] if one else out


@dataclass(frozen=True, kw_only=True)
class PseudoLabels:
    """Every job's pseudo rows (small and picklable: fold_jobs workers get it and rebuild the tables)."""

    source: str
    digest: str
    weight: float
    soft: bool
    threshold: float
    max_share: float
    class_names: list[str]
    by_fold: dict[int, Selection]

    def describe(self) -> list[str]:
        """A log line per job: its pseudo rows, where their labels come from, rows per class."""
        lines = []
        for k in sorted(self.by_fold, key=lambda k: (k == REFIT, k)):
            r = self.record(k)
            capped = f", capped by max_share {self.max_share}" if r["rows"] < r["candidates"] else ""
            lines.append(
                f"pseudo: {'refit' if k == REFIT else f'fold {k}'} trains on {r['rows']} test rows labelled by "
                f"{self.source}'s {'all-fold test_pred.csv' if k == REFIT else f'fold-{k} model'} "
                f"({r['candidates']} at "
                f"or above {self.threshold}{capped}; weight {self.weight}, {'soft' if self.soft else 'hard'}): "
                + ", ".join(f"{c} {v}" for c, v in r["per_class"].items())
            )
        return lines

    def combine(self, table: Table, test: Table) -> Table:
        """The training rows, then every test row (label 0 until a job's ``fold_view`` sets it)."""
        if table.feature_names != test.feature_names:
            raise PipelineError(
                f"test features {test.feature_names} differ from the training features {table.feature_names}; "
                f"expected the same reader for both splits"
            )
        if (test.channels, test.image_size) != (table.channels, table.image_size):
            raise PipelineError(
                f"test images are {test.channels}x{test.image_size[0]}x{test.image_size[1]}, training images "
                f"{table.channels}x{table.image_size[0]}x{table.image_size[1]}; pseudo-labels need one size"
            )
        feats = None if table.features is None else np.concatenate([table.features, test.features]).astype(np.float32)
        return Table(
            ids=np.concatenate([table.ids.astype(str), test.ids.astype(str)]),
            images=StackedImages(table.images, test.images),
            class_names=table.class_names,
            labels=np.concatenate([table.labels, np.zeros(len(test), np.int64)]),
            features=feats,
            feature_names=table.feature_names,
            value_range=table.value_range,
        )

    def fold_view(self, base: Table, fold_of: np.ndarray, fold: int) -> tuple[Table, np.ndarray]:
        """Job ``fold``'s table and fold_of: its pseudo rows TRAIN_ONLY with their labels and weight, other test
        rows UNUSED."""
        sel, n = self.by_fold[fold], len(fold_of)
        at = n + sel.rows
        where = np.full(len(base), UNUSED, np.int64)
        where[:n], where[at] = fold_of, TRAIN_ONLY
        labels = base.labels.copy()
        labels[at] = sel.targets.argmax(1)
        weights = np.ones(len(base), np.float32)
        weights[at] = self.weight
        targets = None
        if self.soft:
            targets = np.zeros((len(base), len(self.class_names)), np.float32)
            targets[np.arange(n), labels[:n]] = 1.0
            targets[at] = sel.targets
        return dataclasses.replace(base, labels=labels, sample_weights=weights, soft_targets=targets), where

    def job_view(self, base: Table, fold_of: np.ndarray, fold: int) -> tuple[Table, np.ndarray, dict]:
        """What job ``fold`` trains on (``fold_view``) and what its done.json says of it (``record``)."""
        table, where = self.fold_view(base, fold_of, fold)
        return table, where, {"pseudo": self.record(fold)}

    def record(self, fold: int) -> dict:
        """What job ``fold`` trained on besides its rows (its done.json's ``pseudo``)."""
        sel = self.by_fold[fold]
        counts = np.bincount(sel.targets.argmax(1), minlength=len(self.class_names))
        return {
            "source": self.source,
            "digest": self.digest,
            "rows": int(len(sel.rows)),
            "candidates": sel.candidates,
            "per_class": {c: int(v) for c, v in zip(self.class_names, counts)},
        }

    def summary(self, cfg: Config) -> dict:
        """pseudo.json: the settings, the source and each job's rows per class."""
        jobs = {
            ("refit" if k == REFIT else f"fold_{k}"): {
                k2: v for k2, v in self.record(k).items() if k2 not in ("source", "digest")
            }
            for k in sorted(self.by_fold, key=lambda k: (k == REFIT, k))
        }
        return {
            "source": self.source,
            "from": cfg.pseudo.source,
            "digest": self.digest,
            "threshold": self.threshold,
            "weight": self.weight,
            "max_share": self.max_share,
            "soft": self.soft,
            "jobs": jobs,
        }


def _check_folds(cfg: Config, src: RunDir, table: Table, fold_of: np.ndarray) -> None:
    where = f"{cfg.path}: pseudo.from"
    oof = read_predictions(src.oof, "oof", class_names=table.class_names, hint=f"pipeline train <config of {src.name}>")
    ids = pd.Index(table.ids.astype(str))
    if len(oof) != len(ids) or not pd.Index(oof["id"]).isin(ids).all():
        raise PipelineError(
            f"{where}: {src.oof} holds other training ids than {cfg.data.dir}; expected a source trained on this data"
        )
    theirs = oof.set_index("id")["fold"].reindex(ids).to_numpy()
    diff = np.flatnonzero(theirs != fold_of)
    if len(diff):
        i = int(diff[0])
        raise PipelineError(
            f"{where}: {src.oof} was trained on other folds than {cfg.folds_path} ({len(diff)} rows differ, e.g. "
            f"id {ids[i]!r}: fold {theirs[i]} vs {fold_of[i]}); expected a source trained on the same folds file"
        )


def _source_probs(path, src: RunDir, test: Table, class_names: list[str]) -> np.ndarray:
    """A source test prediction file's probabilities in the test table's row order."""
    df = read_predictions(path, "test", class_names=class_names, hint=f"pipeline predict <config of {src.name}>")
    ids = pd.Index(test.ids.astype(str))
    if len(df) != len(ids) or not pd.Index(df["id"]).isin(ids).all():
        raise PipelineError(
            f"{path}: predicts other test ids than the test data ({len(df)} rows, {len(ids)} test images); "
            f"rerun `pipeline predict <config of {src.name}>` on this test set"
        )
    return probs_of(df.set_index("id").reindex(ids), class_names)


def planned_rows(cfg: Config, test: Table, class_names: list[str], *, n_real: int) -> int:
    """The most pseudo rows any fold job of ``cfg`` will train on, from the source's fold files, for the
    run plan to time (``n_real``: a fold's real training rows). The source is checked as training checks it."""
    src = check_source(cfg)
    return max(
        len(_select(cfg, src, src.test_pred_fold(k), test, class_names, n_real).rows)
        for k in range(cfg.folds.n_splits * cfg.folds.repeats)
    )


def _select(cfg: Config, src: RunDir, path, test: Table, class_names: list[str], n_real: int) -> Selection:
    """The pseudo rows a job with ``n_real`` real rows takes from the source's prediction file ``path``."""
    p = cfg.pseudo
    return select(
        _source_probs(path, src, test, class_names),
        test.ids,
        threshold=p.threshold,
        max_share=p.max_share,
        n_real=n_real,
        soft=p.soft,
    )


def prepare(cfg: Config, src: RunDir, table: Table, fold_of: np.ndarray, test: Table) -> PseudoLabels:
    """Every job's pseudo rows from the source's files, after checking the source trained on our folds."""
    _check_folds(cfg, src, table, fold_of)
    p, names = cfg.pseudo, table.class_names
    n_folds = int(fold_of.max()) + 1
    jobs = {k: (src.test_pred_fold(k), int((fold_of != k).sum())) for k in range(n_folds)}
    if cfg.train.refit:
        jobs[REFIT] = (src.test_pred, len(table))
    by_fold = {k: _select(cfg, src, path, test, names, n_real) for k, (path, n_real) in jobs.items()}
    return PseudoLabels(
        source=str(src.path),
        digest=pseudo_digest(cfg),
        weight=p.weight,
        soft=p.soft,
        threshold=p.threshold,
        max_share=p.max_share,
        class_names=list(names),
        by_fold=by_fold,
    )


# ---- the source run and its files -------------------------------------------------------------


def pseudo_source(cfg: Config) -> RunDir:
    """The run ``pseudo.from`` names: a run folder, or an experiment config's run; a path as written
    (relative to the current directory), else relative to this config's folder."""
    from pipeline.config.load import load_config

    entry, where = cfg.pseudo.source, f"{cfg.path}: pseudo.from"
    found = next((p for p in (Path(entry).expanduser(), Path(cfg.path).parent / entry) if p.exists()), None)
    if found is None:
        raise PipelineError(
            f"{where}: {entry} not found (looked in {Path.cwd()} and {Path(cfg.path).parent}); "
            f"expected a run folder or an experiment config"
        )
    if found.is_dir():
        return RunDir(path=found)
    if found.suffix not in (".yaml", ".yml"):
        raise PipelineError(f"{where}: {entry} is neither a run folder nor a YAML experiment config")
    try:
        src = load_config(found, check_data=False)
    except PipelineError as e:  # e.g. an ensemble file: named as the culprit of this key
        hint = (
            "; an ensemble source is named by its run folder (runs/<competition>/<name>)"
            if "ensemble" in str(e)
            else ""
        )
        raise PipelineError(f"{where}: {e}{hint}") from None
    if src.competition != cfg.competition:
        raise PipelineError(
            f"{where}: {entry} is an experiment of {src.competition!r}; expected one of {cfg.competition!r}"
        )
    return RunDir.of(src)


def pseudo_files(cfg: Config) -> list[Path]:
    """The source's files pseudo-labels come from: fold k's own ``test_pred_fold<k>.csv`` for each
    fold, and with ``train.refit`` its all-fold ``test_pred.csv`` (the refit has no validation rows)."""
    src = pseudo_source(cfg)
    files = [src.test_pred_fold(k) for k in range(n_folds(cfg))]
    return files + [src.test_pred] if cfg.train.refit else files


def pseudo_digest(cfg: Config) -> str:
    """Short digest of the source's pseudo-label files (names and bytes)."""
    h = hashlib.sha256()
    for p in pseudo_files(cfg):
        if not p.is_file():
            raise PipelineError(f"{cfg.path}: pseudo.from: {p} not found; run `pipeline predict` for the source first")
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:8]
