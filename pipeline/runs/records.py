"""The JSON records the stages leave in a run folder, read and checked in one place: ``metrics.json``
(what evaluate measured and kept: the headline metric, the CV scores, the TTA views), ``predict.json``
(how ``test_pred.csv`` was made, and of which training), and whether a run's test predictions are
older than its training."""

from __future__ import annotations

import math

from pipeline.core.errors import PipelineError
from pipeline.core.io import file_sha256, read_json_object
from pipeline.runs.layout import RunDir


def read_predict_info(run: RunDir) -> dict:
    """predict.json (how test_pred.csv was made); {} before the predict stage ran."""
    p = run.predict_json
    if not p.is_file():
        return {}
    return read_json_object(p, f"rerun `{run.command('predict')}`")


def read_metrics(run: RunDir) -> dict | None:
    """metrics.json, checked (an object; ``cv_mean``/``cv_std`` objects of numbers or nulls);
    None before the evaluate stage ran."""
    p, fix = run.metrics_json, f"rerun `{run.command('evaluate')}`"
    if not p.is_file():
        return None
    d = read_json_object(p, fix)
    if not isinstance(d.get("metric", ""), str):
        raise PipelineError(f"{p}: metric is {d['metric']!r}; expected a metric name; {fix}")
    for key in ("cv_mean", "cv_std"):
        v = d.get(key, {})
        ok = isinstance(v, dict) and all(
            x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))
            for x in v.values()
        )
        if not ok:  # evaluate writes a score it could not compute as null
            raise PipelineError(f"{p}: {key} is not an object of finite numbers (or null) by metric; {fix}")
    return d


def stale_predictions(run: RunDir) -> str | None:
    """Why this run's test predictions are not of its current models (it trained again after `pipeline
    predict`: oof.csv is not the one predict.json recorded), or None. Fold k's file of an older training
    may come from a model that saw today's fold k."""
    if not run.oof.is_file():
        return None
    want = read_predict_info(run).get("oof_sha256")
    if want and file_sha256(run.oof) != want:
        return (
            f"{run.path}: its test predictions are older than its training (oof.csv changed since `pipeline predict`)"
        )
    return None
