"""What ``pipeline tune`` leaves under ``runs/<competition>/tune/<study>/``.

  best.yaml        the best trial's parameters (and the keys fixed on the command line) as
                   ``section.key: value`` overrides; also copied to ``runs/<competition>/tune/best.yaml``
                   (``pipeline train CONFIG --params best.yaml``); searched augmentation
                   parameters go in as the whole ``augment:`` list
  trials.csv       every trial of the study (``study.trials_dataframe()``), all workers'
  plots/           history, importances, parallel, slice, intermediate: ``.html`` (plotly, offline:
                   plotly.min.js is written once beside them) and ``.png`` (matplotlib)

Files are written to a temporary name and renamed, so concurrent workers never leave a torn file.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import yaml

from pipeline.core.io import atomic_path, atomic_write_csv, atomic_write_text

log = logging.getLogger(__name__)


def best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


def write_best(study, out_dir: Path, space, base: dict, cfg, fixed: dict, metric: str) -> Path | None:
    """``<study>/best.yaml``, and a copy at ``runs/<competition>/tune/best.yaml`` (the study written
    last). Keys given on the command line during the search (``fixed``) are part of every trial, so
    they go in too: the file alone reproduces the best trial."""
    bt = best_trial(study)
    if bt is None:
        return None
    values = {k: v for k, v in bt.params.items() if space.get(k) is not None or not k.startswith("augment.")}
    overrides = {**{k: v for k, v in fixed.items() if k not in values}, **space.overrides(base, values)}
    path = out_dir / "best.yaml"
    folds = bt.user_attrs.get("folds")
    head = [
        f"# pipeline tune: best of study {study.study_name!r}: trial {bt.number}, {metric} {bt.value:.6g}"
        + (f" (mean over folds {folds})" if folds is not None else ""),
        f"# use: pipeline train {cfg.path} --params {path}",
    ]
    if fixed:
        head.append("# fixed on the command line during the search (included): " + ", ".join(fixed))
    body = yaml.safe_dump(overrides, sort_keys=False, default_flow_style=False) if overrides else "{}\n"
    text = "\n".join(head) + "\n" + body
    atomic_write_text(path, text)
    atomic_write_text(out_dir.parent / "best.yaml", text)
    return path


def write_trials(study, out_dir: Path) -> Path:
    path = out_dir / "trials.csv"
    df = study.trials_dataframe(multi_index=False)
    atomic_write_csv(path, df)
    return path


PLOTS = ("history", "importances", "parallel", "slice", "intermediate")


def write_plots(study, out_dir: Path) -> list[Path]:
    """Plotly HTML and matplotlib PNG of each plot; a plot that cannot be drawn yet (e.g. importances
    with one finished trial) is skipped with a note."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        log.info("plots: no completed trial yet; skipped")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as pv
    import optuna.visualization.matplotlib as pm
    from optuna.importance import FanovaImportanceEvaluator

    imp = dict(evaluator=FanovaImportanceEvaluator(seed=0))
    makers = {
        "history": (pv.plot_optimization_history, pm.plot_optimization_history, {}),
        "importances": (pv.plot_param_importances, pm.plot_param_importances, imp),
        "parallel": (pv.plot_parallel_coordinate, pm.plot_parallel_coordinate, {}),
        "slice": (pv.plot_slice, pm.plot_slice, {}),
        "intermediate": (pv.plot_intermediate_values, pm.plot_intermediate_values, {}),
    }
    pdir = out_dir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, (plotly_fn, mpl_fn, kw) in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = plotly_fn(study, **kw)
                with atomic_path(pdir / f"{name}.html") as tmp:
                    fig.write_html(str(tmp), include_plotlyjs="directory", full_html=True)
                written.append(pdir / f"{name}.html")
                ax = mpl_fn(study, **kw)
                first = ax.flat[0] if hasattr(ax, "flat") else ax
                mfig = first.figure
                with atomic_path(pdir / f"{name}.png") as tmp:
                    mfig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
                plt.close(mfig)
                written.append(pdir / f"{name}.png")
        except Exception as e:  # not enough trials, one distinct value, ...
            plt.close("all")
            skipped.append(f"{name} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if written:
        log.info(f"plots: {pdir}/ ({', '.join(n for n in PLOTS if (pdir / f'{n}.html').exists())}; .html and .png)")
    if skipped:
        log.info(f"plots skipped: {'; '.join(skipped)}")
    return written


def fmt_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)
