"""Experiment log: every run of a competition with its CV score, and leaderboard scores beside them.

CV comes from ``metrics.json`` (``cv_mean``/``cv_std`` keyed by metric, written by evaluate) when present,
else from the per-fold scores of ``oof.csv``, else from the folds' ``done.json``. Leaderboard scores are
recorded with ``record_lb`` in the submission's JSON and appended to ``leaderboard.csv`` beside it
(``paths.submissions``). Runs are listed from ``paths.runs`` (``RunDir.list_runs``).
"""
from __future__ import annotations

import logging
import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config
from .errors import PipelineError
from .io import atomic_write_csv, atomic_write_json
from .metrics import cv_std, score
from .predictions import probs_of, read_predictions
from .runs import RunDir
from .submission import submissions_dir, utc_stamp

log = logging.getLogger(__name__)


def cv_score(run: Path, metric: str) -> tuple[float, float, str]:
    """(mean, std, source) of the run's per-fold CV scores; NaN when nothing is there yet."""
    rd = RunDir(path=run)
    if rd.metrics_json.is_file():
        try:
            m = json.loads(rd.metrics_json.read_text())
            return float(m["cv_mean"][metric]), float(m["cv_std"][metric]), "metrics.json"
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # written by another version: fall back to the predictions
    if rd.oof.is_file():
        oof = read_predictions(rd.oof, "oof", hint=f"pipeline train <config of {rd.name}>")
        per = [score(metric, g["target"].to_numpy(), probs_of(g)) for _, g in oof.groupby("fold")]
        return float(np.mean(per)), cv_std(per), "oof.csv"
    per = [d[f"val_{metric}"] for d in rd.done_records() if d.get(f"val_{metric}") is not None]
    if per:
        return float(np.mean(per)), cv_std(per), "done.json"
    return math.nan, math.nan, ""


def submission_records(root: Path, competition: str | None = None) -> pd.DataFrame:
    """One row per submission JSON in ``root`` (file, experiment, CV score, LB score), oldest first."""
    lb = _leaderboard(root)
    rows = []
    for j in sorted(Path(root).glob("*.json")):
        try:
            d = json.loads(j.read_text())
        except json.JSONDecodeError:
            continue
        if not isinstance(d, dict) or "experiment" not in d or (competition and d.get("competition") != competition):
            continue
        f = d.get("file", j.with_suffix(".csv").name)
        lb_score = d.get("lb_score", lb.get(f, math.nan))
        rows.append({"file": f, "experiment": d["experiment"], "created_utc": d.get("created_utc", ""),
                     "metric": d.get("metric", ""), "cv": d.get("oof_score", math.nan), "lb": lb_score})
    return pd.DataFrame(rows, columns=["file", "experiment", "created_utc", "metric", "cv", "lb"])


def _leaderboard(root: Path) -> dict:
    p = Path(root) / "leaderboard.csv"
    if not p.is_file():
        return {}
    df = pd.read_csv(p)
    return dict(zip(df["file"], df["lb_score"]))  # the latest record of a file wins


def list_experiments(cfg: Config) -> pd.DataFrame:
    """Print and return every run of ``cfg.competition`` with CV mean/std, hash, date and submissions."""
    root = cfg.run_dir.parent
    runs = RunDir.list_runs(cfg)
    subs = submission_records(submissions_dir(cfg), cfg.competition)
    rows = []
    for run in runs:
        mean, std, src = cv_score(run.path, cfg.metric)
        kind = "ensemble" if run.is_ensemble else "experiment"
        h = run.snapshot_hash("train") or ""
        stamp = next((p for p in (run.oof, run.snapshot("train"), run.ensemble_json) if p.is_file()), None)
        date = dt.datetime.fromtimestamp(stamp.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M") if stamp else ""
        mine = subs[subs["experiment"] == run.name]
        files = "; ".join(f + ("" if pd.isna(lb) else f" (LB {lb:g})") for f, lb in zip(mine["file"], mine["lb"]))
        rows.append({"experiment": run.name, "kind": kind, f"cv_{cfg.metric}": mean, "cv_std": std, "cv_from": src,
                     "hash": h, "date_utc": date, "submissions": files})
    df = pd.DataFrame(rows, columns=["experiment", "kind", f"cv_{cfg.metric}", "cv_std", "cv_from", "hash", "date_utc", "submissions"])
    if df.empty:
        log.info(f"no runs under {root} yet; run `pipeline train {cfg.path}`")
        return df
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        log.info(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if len(subs):
            log.info("\nsubmissions (CV = OOF score of the file's experiments, LB = recorded leaderboard score):")
            log.info(subs.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    return df


def record_lb(submission: str | Path, lb_score: float) -> Path:
    """Record the leaderboard score a submission file got: in its JSON and in the leaderboard.csv beside it."""
    path = Path(submission)
    if not path.is_file():
        raise PipelineError(f"{path}: submission file not found")
    if not math.isfinite(lb_score):
        raise PipelineError(f"lb: score {lb_score!r} is not a finite number")
    stamp = utc_stamp()
    meta, jpath = {}, path.with_suffix(".json")
    if jpath.is_file():
        try:
            meta = json.loads(jpath.read_text())
        except json.JSONDecodeError:
            raise PipelineError(f"{jpath}: not valid JSON; expected the file write_submission wrote") from None
        meta.update(lb_score=lb_score, lb_recorded_utc=stamp)
        atomic_write_json(jpath, meta)
    board = path.parent / "leaderboard.csv"
    row = pd.DataFrame([{"recorded_utc": stamp, "file": path.name, "competition": meta.get("competition", ""),
                         "experiment": meta.get("experiment", ""), "metric": meta.get("metric", ""),
                         "cv": meta.get("oof_score", math.nan), "lb_score": lb_score}])
    old = pd.read_csv(board) if board.is_file() else None
    atomic_write_csv(board, row if old is None else pd.concat([old, row], ignore_index=True))
    cv = meta.get("oof_score")
    log.info(f"recorded LB {lb_score:g} for {path.name}" + (f" (CV {meta.get('metric', '')} {cv:.5f})" if cv is not None else "")
         + f" in {board}" + (f" and {jpath.name}" if meta else ""))
    return board
