"""Experiment log: every run of a competition with its CV score, and leaderboard scores beside them.

CV comes from ``metrics.json`` (``cv_mean``/``cv_std`` keyed by metric, written by evaluate) when present,
else from the per-fold scores of ``oof.csv``, else from the folds' ``done.json``. Leaderboard scores are
recorded with ``record_lb`` in the submission's JSON and appended to ``leaderboard.csv`` beside it
(``paths.submissions``); only a submission file the pipeline wrote, unchanged (its JSON's sha256), is
accepted. Runs are listed from ``paths.runs`` (``RunDir.list_runs``). Every file read here is checked:
a corrupt one is one line naming it and what rebuilds it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_csv, atomic_write_json
from pipeline.core.metrics import cv_std, score
from pipeline.predict.submission import check_own, read_sidecar, submissions_dir, utc_stamp
from pipeline.runs.kept import kept_jobs
from pipeline.runs.layout import RunDir
from pipeline.runs.predictions import probs_of, read_predictions
from pipeline.runs.records import read_metrics

log = logging.getLogger(__name__)


def cv_score(run: Path, metric: str) -> tuple[float, float, str]:
    """(mean, std, source) of the run's per-fold CV scores; NaN when nothing is there yet."""
    rd = RunDir(path=run)
    m = read_metrics(rd)  # a corrupt file is refused; one of another metric (or NaN) falls back
    if m is not None:
        mean, std = m.get("cv_mean", {}).get(metric), m.get("cv_std", {}).get(metric)
        if mean is not None and std is not None:
            return float(mean), float(std), "metrics.json"
    if rd.oof.is_file():
        oof = read_predictions(rd.oof, "oof", hint=f"pipeline train <config of {rd.name}>")
        per = [score(metric, g["target"].to_numpy(), probs_of(g)) for _, g in oof.groupby("fold")]
        return float(np.mean(per)), cv_std(per), "oof.csv"
    per = []
    for job, d in rd.done_jobs():
        v = d.get(f"val_{metric}")
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PipelineError(
                f"{job.done}: val_{metric} is {v!r}; expected a number; delete it to train {job.label} again "
                f"with `{job.train_cmd}`"
            )
        per.append(float(v))
    if per:
        return float(np.mean(per)), cv_std(per), "done.json"
    return math.nan, math.nan, ""


def submission_records(root: Path, competition: str | None = None) -> pd.DataFrame:
    """One row per submission file in ``root`` with its sidecar JSON (file, experiment, CV score, LB
    score), oldest first. A JSON without its CSV beside it is not a submission and is skipped."""
    lb = read_leaderboard(Path(root) / "leaderboard.csv")
    latest = dict(zip(lb["file"], lb["lb_score"]))  # the latest record of a file wins
    rows = []
    for j in sorted(Path(root).glob("*.json")):
        if not j.with_suffix(".csv").is_file():
            continue
        d = read_sidecar(j.with_suffix(".csv"))
        if competition and d["competition"] != competition:
            continue
        f = d["file"]
        lb_score = d.get("lb_score", latest.get(f, math.nan))
        sent = d.get("kaggle") if isinstance(d.get("kaggle"), dict) else {}
        rows.append(
            {
                "file": f,
                "experiment": d["experiment"],
                "created_utc": d.get("created_utc", ""),
                "metric": d.get("metric", ""),
                "cv": d.get("oof_score", math.nan),
                "lb": lb_score,
                "kaggle": "" if sent.get("ref") is None else str(sent["ref"]),  # `pipeline submit`'s ref
            }
        )
    return pd.DataFrame(rows, columns=["file", "experiment", "created_utc", "metric", "cv", "lb", "kaggle"])


LEADERBOARD_COLUMNS = ["recorded_utc", "file", "competition", "experiment", "metric", "cv", "lb_score"]
_BOARD_FIX = (
    "it is the log `pipeline lb` keeps: delete it and record the scores again with `pipeline lb SUBMISSION SCORE`"
)


def read_leaderboard(path: Path) -> pd.DataFrame:
    """leaderboard.csv, checked (every column ``record_lb`` writes; a file name and a finite LB score
    on every row; cv a number or empty); an empty frame when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False).fillna("")
    except (ValueError, OverflowError) as e:  # EmptyDataError, ParserError, UnicodeDecodeError
        raise PipelineError(
            f"{path}: not a readable CSV ({(str(e).splitlines() or [type(e).__name__])[0][:100]}); {_BOARD_FIX}"
        ) from None
    missing = [c for c in LEADERBOARD_COLUMNS if c not in df.columns]
    if missing:
        raise PipelineError(
            f"{path}: missing column {missing[0]!r}; expected {','.join(LEADERBOARD_COLUMNS)}; {_BOARD_FIX}"
        )
    df = df[LEADERBOARD_COLUMNS].copy()
    lb = pd.to_numeric(df["lb_score"], errors="coerce").to_numpy(float)
    cv = pd.to_numeric(df["cv"].replace("", "nan"), errors="coerce").to_numpy(float)
    for i, (f, lb_text, cv_text) in enumerate(zip(df["file"], df["lb_score"], df["cv"])):
        if not f.strip():
            problem = "file is empty"
        elif not math.isfinite(lb[i]):
            problem = f"lb_score {lb_text!r} is not a finite number"
        elif math.isnan(cv[i]) and cv_text.strip().lower() not in ("", "nan"):
            problem = f"cv {cv_text!r} is not a number"
        else:
            continue
        raise PipelineError(f"{path}: line {i + 2}: {problem}; {_BOARD_FIX}")
    df["lb_score"], df["cv"] = lb, cv
    return df


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
        date = (
            dt.datetime.fromtimestamp(stamp.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
            if stamp
            else ""
        )
        mine = subs[subs["experiment"] == run.name]
        files = "; ".join(f + ("" if pd.isna(lb) else f" (LB {lb:g})") for f, lb in zip(mine["file"], mine["lb"]))
        rows.append(
            {
                "experiment": run.name,
                "kind": kind,
                f"cv_{cfg.metric}": mean,
                "cv_std": std,
                "cv_from": src,
                "hash": h,
                "date_utc": date,
                "kept": ", ".join(f"{n} of {h}" for h, n in kept_jobs(run).items()),  # earlier configs' jobs
                "submissions": files,
            }
        )
    columns = ["experiment", "kind", f"cv_{cfg.metric}", "cv_std", "cv_from", "hash", "date_utc", "kept", "submissions"]
    df = pd.DataFrame(rows, columns=columns)
    if df.empty:
        log.info(f"no runs under {root} yet; run `pipeline train {cfg.path}`")
        return df
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        log.info(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if len(subs):
            log.info(
                "\nsubmissions (CV = OOF score of the file's experiments, LB = recorded leaderboard score, "
                "kaggle = the ref `pipeline submit` got):"
            )
            log.info(subs.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    return df


def record_lb(submission: str | Path, lb_score: float) -> Path:
    """Record the leaderboard score a submission file got: in its JSON and in the leaderboard.csv beside it.
    Only a file the pipeline wrote, unchanged since (its JSON records its sha256), is accepted."""
    path = Path(submission)
    if not path.is_file():
        raise PipelineError(f"{path}: submission file not found")
    if not math.isfinite(lb_score):
        raise PipelineError(f"lb: score {lb_score!r} is not a finite number")
    meta, jpath = check_own(path), path.with_suffix(".json")
    board = path.parent / "leaderboard.csv"
    old = read_leaderboard(board)  # checked before anything is written
    stamp = utc_stamp()
    row = pd.DataFrame(
        [
            {
                "recorded_utc": stamp,
                "file": path.name,
                "competition": meta["competition"],
                "experiment": meta["experiment"],
                "metric": meta.get("metric", ""),
                "cv": meta.get("oof_score", math.nan),
                "lb_score": lb_score,
            }
        ]
    )
    before = board.read_bytes() if board.is_file() else None
    atomic_write_csv(board, row if old.empty else pd.concat([old, row], ignore_index=True))
    try:
        atomic_write_json(jpath, meta | {"lb_score": lb_score, "lb_recorded_utc": stamp})
    except BaseException:  # both records or neither
        if before is None:
            board.unlink(missing_ok=True)
        else:
            atomic_write_bytes(board, before)
        raise
    cv = meta.get("oof_score")
    log.info(
        f"recorded LB {lb_score:g} for {path.name}"
        + (f" (CV {meta.get('metric', '')} {cv:.5f})" if cv is not None else "")
        + f" in {board} and {jpath.name}"
    )
    return board
