"""Adversarial validation: can a classifier tell the training images from the test images?

``pipeline adversarial CONFIG`` (and ``evaluate`` with ``evaluate.adversarial: true``) embeds both
splits without a trained model (pipeline/data/shift.py), trains a train-vs-test classifier with
cross-validation and writes to the run folder (layout: pipeline/runs/layout.py):

  adversarial.json        auc (0.5: no visible shift; near 1: test looks different), what the rows
                          were embedded with, a histogram of p(test) over the training rows, the
                          ``top_k`` most test-like training rows, and the exact / near duplicate
                          train-test pairs (a leak: a test answer that is a training label)
  adversarial_scores.csv  id,p_test for every training row (out-of-fold, so honest)

``validation_scores`` turns the OOF predictions and p(test) into the *adversarial validation score*
evaluate reports beside the plain one: the metric on the most test-like fifth of the rows, and
log-loss / accuracy importance-weighted by p/(1-p) (the test/train density ratio, as the
classifier's classes are balanced).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_csv, atomic_write_json, staged
from pipeline.core.metrics import METRICS
from pipeline.data.shift import Embedding, duplicate_pairs, shift_scores
from pipeline.data.table import Table
from pipeline.runs.layout import RunDir

log = logging.getLogger(__name__)

HIST_BINS = 20
TOP_SHARE = 0.2  # the "most test-like" rows the adversarial validation score is computed on
WEIGHT_CLIP = (0.01, 0.99)  # p(test) clipped before p/(1-p): one row never outweighs 99 others


def verdict(auc: float) -> str:
    """How to read the AUC (thresholds are the usual rules of thumb, not a test)."""
    if auc < 0.6:
        return "no visible shift: a random split of train validates like test"
    if auc < 0.8:
        return "mild shift: weigh the test-like rows (folds.adversarial, the adversarial validation score)"
    return "strong shift: test looks different; trust the adversarial validation score over the plain CV"


def analyse(cfg: Config, train: Table, test: Table) -> tuple[dict, np.ndarray]:
    """(the adversarial.json record, p(test) of every training row in table order)."""
    acfg = cfg.adversarial
    emb, p, auc = shift_scores(train, test, acfg)
    n = len(train)
    p_train = p[:n]
    counts, edges = np.histogram(p_train, bins=HIST_BINS, range=(0, 1))
    top = np.argsort(-p_train, kind="stable")[: acfg.top_k]
    names = np.asarray(train.class_names, dtype=object)
    record = {
        "competition": cfg.competition,
        "experiment": cfg.name,
        "auc": auc,
        "verdict": verdict(auc),
        "n_train": n,
        "n_test": len(test),
        "embedding": emb.parts,
        "backbone_weights": emb.backbone_source,
        "classifier": f"standardise, PCA (at most 32 components), logistic regression (C 0.1, balanced classes), "
        f"{acfg.n_splits}-fold CV, seed {acfg.seed}",
        "p_test_train": {
            "mean": float(p_train.mean()),
            "test_mean": float(p[n:].mean()),  # train rows' and test rows' mean
            "quantiles": {str(q): float(v) for q, v in zip((0.5, 0.8, 0.95), np.quantile(p_train, (0.5, 0.8, 0.95)))},
            "histogram": {
                "edges": np.round(edges, 6).tolist(),
                "train": counts.tolist(),
                "test": np.histogram(p[n:], bins=HIST_BINS, range=(0, 1))[0].tolist(),
            },
        },
        "top_test_like": [
            {
                "id": str(train.ids[i]),
                "p_test": float(p_train[i]),
                "label": str(names[train.labels[i]]) if train.labels is not None else None,
            }
            for i in top
        ],
        "duplicates": _pairs(emb, train, test, acfg),
    }
    return record, p_train


def _pairs(emb: Embedding, train: Table, test: Table, acfg) -> dict:
    d = duplicate_pairs(emb, threshold=acfg.near_threshold, limit=acfg.max_pairs)
    names = np.asarray(train.class_names, dtype=object)

    def rows(pairs):
        return [
            {
                "train_id": str(train.ids[i]),
                "test_id": str(test.ids[j]),
                "similarity": s,
                "train_label": str(names[train.labels[i]]) if train.labels is not None else None,
            }
            for i, j, s in pairs
        ]

    return {
        "near_threshold": acfg.near_threshold,
        "n_exact": d["n_exact"],
        "n_near": d["n_near"],
        "exact": rows(d["exact"]),
        "near": rows(d["near"]),
    }


def write_artifacts(cfg: Config, record: dict, train: Table, p_train: np.ndarray) -> None:
    """adversarial.json and adversarial_scores.csv, both or neither."""
    run = RunDir.of(cfg)
    with staged(run.path, last=[run.adversarial_json]) as stage:
        atomic_write_csv(
            stage.path(run.adversarial_scores), pd.DataFrame({"id": train.ids, "p_test": np.round(p_train, 6)})
        )
        atomic_write_json(stage.path(run.adversarial_json), record)


def read_splits(cfg: Config) -> tuple[Table, Table]:
    from pipeline.data.formats import read_table

    return read_table(cfg, "train"), read_table(cfg, "test")


def adversarial(cfg: Config, train: Table | None = None, test: Table | None = None) -> dict:
    """The stage: analyse, write adversarial.json and adversarial_scores.csv, log a summary; returns the record."""
    from pipeline.plan.store import planned

    cfg = planned(cfg, create=False)
    if train is None or test is None:
        train, test = read_splits(cfg)
    record, p_train = analyse(cfg, train, test)
    write_artifacts(cfg, record, train, p_train)
    log.info(summary(record))
    log.info(f"wrote {RunDir.of(cfg).adversarial_json} and {RunDir.of(cfg).adversarial_scores}")
    return record


def summary(r: dict) -> str:
    d = r["duplicates"]
    top = ", ".join(f"{t['id']} ({t['p_test']:.2f})" for t in r["top_test_like"][:5])
    return (
        f"adversarial validation: train vs test ROC AUC {r['auc']:.3f} ({r['verdict']}); "
        f"{r['n_train']} train and {r['n_test']} test rows on {'; '.join(r['embedding'])}\n"
        f"  most test-like train rows: {top}\n"
        f"  duplicates: {d['n_exact']} exact and {d['n_near']} near (cosine >= {d['near_threshold']}) train/test pairs"
    )


def validation_scores(y: np.ndarray, probs: np.ndarray, p_test: np.ndarray, metric: str, eps: float) -> dict:
    """The adversarial validation score: the OOF metric where the rows look like test.

    ``top_share``: every registered metric on the ``TOP_SHARE`` most test-like rows. ``weighted``:
    log-loss and accuracy with importance weights p/(1-p), and the weights' effective sample size
    (Kish); a small one means few rows carry the estimate."""
    n = len(y)
    k = max(1, int(round(TOP_SHARE * n)))
    top = np.sort(np.argsort(-p_test, kind="stable")[:k])
    top_scores = {name: m(y[top], probs[top], eps) for name, m in METRICS.items()}
    q = np.clip(p_test, *WEIGHT_CLIP)
    w = q / (1 - q)
    pk = np.clip(probs[np.arange(n), y], eps, 1)
    weighted = {
        "logloss": float(np.average(-np.log(pk), weights=w)),
        "accuracy": float(np.average(probs.argmax(1) == y, weights=w)),
        "n_eff": float(w.sum() ** 2 / (w**2).sum()),
    }
    return {
        "metric": metric,
        "top_share": TOP_SHARE,
        "n_top": int(k),
        "top": top_scores,
        "headline_top": top_scores.get(metric),
        "weighted": weighted,
    }


@dataclass(frozen=True, kw_only=True)
class EvaluateShift:
    """What evaluate keeps of the analysis: ``metrics`` for metrics.json, the rest for the report."""

    metrics: dict
    record: dict | None = None
    p_train: np.ndarray | None = None
    test: Table | None = None


def for_evaluate(cfg: Config, train: Table, y: np.ndarray, probs: np.ndarray) -> EvaluateShift:
    """evaluate's section: the stage's analysis (its files written too) and the adversarial validation
    score of these OOF predictions (``y``, ``probs`` in ``train``'s row order). Test data that cannot
    be read or analysed skips it with the reason: evaluate scores OOF and needs no test set."""
    from pipeline.data.formats import read_table

    try:
        test = read_table(cfg, "test")
        record, p_train = analyse(cfg, train, test)
    except PipelineError as e:  # e.g. no test files yet, or a single test row
        log.info(f"adversarial validation skipped: {e}")
        return EvaluateShift(metrics={"skipped": str(e)})
    write_artifacts(cfg, record, train, p_train)
    d = record["duplicates"]
    m = {
        "auc": record["auc"],
        "verdict": record["verdict"],
        "embedding": record["embedding"],
        "n_exact_duplicates": d["n_exact"],
        "n_near_duplicates": d["n_near"],
        "validation": validation_scores(y, probs, p_train, cfg.metric, cfg.evaluate.eps),
        "file": str(RunDir.of(cfg).adversarial_json),
    }
    log.info(summary(record))
    return EvaluateShift(metrics=m, record=record, p_train=p_train, test=test)
