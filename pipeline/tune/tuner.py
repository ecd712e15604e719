"""Tune stage: Optuna search over ``tune.space``, cross-validated, pruned, resumable, distributed.

``pipeline tune CONFIG [section.key=value ...] [--n-trials N] [--max-trials M] [--timeout S]
[--storage URL] [--study NAME]``; in Python ``tune(load_config(path))``.

Objective
    the mean validation metric (``metric:``; its direction from ``pipeline.core.metrics``) over
    ``tune.folds`` (a subset, for speed) or all folds of the saved folds file (written first
    when missing), each fold's value taken at its best epoch as ``pipeline train`` picks it.
    Every trial trains into its own ``runs/<competition>/tune/<study>/trial_<n>/`` (train.log
    there holds its training output) with ``train.seed`` only and no refit.
Pruning (``tune.pruner``, a name in ``PRUNERS``, pipeline/config/registries.py)
    ``median`` (default), ``halving``, ``hyperband``: the validation metric after each epoch of
    the first tuned fold, step = epoch; ``wilcoxon``: each fold's value, step = fold number, so
    trials are compared on the same folds (it needs about 4 finished folds before it can reach
    p < 0.1: use it with many folds or repeats); ``none``. A pruned trial stops at once (the
    callback raises ``optuna.TrialPruned`` inside training) and its checkpoints are deleted.
Samplers (``tune.sampler``, a name in ``SAMPLERS``, pipeline/config/registries.py)
    ``tpe`` (default; multivariate, grouped when the space has conditions), ``random``,
    ``cmaes`` (numeric spaces only: a categorical or conditional parameter is refused rather than
    silently sampled at random; needs the ``cmaes`` package). The sampler is rebuilt for each
    trial with a seed derived from (``tune.seed``, trial number): one worker repeats its search
    exactly, and parallel workers started with the same seed do not draw the same parameters.
Storage, resume, workers
    default ``sqlite:///runs/<competition>/tune/optuna.db``; ``--storage`` takes any SQLAlchemy
    URL (``postgresql://user@host:5432/db`` uses psycopg 3). Rerunning a command resumes its study
    (``--n-trials 3`` then ``--n-trials 2`` leaves 5 trials); the same command on many machines
    shares one study. Each running trial records a heartbeat every ``tune.heartbeat_s``; a trial
    silent for ``tune.grace_s`` (a killed worker) is marked FAIL and re-queued with the same
    parameters (up to ``tune.max_retry`` times) by the next worker that starts a trial.
    ``--n-trials`` counts this process's trials; ``--max-trials`` caps the study: a worker stops
    when finished + running + queued trials reach it, and a trial that other workers' trials
    pushed over the cap in the same instant is marked FAIL ("over --max-trials") without
    training, so exactly M trials COMPLETE or PRUNED.
Outputs (``pipeline/tune/report.py``)
    ``runs/<competition>/tune/<study>/best.yaml`` (``pipeline train CONFIG --params best.yaml``),
    ``trials.csv``, ``plots/``. The storage is a plain Optuna RDB storage, so
    ``optuna-dashboard sqlite:///runs/<competition>/tune/optuna.db`` (or the PostgreSQL URL) shows
    the study live.
Modules
    this one runs the stage; ``pipeline/tune/study.py`` opens the storage and the study,
    ``pipeline/tune/objective.py`` trains one trial and logs each finished one.
"""

from __future__ import annotations

import logging
import re
import time
import warnings

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import METRICS
from pipeline.runs.layout import tune_dir
from pipeline.tune.objective import MAX_FAILS_IN_A_ROW, Objective, Progress
from pipeline.tune.report import best_trial, fmt_value, write_best, write_plots, write_trials
from pipeline.tune.samplers import PRUNERS, build_pruner, build_sampler, check_sampler
from pipeline.tune.space import Space, _lookup, check_augment, parse_space
from pipeline.tune.study import _counted, default_storage, open_storage, open_study

log = logging.getLogger(__name__)

# ---- the stage --------------------------------------------------------------------------


def tune(
    cfg: Config,
    n_trials: int | None = None,
    max_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    pinned: list[str] | None = None,
):
    """Run (or resume) the study; returns the ``optuna.Study``. See the module docstring."""
    for flag, v in (("--n-trials", n_trials), ("--max-trials", max_trials)):
        if v is not None and v < 1:
            raise PipelineError(f"command line: {flag} {v}; expected a positive number of trials")
    if timeout is not None and not timeout > 0:
        raise PipelineError(f"command line: --timeout {timeout:g}; expected a positive number of seconds")
    from pipeline.plan.store import planned

    cfg = planned(cfg)  # trials start from the base config's plan (a trial's own budget is a cap)
    study_name = study_name or cfg.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", study_name or ""):
        raise PipelineError(
            f"command line: --study {study_name!r}; expected a name of letters, digits, '.', '_' or '-'"
        )
    space = parse_space(cfg, pinned or [])
    path = cfg.path or "config"
    if space.pinned:
        log.info(
            "pinned on the command line, left out of the search: "
            + ", ".join(f"{k}={fmt_value(v)}" for k, v in space.pinned.items())
        )
    if not space.params:
        why = " (every key is pinned on the command line)" if space.pinned else ""
        raise PipelineError(
            f"{path}: tune.space: nothing to search{why}; expected keys like "
            f"train.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}"
        )
    check_sampler(cfg, space)

    with warnings.catch_warnings():
        import optuna
        from optuna.exceptions import ExperimentalWarning

        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is printed here instead
        try:
            fixed = {k: _lookup(cfg.to_dict(), k) for k in dict.fromkeys(pinned or [])}
            return _tune(cfg, space, fixed, n_trials, max_trials, timeout, storage, study_name)
        finally:
            optuna.logging.set_verbosity(verbosity)


def _tune(cfg, space, fixed, n_trials, max_trials, timeout, storage_url, study_name):
    import optuna
    from optuna.trial import TrialState

    out_dir = tune_dir(cfg, study_name)
    storage = open_storage(storage_url or default_storage(cfg), cfg.tune)
    shown = storage.engine.url.render_as_string(hide_password=True)
    table, folds, n_folds = _tuned_folds(cfg)
    check_augment(space, cfg, table.value_range, table.channels, table.image_size)

    direction = "maximize" if METRICS.get(cfg.metric).greater_is_better else "minimize"
    study = open_study(
        cfg, storage, study_name, direction, build_sampler(cfg, space), build_pruner(cfg, space, n_folds), shown
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.storages.fail_stale_trials(study)  # trials of dead workers: FAIL + re-queued before counting

    base = trial_base(cfg, space)
    _log_plan(cfg, space, folds, n_folds, direction, study, shown, out_dir, n_trials, max_trials, timeout)

    objective = Objective(
        cfg=cfg,
        space=space,
        base=base,
        table=table,
        folds=folds,
        study=study,
        out_dir=out_dir,
        study_name=study_name,
        max_trials=max_trials,
    )
    progress = Progress(cfg=cfg, space=space, base=base, fixed=fixed, out_dir=out_dir)
    callbacks = [progress]
    if max_trials:
        callbacks.append(
            optuna.study.MaxTrialsCallback(
                max_trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
            )
        )
    t0 = time.time()
    n_run = n_trials if n_trials is not None else (None if timeout else cfg.tune.n_trials)
    try:
        if max_trials and _counted(study) >= max_trials:
            log.info(
                f"study {study_name!r} already has {_counted(study)} finished, running or queued trials "
                f"(--max-trials {max_trials}); nothing to run"
            )
        else:
            study.optimize(objective, n_trials=n_run, timeout=timeout, catch=(Exception,), callbacks=callbacks)
    finally:
        write_trials(study, out_dir)
        best_path = write_best(study, out_dir, space, base, cfg, fixed, cfg.metric)
    _log_outcome(cfg, study, study_name, out_dir, best_path, shown, time.time() - t0)
    if progress.fails_in_a_row >= MAX_FAILS_IN_A_ROW:
        raise PipelineError(
            f"tune stopped: {progress.fails_in_a_row} trials in a row failed; last {progress.last_fail} "
            f"(traceback in {out_dir}/trial_<n>/train.log)"
        )
    return study


def trial_base(cfg: Config, space: Space) -> dict:
    """The config dict every trial starts from: one seed, no refit, and no epoch cut of the plan's when
    the epochs or the batch are searched (it was sized for the plan's own count and batch, not a trial's)."""
    base = cfg.to_dict()
    base["train"]["seeds"] = None
    base["train"]["refit"] = False
    if "train.max_steps_per_epoch" in (cfg.plan or {}).get("values", {}) and any(
        space.get(k) for k in ("train.epochs", "train.batch_size")
    ):
        base["train"]["max_steps_per_epoch"] = None
    return base


def _tuned_folds(cfg: Config):
    """(table, tuned folds, number of folds): the data and folds every trial shares (the folds
    file is written first when missing)."""
    from pipeline.data.folds import load_folds, run_fold
    from pipeline.data.formats import read_table

    table = read_table(cfg, "train")
    if not cfg.folds_path.is_file():
        log.info(f"{cfg.folds_path} not found; writing it first (pipeline fold)")
        run_fold(cfg, table)
    fold_of = load_folds(cfg, table)
    n_folds = int(fold_of.max()) + 1
    folds = list(cfg.tune.folds) if cfg.tune.folds is not None else list(range(n_folds))
    bad = [k for k in folds if k >= n_folds]
    if bad:
        raise PipelineError(f"{cfg.path}: tune.folds: no fold {bad[0]}; {cfg.folds_path} has folds 0..{n_folds - 1}")
    return table, folds, n_folds


def _log_plan(cfg, space, folds, n_folds, direction, study, shown, out_dir, n_trials, max_trials, timeout) -> None:
    """What this process is about to search, how, and where it writes."""
    tc = cfg.tune
    subset = "all folds" if len(folds) == n_folds else f"a subset (tune.folds) of {n_folds}"
    n_before = len(study.trials)
    log.info(
        f"tune {study.study_name}: {len(space.params)} parameters; objective {direction} mean val_{cfg.metric} "
        f"over folds {folds} ({subset}) of {cfg.folds_path}"
    )
    for p in space.params:
        log.info(f"  {p.describe()}")
    how = PRUNERS.get(tc.pruner).label.format(fold=folds[0])
    budget = (
        ", ".join(
            x
            for x in (
                f"{n_trials} trials" if n_trials else "",
                f"timeout {timeout:g}s" if timeout else "",
                f"study capped at {max_trials}" if max_trials else "",
            )
            if x
        )
        or f"{tc.n_trials} trials (tune.n_trials)"
    )
    log.info(f"  sampler {tc.sampler} (seed {tc.seed}), {how}; this process: {budget}")
    log.info(
        f"  storage {shown}, study {study.study_name!r}: "
        + (f"resuming with {n_before} trials" if n_before else "new")
        + f"; heartbeat {tc.heartbeat_s}s; trial runs and train.log under {out_dir}/trial_<n>/"
    )
    if tc.pruner == "wilcoxon" and len(folds) < 4:
        log.info(
            f"  note: WilcoxonPruner cannot reach p < {tc.p_threshold:g} with {len(folds)} folds, "
            "so nothing is pruned; use tune.pruner median or more folds"
        )


def _log_outcome(cfg, study, study_name, out_dir, best_path, shown, seconds) -> None:
    from optuna.trial import TrialState

    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    log.info(
        f"study {study_name!r}: {len(study.trials)} trials ({', '.join(f'{n} {k}' for k, n in counts.items() if n)}); "
        f"this run {seconds:.0f}s; wrote {out_dir / 'trials.csv'}"
    )
    if cfg.tune.plots:
        write_plots(study, out_dir)
    bt = best_trial(study)
    if bt is not None:
        log.info(
            f"best: trial {bt.number}, {cfg.metric} {bt.value:.4f}: "
            + " ".join(f"{k}={fmt_value(v)}" for k, v in bt.params.items())
        )
        log.info(f"wrote {best_path}; use: pipeline train {cfg.path} --params {best_path}")
    log.info(f"dashboard: optuna-dashboard {shown}")
