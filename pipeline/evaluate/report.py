"""The evaluation report: PNG plots of the OOF predictions and one ``report.html`` beside them.

The pictures are drawn by ``pipeline.evaluate.plots`` (the score charts) and ``pipeline.evaluate.galleries``
(the images: confident mistakes, Grad-CAM, the adversarial section), all with ``matplotlib.figure.Figure``
(no pyplot, no display); this module runs them and renders the page, ``templates/report.html.j2`` (jinja2,
autoescaped), which refers to the PNGs by relative path, so ``report/`` opens offline and can be zipped or
copied whole. The folder is built under a temporary name and swapped in at the end: a crash leaves the old
report intact and a rerun leaves no stale pictures.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.schema import Config
from pipeline.data.table import Table
from pipeline.evaluate.galleries import plot_adversarial, plot_confident_errors, plot_gradcam
from pipeline.evaluate.plots import Figures, plot_confusion, plot_reliability, plot_roc_pr, plot_training_curves
from pipeline.runs.layout import RunDir
from pipeline.runs.predictions import probs_of
from pipeline.tasks import build_task

log = logging.getLogger(__name__)


def write_report(
    cfg: Config, table: Table, oof: pd.DataFrame, metrics: dict, calibrated: np.ndarray | None, shift=None
) -> Path:
    """Draw every picture and write ``report/report.html``; returns its path.

    ``oof`` is the checked OOF (oof.csv or oof_tta.csv) in the training table's row order; ``calibrated``
    the probabilities with the kept calibration, nested over folds (None when calibration is off);
    ``shift`` evaluate's adversarial analysis (``adversarial.EvaluateShift``) or None.
    """
    run = cfg.run_dir
    final = RunDir(path=run).report_dir
    tmp = Path(tempfile.mkdtemp(prefix=".report.", dir=run))
    try:
        figs = Figures(tmp)
        names = list(table.class_names)
        y = oof["target"].to_numpy()
        fold = oof["fold"].to_numpy()
        probs = probs_of(oof, names)
        plot_confusion(figs, metrics, names)
        plot_roc_pr(figs, y, probs, fold, names)
        plot_reliability(figs, y, probs, calibrated, cfg.evaluate.n_bins, metrics)
        plot_training_curves(figs, run, cfg.metric)
        plot_confident_errors(figs, table, oof, probs, names)
        if cfg.evaluate.gradcam_samples:
            plot_gradcam(figs, cfg, table, oof, probs, names)
        adv = plot_adversarial(tmp, table, shift) if shift is not None and shift.record is not None else None
        (tmp / "report.html").write_text(render_html(cfg, metrics, figs, adv))
        for note in figs.notes:
            log.info(f"note: {note}")
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be shared
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / "report.html"


# ---- HTML ------------------------------------------------------------------------------

_SCORE_COLUMNS = ("logloss", "accuracy", "precision", "recall", "f1", "f1_macro", "f1_weighted", "roc_auc", "ece")


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


@functools.cache
def _template():
    """report.html.j2, shipped in the package. Autoescape is on for it (select_autoescape's default list
    has no ``.j2``, hence the explicit one), so a class name or id can never inject markup."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("pipeline.evaluate", "templates"),
        undefined=StrictUndefined,
        autoescape=select_autoescape(["html", "html.j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2")


RACE_COLUMNS = ("candidate", "round", "images", "epochs", "seconds", "score", "logloss", "accuracy", "verdict")


def render_html(cfg: Config, m: dict, figs: Figures, adv: dict | None = None) -> str:
    """The report page from metrics.json's contents and the pictures drawn; the markup is the template's."""
    metric = m["metric"]
    cols = [metric] + [c for c in _SCORE_COLUMNS if c != metric]
    rows = [[f"fold {f['fold']}", str(f["n"])] + [_f(f[c]) for c in cols] for f in m["folds"]]
    rows.append(["mean over folds", ""] + [_f(m["cv_mean"][c]) for c in cols])
    rows.append(["std over folds", ""] + [_f(m["cv_std"][c]) for c in cols])
    rows.append(["all OOF rows", str(m["n"])] + [_f(m[c]) for c in cols])
    per_class = [
        [c, _f(v["precision"]), _f(v["recall"]), _f(v["f1"]), str(v["support"])]
        for c, v in (m.get("per_class") or {}).items()
    ]
    cal = m.get("calibrated") or {}
    cal_rows = [
        [
            f"fold {f['fold']}",
            str(f["n"]),
            _f(f["raw_confidence_gap"]),
            _f(f["raw_ece"]),
            _f(f["confidence_gap"]),
            _f(f["ece"]),
            _f(f["logloss"]),
        ]
        for f in cal.get("folds", [])
    ]
    return (
        _template().render(
            cal_header=[
                "",
                "rows",
                "confidence - accuracy",
                "ECE",
                "calibrated: confidence - accuracy",
                "calibrated: ECE",
                "calibrated: log-loss",
            ],
            cal_rows=cal_rows,
            competition=cfg.competition,
            name=cfg.name,
            config_path=str(cfg.path),
            run_dir=str(cfg.run_dir),
            m=m,
            metric=metric,
            classes=list(m["classes"]),
            f=_f,
            scores_note=build_task(len(m["classes"])).scores_note(list(m["classes"])),
            score_header=["", "rows"] + cols,
            score_rows=rows,
            per_class_rows=per_class,
            cal=m.get("calibrated") or {},
            threshold=m.get("threshold"),
            notes=figs.notes,
            figures=figs.items,
            adv=adv,
            adv_metrics=m.get("adversarial") or {},
            race=(cfg.plan or {}).get("race"),
            race_header=list(RACE_COLUMNS),
            race_rows=[
                [_f(r.get(k)) if isinstance(r.get(k), float) else r.get(k) for k in RACE_COLUMNS]
                for r in ((cfg.plan or {}).get("race") or {}).get("table", [])
            ],
        )
        + "\n"
    )
