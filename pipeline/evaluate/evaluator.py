"""Evaluate stage: out-of-fold predictions -> the numbers a competitor decides by, and pictures.

Reads the run's ``oof.csv`` (id,fold,target,p_<class>..., raw probabilities; pipeline/runs/predictions.py)
and writes beside it (layout: pipeline/runs/layout.py):

  oof_tta.csv         when ``predict.tta`` is on (auto: from the augment list) and ``predict.tta_oof``:
                      each fold's model(s) on its own rows with the predict stage's TTA. Every figure
                      below, and the calibration, is then of this file: the calibration is fitted on
                      the kind of prediction it scales (``oof_without_tta`` keeps oof.csv's scores)

  metrics.json        overall figures (of the raw OOF, oof.csv or oof_tta.csv): every metric of ``metrics.METRICS``
                      (logloss, accuracy, f1, roc_auc, and any registered), precision, recall,
                      f1_macro, f1_weighted, ece, confusion_matrix (counts),
                      confusion_matrix_normalized (rows sum to 1), per_class; binary runs add
                      ``threshold`` (the F1-optimal cut beside F1 at 0.5). ``folds`` holds the same
                      figures per fold, ``cv_mean``/``cv_std`` their mean and spread across folds,
                      ``calibrated`` the figures with the kept calibration (each fold calibrated by
                      what was fitted on the other folds), ``calibrated.folds`` per fold: log-loss,
                      ECE and the confidence gap (mean top probability - accuracy; > 0 is
                      over-confident), raw and calibrated; ``metric``/``headline`` the competition's own.
  calibration.json    {"temperature": T, "kept": bool, ..., "shrink": {"a", "prior", "kept", ...}}: the one
                      record of the calibration (the shrink toward the class prior for log-loss metrics
                      only); readers of prediction files apply what is kept (``read_predictions(..., scaled=True)``)
  report/             PNG plots and report.html (opens offline; pictures are files beside it)
  config.evaluate.yaml / .hash   written last: the stage is done

Binary tasks: the positive class is class index 1 (``iceberg`` for the Statoil data), so precision,
recall and f1 are the positive class's. Multiclass: those three are macro averages (every class
counts the same, like Kaggle's macro-F1), and ``*_weighted`` weigh classes by their support.

The figures are computed in ``pipeline.evaluate.scoring``, the pictures drawn by ``pipeline.evaluate.report``;
``pipeline evaluate --compare`` is ``pipeline.evaluate.compare``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.core.metrics import METRICS, logloss
from pipeline.evaluate.scoring import _calibration, _fmt, classification_metrics, fold_metrics
from pipeline.runs.layout import RunDir
from pipeline.runs.predictions import check_oof_against_data, probs_of, read_predictions, write_predictions
from pipeline.tasks import build_task
from pipeline.tasks.calibration import ece

log = logging.getLogger(__name__)


def _check_trained_config(cfg: Config, run: RunDir) -> None:
    """oof.csv must come from this config's training sections (else its figures describe another model)."""
    have, want = run.snapshot_hash("train"), run.train_hash
    if have is not None and have != want:
        raise PipelineError(
            f"{run.snapshot('train')}: oof.csv was trained under another config "
            f"(train hash {have}, this config {want}); "
            f"rerun `pipeline train {cfg.path}` or evaluate with the overrides it was trained with"
        )


# ---- the stage -------------------------------------------------------------------------


def _clean(obj):
    """JSON-safe: numpy scalars to Python, NaN/inf to null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _oof_to_score(
    cfg: Config, run: RunDir, stage, table, fold_of, df: pd.DataFrame
) -> tuple[pd.DataFrame, Path, dict | None, dict | None]:
    """The OOF the submission is made like: oof.csv, or with TTA on and ``predict.tta_oof`` the TTA OOF,
    written into ``stage`` as oof_tta.csv and read back (what predict and blends will read). Returns
    (frame, its final path, oof.csv's own scores when they differ, the affine views' check or None).

    Under ``predict.tta: auto`` the affine views (``rotate<D>``, ``zoom<P>``: pipeline/config/auto.py) are
    kept only when they lower the raw OOF log-loss; otherwise the OOF, the calibration and the
    submission use the TTA without them (the check is in metrics.json, ``tta_views``). A small image or
    a model from scratch can be blurred by an interpolated view more than averaging helps it."""
    from pipeline.config.auto import affine_tta, resolve_tta, tta_auto, uses_tta_oof

    if not uses_tta_oof(cfg):
        stage.remove(run.oof_tta)  # an earlier TTA's OOF must not be blended
        return df, run.oof, None, None
    from pipeline.predict.predictor import oof_with_tta, oof_with_tta_subsets

    y, names = df["target"].to_numpy(), list(table.class_names)
    plain = probs_of(df, names)
    tta = resolve_tta(cfg)
    log.info(
        f"evaluate {cfg.name}: OOF with predict.tta {tta}{' (auto)' if cfg.predict.tta == 'auto' else ''}, "
        f"so the calibration is fitted on the kind of prediction the submission gets"
    )
    views = [v for v in affine_tta(cfg.augment) if v in tta] if tta_auto(cfg) else []
    fewer = [n for n in tta if n not in views]
    if not views:
        frame = oof_with_tta(cfg, table, fold_of, tta)
    elif fewer == ["identity"]:
        frame, other = oof_with_tta(cfg, table, fold_of, tta), df
    else:  # every view predicted once, both TTAs averaged from them
        frame, other = oof_with_tta_subsets(cfg, table, fold_of, [tta, fewer])
    check = None
    if views:
        with_ll, without_ll = logloss(y, probs_of(frame, names)), logloss(y, probs_of(other, names))
        check = {
            "views": views,
            "logloss_with": with_ll,
            "logloss_without": without_ll,
            "kept": bool(with_ll < without_ll),
            "tta": tta if with_ll < without_ll else fewer,
        }
        if not check["kept"]:
            frame = other
    path = stage.path(run.oof_tta)
    write_predictions(path, frame, "oof", class_names=names)
    tta_df = read_predictions(path, "oof", class_names=names, hint=f"pipeline evaluate {cfg.path}")
    ev = cfg.evaluate
    without = {
        "file": run.oof.name,
        cfg.metric: METRICS.get(cfg.metric)(y, plain, ev.eps),
        "logloss": logloss(y, plain, ev.eps),
        "ece": ece(y, plain, ev.n_bins),
    }
    return tta_df, run.oof_tta, without, check


def evaluate(cfg: Config, report: bool = True) -> dict:
    """Score the run's OOF (oof.csv, or the TTA OOF it makes), fit the calibration, write metrics.json,
    calibration.json and report/ (and oof_tta.csv).

    Returns the metrics dict (as written to metrics.json). ``report=False`` skips the pictures.
    """
    from pipeline.config.auto import resolve_tta, uses_tta_oof
    from pipeline.data.folds import load_folds
    from pipeline.data.formats import read_table
    from pipeline.plan.store import planned

    hint = f"pipeline train {cfg.path}"
    if not RunDir.of(cfg).oof.is_file():  # before reading the data: the common mistake answers at once
        raise PipelineError(
            f"{RunDir.of(cfg).oof}: file not found; run `{hint}` first (evaluate scores its out-of-fold predictions)"
        )
    cfg = planned(cfg, create=False)  # the plan training made: its hash is the one trained under
    run = RunDir.of(cfg)
    _check_trained_config(cfg, run)
    table = read_table(cfg, "train")
    fold_of = load_folds(cfg, table)
    names = list(table.class_names)
    df = read_predictions(run.oof, "oof", class_names=names, hint=hint)  # raw: the calibration is fitted here
    df = check_oof_against_data(run.oof, df, table.ids, table.labels, fold_of, names, cfg.folds_path, hint)
    ev = cfg.evaluate
    with run.staged(
        "evaluate"
    ) as stage:  # oof_tta.csv, calibration.json, metrics.json, then the done marker: all or nothing
        df, oof_path, without, views = _oof_to_score(cfg, run, stage, table, fold_of, df)
        y, fold, probs = df["target"].to_numpy(), df["fold"].to_numpy(), probs_of(df, names)
        overall = classification_metrics(y, probs, ev.eps, ev.n_bins, names)
        folds, cv_mean, cv_std = fold_metrics(y, probs, fold, ev.eps, ev.n_bins, names)
        metrics = {
            "competition": cfg.competition,
            "experiment": cfg.name,
            "metric": cfg.metric,
            "headline": overall[cfg.metric],
            "classes": names,
            "oof": str(oof_path),
            "tta": (views["tta"] if views else resolve_tta(cfg)) if uses_tta_oof(cfg) else ["identity"],
            **overall,
        }
        if without is not None:
            metrics["oof_without_tta"] = without
        if views is not None:
            metrics["tta_views"] = views
        threshold = build_task(len(names)).threshold_summary(y, probs, fold)
        if threshold is not None:
            metrics["threshold"] = threshold
        metrics.update(folds=folds, cv_mean=cv_mean, cv_std=cv_std)
        calib, metrics["calibrated"], calibrated_probs = _calibration(cfg, y, probs, fold)
        shift = None
        if ev.adversarial:
            from pipeline.evaluate.adversarial import for_evaluate

            shift = for_evaluate(cfg, table, y, probs)
            metrics["adversarial"] = shift.metrics
        report_path = None
        if report:  # before the JSON files: if drawing fails, the previous calibration.json and metrics.json stay
            from pipeline.evaluate.report import write_report

            report_path = write_report(cfg, table, df, metrics, calibrated_probs, shift=shift)
            metrics["report"] = str(report_path)
        metrics = _clean(metrics)
        atomic_write_json(stage.path(run.calibration_json), _clean(calib))
        atomic_write_json(stage.path(run.metrics_json), metrics)
        run.write_snapshot("evaluate", into=stage)
    log.info(summary_table(metrics))
    log.info(
        f"wrote {run.metrics_json} and {run.calibration_json}" + (f" and {run.oof_tta}" if without is not None else "")
    )
    if report_path is not None:
        log.info(f"report: {report_path}")
    return metrics


def summary_table(m: dict) -> str:
    """Per-fold and overall figures, the headline metric first."""
    cols = [m["metric"]] + [c for c in ("logloss", "accuracy", "f1", "roc_auc", "ece") if c != m["metric"]]
    c = m.get("calibrated") or {}
    cal = {f["fold"]: f for f in c.get("folds", [])}  # per-fold calibrated figures, beside the raw ones
    more = ["cal_ece", "cal_logloss"] if cal else []
    rows = [
        [str(f["fold"]), str(f["n"])]
        + [_fmt(f[col]) for col in cols + ["confidence_gap"]]
        + [_fmt(cal[f["fold"]][k]) for k in ("ece", "logloss") if cal]
        for f in m["folds"]
    ]
    rows.append(["mean", ""] + [_fmt(m["cv_mean"][col]) for col in cols] + [""] * (1 + len(more)))
    rows.append(["std", ""] + [_fmt(m["cv_std"][col]) for col in cols] + [""] * (1 + len(more)))
    rows.append(
        ["OOF", str(m["n"])]
        + [_fmt(m[col]) for col in cols + ["confidence_gap"]]
        + [_fmt(c[k]) for k in ("ece", "logloss") if cal]
    )
    head = ["fold", "n"] + cols + ["gap"] + more
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [
        f"evaluate {m['experiment']}: {m['n']} OOF rows, {len(m['folds'])} folds, {len(m['classes'])} classes; "
        f"headline {m['metric']} {_fmt(m['headline'])} "
        f"(CV {_fmt(m['cv_mean'][m['metric']])} +- {_fmt(m['cv_std'][m['metric']])})",
        line(head),
    ] + [line(r) for r in rows]
    if cal:
        out.append(
            "gap: mean confidence - accuracy (> 0 over-confident); "
            "cal_*: each fold calibrated by what the other folds fitted"
        )
    out += _notes(m, c)
    return "\n".join(out)


def _notes(m: dict, c: dict) -> list[str]:
    """The lines under the table: TTA, calibration, adversarial validation and threshold, where ``m`` has them."""
    out = []
    v = m.get("tta_views")
    if v:
        out.append(
            f"TTA views {', '.join(v['views'])}: OOF log-loss {_fmt(v['logloss_with'])} with, "
            f"{_fmt(v['logloss_without'])} without -> "
            f"{'kept' if v['kept'] else 'dropped (predict uses ' + str(v['tta']) + ')'}"
        )
    w = m.get("oof_without_tta")
    if w:
        other = f"{m['metric']} {_fmt(w[m['metric']])}, " if m["metric"] != "logloss" else ""
        out.append(
            f"TTA {m['tta']}: scores of oof_tta.csv; without TTA ({w['file']}) {other}logloss {_fmt(w['logloss'])}"
        )
        if w["logloss"] < m["logloss"]:  # raw OOF: a transform the models were not trained to ignore blurs them
            out.append(
                f"warning: the TTA raises the OOF log-loss ({_fmt(w['logloss'])} without, {_fmt(m['logloss'])} with); "
                f"predict.tta: [identity] or fewer transforms may score better"
            )
    if c.get("skipped"):
        out.append("calibration: skipped (evaluate.calibrate false)")
    elif c:
        out.append(
            f"calibration: T = {c['temperature']:.3f}; log-loss {_fmt(c['raw_logloss'])} raw, "
            f"{_fmt(c['nested_logloss'])} with T fitted on the other folds -> "
            f"{'kept (predict applies it)' if c['kept'] else 'not kept'}; "
            f"ECE {_fmt(c['raw_ece'])} -> {_fmt(c['nested_ece'])}"
        )
        sh = c.get("shrink")
        if sh:
            out.append(
                f"shrink toward the class prior: a = {sh['a']:.4f}; "
                f"log-loss {_fmt(sh['base_logloss'])} -> {_fmt(sh['nested_logloss'])} "
                f"with a fitted on the other folds -> {'kept (predict applies it)' if sh['kept'] else 'not kept'}"
            )
    a = m.get("adversarial") or {}
    if a.get("validation"):
        v = a["validation"]
        out.append(
            f"adversarial validation: train vs test AUC {_fmt(a['auc'])}; "
            f"{m['metric']} {_fmt(v['headline_top'])} on the "
            f"{v['n_top']} most test-like rows (all rows {_fmt(m['headline'])}); importance-weighted log-loss "
            f"{_fmt(v['weighted']['logloss'])}, accuracy {_fmt(v['weighted']['accuracy'])} "
            f"(n_eff {v['weighted']['n_eff']:.0f}); "
            f"{a['n_exact_duplicates']} exact, {a['n_near_duplicates']} near train/test duplicates"
        )
    elif a.get("skipped"):
        out.append(f"adversarial validation: skipped ({a['skipped']})")
    t = m.get("threshold")
    if t:
        out.append(
            f"threshold: F1 {_fmt(t['f1_at_0.5'])} at 0.5, "
            f"{_fmt(t['f1_at_best_threshold'])} at p >= {t['best_threshold']:.3f} "
            f"(nested over folds {_fmt(t['f1_nested'])})"
        )
    return out
