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
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.core.metrics import METRICS, cv_std, logloss
from pipeline.runs.layout import RunDir
from pipeline.runs.predictions import (
    check_oof_against_data,
    class_names_of,
    csv_line,
    probs_of,
    read_predictions,
    write_predictions,
)
from pipeline.runs.records import read_metrics
from pipeline.tasks import build_task
from pipeline.tasks.calibration import calibrate, confidence_gap, ece

log = logging.getLogger(__name__)

# Figures evaluate reports beside the registered metrics (``metrics.METRICS``), True when larger is
# better; per-fold scalars (cv_mean/cv_std, the terminal table) are both.
EXTRA_SCALARS = {"precision": True, "recall": True, "f1_macro": True, "f1_weighted": True, "ece": False}


def scalars() -> list[str]:
    """Per-fold scalars, read live: a metric registered after import is among them."""
    return list(METRICS) + [k for k in EXTRA_SCALARS if k not in METRICS]


def greater_is_better(name: str) -> bool:
    return METRICS.get(name).greater_is_better if name in METRICS else EXTRA_SCALARS.get(name, True)


# ---- metrics ---------------------------------------------------------------------------


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, eps: float = 1e-15, n_bins: int = 10, class_names: list[str] | None = None
) -> dict:
    """Every figure of one set of predictions: each registered metric, and scikit-learn's others."""
    k = probs.shape[1]
    labels = np.arange(k)
    pred = probs.argmax(1)
    m: dict = {"n": int(len(y)), **{name: metric(y, probs, eps) for name, metric in METRICS.items()}}
    p, r = build_task(k).precision_recall(y, pred, k)  # binary: of the positive class; multiclass: macro
    m.update(precision=p, recall=r)
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average=avg, labels=labels, zero_division=0)
        m.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    m["ece"] = ece(y, probs, n_bins)
    m["confidence_gap"] = confidence_gap(y, probs)
    m["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels).tolist()
    m["confusion_matrix_normalized"] = skm.confusion_matrix(y, pred, labels=labels, normalize="true").tolist()
    names = class_names or [str(c) for c in labels]
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    m["per_class"] = {
        names[c]: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]), "support": int(s[c])}
        for c in labels
    }
    return m


def fold_metrics(y, probs, fold, eps, n_bins, class_names) -> tuple[list[dict], dict, dict]:
    """Per-fold figures and their mean / standard deviation (``metrics.cv_std``) across folds."""
    folds = []
    for k in np.unique(fold):
        m = fold == k
        folds.append({"fold": int(k), **classification_metrics(y[m], probs[m], eps, n_bins, class_names)})
    mean, std = {}, {}
    for key in scalars():
        v = np.array([f[key] for f in folds], dtype=float)
        ok = v[~np.isnan(v)]
        mean[key] = float(ok.mean()) if len(ok) else float("nan")
        std[key] = cv_std(ok) if len(ok) else float("nan")
    return folds, mean, std


def _check_trained_config(cfg: Config, run: RunDir) -> None:
    """oof.csv must come from this config's training sections (else its figures describe another model)."""
    have, want = run.snapshot_hash("train"), run.train_hash
    if have is not None and have != want:
        raise PipelineError(
            f"{run.snapshot('train')}: oof.csv was trained under another config (train hash {have}, this config {want}); "
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


def _calibration(cfg: Config, y, probs, fold) -> tuple[dict, dict, np.ndarray | None]:
    """(calibration.json, metrics["calibrated"], nested-calibrated probabilities or None)."""
    from pipeline.config.auto import is_logloss

    ev, task = cfg.evaluate, build_task(probs.shape[1])
    if not ev.calibrate or "temperature" not in task.calibrations:
        return (
            {"temperature": 1.0, "kept": False, "skipped": True},
            {"skipped": True, "temperature": 1.0, "kept": False},
            None,
        )
    # the shrink toward the prior guards a log-loss against confident mistakes; other metrics do not score it
    summary, cal_probs = calibrate(
        y, probs, fold, ev.eps, ev.n_bins, shrink=is_logloss(cfg.metric) and "shrink" in task.calibrations
    )
    calib = {
        k: summary[k]
        for k in ("temperature", "kept", "nested_logloss", "raw_logloss", "in_sample_logloss", "fold_temperatures")
    }
    if "shrink" in summary:
        calib["shrink"] = summary["shrink"]
    per_fold = []
    for k in np.unique(fold):
        m = fold == k
        per_fold.append(
            {
                "fold": int(k),
                "n": int(m.sum()),
                "logloss": logloss(y[m], cal_probs[m], ev.eps),
                "ece": ece(y[m], cal_probs[m], ev.n_bins),
                "raw_ece": ece(y[m], probs[m], ev.n_bins),
                "confidence_gap": confidence_gap(y[m], cal_probs[m]),
                "raw_confidence_gap": confidence_gap(y[m], probs[m]),
            }
        )
    # honest calibrated figures: every fold calibrated by what was fitted on the other folds
    metrics = {**summary, "logloss": summary["calibrated_logloss"], "ece": summary["calibrated_ece"], "folds": per_fold}
    return calib, metrics, cal_probs


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


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


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
        f"headline {m['metric']} {_fmt(m['headline'])} (CV {_fmt(m['cv_mean'][m['metric']])} +- {_fmt(m['cv_std'][m['metric']])})",
        line(head),
    ] + [line(r) for r in rows]
    if cal:
        out.append(
            "gap: mean confidence - accuracy (> 0 over-confident); cal_*: each fold calibrated by what the other folds fitted"
        )
    v = m.get("tta_views")
    if v:
        out.append(
            f"TTA views {', '.join(v['views'])}: OOF log-loss {_fmt(v['logloss_with'])} with, {_fmt(v['logloss_without'])} "
            f"without -> {'kept' if v['kept'] else 'dropped (predict uses ' + str(v['tta']) + ')'}"
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
            f"calibration: T = {c['temperature']:.3f}; log-loss {_fmt(c['raw_logloss'])} raw, {_fmt(c['nested_logloss'])} "
            f"with T fitted on the other folds -> {'kept (predict applies it)' if c['kept'] else 'not kept'}; "
            f"ECE {_fmt(c['raw_ece'])} -> {_fmt(c['nested_ece'])}"
        )
        sh = c.get("shrink")
        if sh:
            out.append(
                f"shrink toward the class prior: a = {sh['a']:.4f}; log-loss {_fmt(sh['base_logloss'])} -> {_fmt(sh['nested_logloss'])} "
                f"with a fitted on the other folds -> {'kept (predict applies it)' if sh['kept'] else 'not kept'}"
            )
    a = m.get("adversarial") or {}
    if a.get("validation"):
        v = a["validation"]
        out.append(
            f"adversarial validation: train vs test AUC {_fmt(a['auc'])}; {m['metric']} {_fmt(v['headline_top'])} on the "
            f"{v['n_top']} most test-like rows (all rows {_fmt(m['headline'])}); importance-weighted log-loss "
            f"{_fmt(v['weighted']['logloss'])}, accuracy {_fmt(v['weighted']['accuracy'])} (n_eff {v['weighted']['n_eff']:.0f}); "
            f"{a['n_exact_duplicates']} exact, {a['n_near_duplicates']} near train/test duplicates"
        )
    elif a.get("skipped"):
        out.append(f"adversarial validation: skipped ({a['skipped']})")
    t = m.get("threshold")
    if t:
        out.append(
            f"threshold: F1 {_fmt(t['f1_at_0.5'])} at 0.5, {_fmt(t['f1_at_best_threshold'])} at p >= {t['best_threshold']:.3f} "
            f"(nested over folds {_fmt(t['f1_nested'])})"
        )
    return "\n".join(out)


# ---- compare ---------------------------------------------------------------------------


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
