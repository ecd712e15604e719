"""``pipeline evaluate --compare``: runs side by side on the same folds, the best of each row marked; runs
whose classes, ids or fold assignments differ are refused."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.evaluate.scoring import _fmt, classification_metrics, fold_metrics, greater_is_better
from pipeline.runs.layout import RunDir
from pipeline.runs.predictions import class_names_of, csv_line, probs_of, read_predictions
from pipeline.runs.records import read_metrics

log = logging.getLogger(__name__)


def _run_settings(run: Path) -> tuple[str, float]:
    """(metric, eps) a run was evaluated or trained with: metrics.json, else the config snapshot."""
    import yaml

    rd = RunDir(path=run)
    metric, eps = (read_metrics(rd) or {}).get("metric"), 1e-15  # a corrupt metrics.json is refused
    for stage in ("evaluate", "train"):
        p = rd.snapshot(stage)
        if p.is_file():
            try:
                d = yaml.safe_load(p.read_text())
                section = d.get("evaluate") or {}
                eps = float(section.get("eps", eps))
                if not 0 < eps < 0.5:
                    raise ValueError(eps)
            except (yaml.YAMLError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
                raise PipelineError(
                    f"{p}: not a config snapshot the pipeline wrote; rerun `pipeline {stage} <config of {rd.name}>`"
                ) from None
            metric = metric or (d.get("metric") if isinstance(d.get("metric"), str) else None)
            break
    return metric or "logloss", eps


def compare(run_dirs: list[str]) -> pd.DataFrame:
    """Runs side by side (rows = metrics, columns = runs) on the same folds; refuses runs whose
    oof.csv fold assignments differ, since their CV scores would not be comparable."""
    if not run_dirs:
        raise PipelineError("command line: evaluate --compare needs at least one run directory")
    runs = [Path(d) for d in run_dirs]
    for r in runs:
        if not r.is_dir():
            raise PipelineError(f"{r}: run directory not found; expected runs/<competition>/<experiment>")
    paths = [RunDir(path=r).oof for r in runs]
    frames = [read_predictions(p, "oof", hint=f"pipeline train <config of {r.name}>") for r, p in zip(runs, paths)]
    ref, ref_path = frames[0].set_index("id"), paths[0]
    ref_classes = class_names_of(frames[0])
    for path, df in zip(paths[1:], frames[1:]):
        classes = class_names_of(df)
        if classes != ref_classes:
            raise PipelineError(
                f"{path}: classes {', '.join(classes)} differ from {ref_path}'s "
                f"({', '.join(ref_classes)}); expected runs of the same competition"
            )
        ids = pd.Index(df["id"])
        if set(ids) != set(ref.index):
            other = ids.symmetric_difference(ref.index)
            raise PipelineError(
                f"{path}: ids differ from {ref_path} (e.g. id {other[0]!r}, {len(other)} ids in one file only); "
                f"expected runs on the same training data"
            )
        theirs = ref["fold"].reindex(ids).to_numpy()
        bad = np.flatnonzero(df["fold"].to_numpy() != theirs)
        if len(bad):
            i = int(bad[0])
            raise PipelineError(
                f"{path}: fold assignments differ from {ref_path} (line {csv_line(i)}, id {ids[i]!r}: fold "
                f"{df['fold'].iloc[i]} here, {theirs[i]} there); expected runs on the same folds file"
            )
    metric, _ = _run_settings(runs[0])
    labels = [r.name for r in runs]
    if len(set(labels)) < len(labels):
        labels = [str(r) for r in runs]
    rows = [metric] + [c for c in ("logloss", "accuracy", "f1", "roc_auc", "ece") if c != metric]
    table = {}
    for label, r, df in zip(labels, runs, frames):
        _, eps = _run_settings(r)
        y, fold = df["target"].to_numpy(), df["fold"].to_numpy()
        probs = probs_of(df, ref_classes)
        overall = classification_metrics(y, probs, eps)
        per_fold, mean, std = fold_metrics(y, probs, fold, eps, 10, None)
        col = {name: overall[name] for name in rows}
        col[f"cv {metric} mean"], col[f"cv {metric} std"] = mean[metric], std[metric]
        for f in per_fold:
            col[f"fold {f['fold']} {metric}"] = f[metric]
        table[label] = col
    out = pd.DataFrame(table)
    log.info(f"compare on {len(out.filter(like='fold ', axis=0))} shared folds, {len(ref)} OOF rows; headline {metric}")
    log.info(_compare_text(out, metric))
    return out


def _compare_text(df: pd.DataFrame, metric: str) -> str:
    """The table with the best run of each row marked by '*'."""

    def lower_better(row: str) -> bool:
        name = row.split()[-1] if row.startswith("fold ") else row
        if row.endswith(" std"):
            return True
        if row.startswith("cv "):
            name = metric
        return not greater_is_better(name)

    text = pd.DataFrame(index=df.index, columns=df.columns, dtype=object)
    for row in df.index:
        vals = df.loc[row].astype(float)
        best = None if vals.isna().all() else vals.idxmin() if lower_better(row) else vals.idxmax()
        for col in df.columns:
            text.loc[row, col] = _fmt(vals[col]) + ("*" if len(df.columns) > 1 and col == best else " ")
    return text.to_string()
