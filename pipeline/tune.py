"""Tune stage: Optuna search over ``tune.space``, cross-validated, pruned, resumable, distributed.

``pipeline tune CONFIG [section.key=value ...] [--n-trials N] [--max-trials M] [--timeout S]
[--storage URL] [--study NAME]``; in Python ``tune(load_config(path))``.

Objective
    the mean validation metric (``metric:``; its direction from ``pipeline.metrics``) over
    ``tune.folds`` (a subset, for speed) or all folds of the saved folds file (written first
    when missing), each fold's value taken at its best epoch as ``pipeline train`` picks it.
    Every trial trains into its own ``runs/<competition>/tune/<study>/trial_<n>/`` (train.log
    there holds its training output) with ``train.seed`` only and no refit.
Pruning (``tune.pruner``)
    ``median`` (default), ``halving``, ``hyperband``: the validation metric after each epoch of
    the first tuned fold, step = epoch; ``wilcoxon``: each fold's value, step = fold number, so
    trials are compared on the same folds (it needs about 4 finished folds before it can reach
    p < 0.1: use it with many folds or repeats); ``none``. A pruned trial stops at once (the
    callback raises ``optuna.TrialPruned`` inside training) and its checkpoints are deleted.
Samplers (``tune.sampler``)
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
Outputs (``pipeline/tune_report.py``)
    ``runs/<competition>/tune/<study>/best.yaml`` (``pipeline train CONFIG --params best.yaml``),
    ``trials.csv``, ``plots/``. The storage is a plain Optuna RDB storage, so
    ``optuna-dashboard sqlite:///runs/<competition>/tune/optuna.db`` (or the PostgreSQL URL) shows
    the study live.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import time
import traceback
import warnings
from pathlib import Path

from .config import Config
from .errors import PipelineError
from .logs import to_file
from .metrics import GREATER_IS_BETTER, cv_std
from .search_space import Space, _lookup, check_augment, parse_space, trial_seed
from .tune_report import best_trial, fmt_value, write_best, write_plots, write_trials

log = logging.getLogger(__name__)

EPOCH_PRUNERS = ("median", "halving", "hyperband")
MAX_FAILS_IN_A_ROW = 3


class OverBudget(Exception):
    """This trial would exceed --max-trials: it is marked FAIL without training."""


# ---- storage --------------------------------------------------------------------------

def default_storage(cfg: Config) -> str:
    path = (Path("runs") / cfg.competition / "tune" / "optuna.db").resolve()
    return f"sqlite:///{path}"


def open_storage(url: str, tc, flag: str = "--storage"):
    """An RDBStorage with heartbeat and retry of dead workers' trials; one-line errors."""
    import optuna
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:
        raise PipelineError(f"{flag} {url!r}: not a database URL; expected e.g. sqlite:///runs/tune.db "
                            "or postgresql://user@host:5432/dbname") from None
    if u.drivername in ("postgresql", "postgres"):  # psycopg 3 is the driver the project installs
        u = u.set(drivername="postgresql+psycopg")
    shown = u.render_as_string(hide_password=True)
    backend = u.get_backend_name()
    kw: dict = {}
    if backend == "postgresql":
        kw = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    elif backend == "mysql":
        kw = {"connect_args": {"connect_timeout": 10}}
    elif backend == "sqlite":
        kw = {"connect_args": {"timeout": 60}}  # concurrent workers wait for the write lock
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    def connect():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat and retry are "experimental" in optuna
            retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
            if retry_cls is not None:  # optuna >= 4.9
                cb = {"heartbeat_stale_trial_callback": retry_cls(max_retry=tc.max_retry)}
            else:
                cb = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=tc.max_retry)}
            return optuna.storages.RDBStorage(u.render_as_string(hide_password=False), engine_kwargs=kw,
                                              heartbeat_interval=tc.heartbeat_s, grace_period=tc.grace_s, **cb)

    try:
        for attempt in range(6):
            try:
                return connect()
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers starting together on an empty database race to create optuna's tables
                # (PostgreSQL: duplicate key in pg_type); the loser retries and finds them made
                if attempt == 5:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except sqlalchemy.exc.NoSuchModuleError:
        raise PipelineError(f"{flag} {shown}: unknown database kind {u.drivername!r}; expected sqlite:// or postgresql:// "
                            "(any SQLAlchemy URL whose driver is installed)") from None
    except ImportError as e:
        raise PipelineError(f"{flag} {shown}: the database driver is not installed ({e.name or e})") from None
    except sqlalchemy.exc.OperationalError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise PipelineError(f"{flag} {shown}: cannot connect ({reason[0] if reason else type(e).__name__}); "
                            "is the server running and the URL right?") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise PipelineError(f"{flag} {shown}: database error ({reason[0] if reason else type(e).__name__})") from None
    except RuntimeError as e:  # optuna's schema version check
        raise PipelineError(f"{flag} {shown}: {str(e).splitlines()[0]} (`optuna storage upgrade --storage URL`)") from None


# ---- sampler and pruner ----------------------------------------------------------------

def _sampler_factory(cfg: Config, space: Space):
    import optuna

    tc = cfg.tune
    if tc.sampler == "tpe":
        def make(seed):
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tc.n_startup_trials, multivariate=True,
                                              group=space.conditional, constant_liar=True)
    elif tc.sampler == "random":
        def make(seed):
            return optuna.samplers.RandomSampler(seed=seed)
    else:
        def make(seed):
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=tc.n_startup_trials,
                                                independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                                                warn_independent_sampling=False)
    return make


def check_sampler(cfg: Config, space: Space) -> None:
    if cfg.tune.sampler != "cmaes":
        return
    path = cfg.path or "config"
    for p in space.params:
        if p.type == "categorical":
            raise PipelineError(f"{path}: tune.space.{p.key}: tune.sampler cmaes searches numeric spaces only; "
                                "use tune.sampler tpe (or random) for categorical parameters")
        if p.when:
            raise PipelineError(f"{path}: tune.space.{p.key}: tune.sampler cmaes cannot search conditional parameters; "
                                "use tune.sampler tpe")
    if len(space.params) < 2:
        raise PipelineError(f"{path}: tune.sampler: cmaes needs at least 2 searched parameters; use tpe or random")
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise PipelineError(f"{path}: tune.sampler: cmaes needs the 'cmaes' package (pip install cmaes)") from None


def make_sampler(cfg: Config, space: Space):
    import optuna

    factory = _sampler_factory(cfg, space)

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        """The configured sampler, rebuilt per trial with a seed from (tune.seed, trial number)."""

        def __init__(self):
            self.inner = factory(cfg.tune.seed)

        def before_trial(self, study, trial):
            self.inner = factory(trial_seed(cfg.tune.seed, trial.number))
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self.inner.reseed_rng()

    return TrialSeededSampler()


def make_pruner(cfg: Config, space: Space, n_folds: int):
    import optuna

    tc = cfg.tune
    if tc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.n_startup_trials, n_warmup_steps=0)
    if tc.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if tc.pruner == "hyperband":
        p = space.get("train.epochs")
        max_epochs = int(p.high if p is not None and p.type == "int" else max(p.choices) if p is not None else cfg.train.epochs)
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1), reduction_factor=3)
    if tc.pruner == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=tc.p_threshold, n_startup_steps=2)
    return optuna.pruners.NopPruner()


# ---- study ----------------------------------------------------------------------------

def open_study(cfg: Config, storage, study_name: str, direction: str, sampler, pruner, shown_url: str):
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
    except Exception as e:  # e.g. the DB refused a write
        raise PipelineError(f"--storage {shown_url}: cannot open study {study_name!r} ({str(e).splitlines()[0]})") from None
    if len(study.directions) != 1:
        raise PipelineError(f"--study {study_name}: exists in {shown_url} as a multi-objective study; use another --study name")
    have = study.direction.name.lower()
    if have != direction:
        raise PipelineError(f"--study {study_name}: exists in {shown_url} and {have}s, but metric {cfg.metric} is "
                            f"{direction}d; use another --study name")
    attrs = study.user_attrs
    if "metric" in attrs and attrs["metric"] != cfg.metric:
        raise PipelineError(f"--study {study_name}: exists in {shown_url} for metric {attrs['metric']}, this config's "
                            f"metric is {cfg.metric}; use another --study name")
    if "metric" not in attrs:
        study.set_user_attr("metric", cfg.metric)
        study.set_user_attr("competition", cfg.competition)
    return study


def _counted(study, before: int | None = None) -> int:
    from optuna.trial import TrialState

    ts = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING))
    return sum(1 for t in ts if before is None or t.number < before)


# ---- the stage --------------------------------------------------------------------------

def tune(cfg: Config, n_trials: int | None = None, max_trials: int | None = None, timeout: float | None = None,
         storage: str | None = None, study_name: str | None = None, pinned: list[str] | None = None):
    """Run (or resume) the study; returns the ``optuna.Study``. See the module docstring."""
    for flag, v in (("--n-trials", n_trials), ("--max-trials", max_trials)):
        if v is not None and v < 1:
            raise PipelineError(f"command line: {flag} {v}; expected a positive number of trials")
    if timeout is not None and not timeout > 0:
        raise PipelineError(f"command line: --timeout {timeout:g}; expected a positive number of seconds")
    study_name = study_name or cfg.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", study_name or ""):
        raise PipelineError(f"command line: --study {study_name!r}; expected a name of letters, digits, '.', '_' or '-'")
    space = parse_space(cfg, pinned or [])
    path = cfg.path or "config"
    if space.pinned:
        log.info("pinned on the command line, left out of the search: " + ", ".join(f"{k}={fmt_value(v)}" for k, v in space.pinned.items()))
    if not space.params:
        why = " (every key is pinned on the command line)" if space.pinned else ""
        raise PipelineError(f"{path}: tune.space: nothing to search{why}; expected keys like train.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}")
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

    from .fold import load_folds, run_fold
    from .formats import read_table

    out_dir = Path("runs") / cfg.competition / "tune" / study_name
    url = storage_url or default_storage(cfg)
    storage = open_storage(url, cfg.tune)
    shown = storage.engine.url.render_as_string(hide_password=True)

    # data and folds, shared by every trial
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
    check_augment(space, cfg, table.value_range, table.channels, table.image_size)

    direction = "maximize" if GREATER_IS_BETTER[cfg.metric] else "minimize"
    sampler, pruner = make_sampler(cfg, space), make_pruner(cfg, space, n_folds)
    study = open_study(cfg, storage, study_name, direction, sampler, pruner, shown)
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.storages.fail_stale_trials(study)  # trials of dead workers: FAIL + re-queued before counting

    base = cfg.to_dict()
    base["train"]["seeds"] = None
    base["train"]["refit"] = False
    mname = f"val_{cfg.metric}"
    epoch_wise = cfg.tune.pruner in EPOCH_PRUNERS
    first = folds[0]
    subset = "all folds" if len(folds) == n_folds else f"a subset (tune.folds) of {n_folds}"
    n_before = len(study.trials)
    log.info(f"tune {study_name}: {len(space.params)} parameters; objective {direction} mean {mname} over folds {folds} "
         f"({subset}) of {cfg.folds_path}")
    for p in space.params:
        log.info(f"  {p.describe()}")
    how = {"median": f"MedianPruner on the epochs of fold {first}", "halving": f"SuccessiveHalvingPruner on the epochs of fold {first}",
           "hyperband": f"HyperbandPruner on the epochs of fold {first}", "wilcoxon": "WilcoxonPruner on the fold values",
           "none": "no pruning"}[cfg.tune.pruner]
    budget = ", ".join(x for x in (f"{n_trials} trials" if n_trials else "", f"timeout {timeout:g}s" if timeout else "",
                                   f"study capped at {max_trials}" if max_trials else "") if x) or f"{cfg.tune.n_trials} trials (tune.n_trials)"
    log.info(f"  sampler {cfg.tune.sampler} (seed {cfg.tune.seed}), {how}; this process: {budget}")
    log.info(f"  storage {shown}, study {study_name!r}: " + (f"resuming with {n_before} trials" if n_before else "new")
         + f"; heartbeat {cfg.tune.heartbeat_s}s; trial runs and train.log under {out_dir}/trial_<n>/")
    if cfg.tune.pruner == "wilcoxon" and len(folds) < 4:
        log.info(f"  note: WilcoxonPruner cannot reach p < {cfg.tune.p_threshold:g} with {len(folds)} folds, so nothing is pruned; "
             "use tune.pruner median or more folds")

    from .cv import train_cv

    def objective(trial):
        if max_trials and _counted(study, before=trial.number) >= max_trials:
            study.stop()
            msg = f"over --max-trials {max_trials}: other workers' trials reached it first; not trained"
            trial.set_user_attr("error", f"OverBudget: {msg}")
            raise OverBudget(msg)
        run_dir = out_dir / f"trial_{trial.number}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a trial number is never reused within a study
        run_dir.mkdir(parents=True)
        trial_log = run_dir / "train.log"
        try:
            values = space.sample(trial, base)
            tcfg = _trial_config(cfg, space, base, values, f"tune/{study_name}/trial_{trial.number}")
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            trial.set_user_attr("folds", folds)
            fold_values: dict[int, float] = {}

            def on_epoch(job, epoch, row):
                if epoch_wise and job.fold == first:
                    v = float(row[mname])
                    if math.isfinite(v):
                        trial.report(v, epoch)
                        if trial.should_prune():
                            trial.set_user_attr("pruned_at", f"fold {job.fold} epoch {epoch}")
                            raise optuna.TrialPruned(f"fold {job.fold} epoch {epoch}: {mname} {v:.4f}")

            def on_fold(job, done):
                v = float(done.get(mname, math.nan))
                fold_values[job.fold] = v
                trial.set_user_attr("fold_values", {str(k): x for k, x in fold_values.items()})
                if not epoch_wise and math.isfinite(v):
                    trial.report(v, job.fold)
                    if trial.should_prune():
                        trial.set_user_attr("pruned_at", f"after fold {job.fold}")
                        raise optuna.TrialPruned(f"after fold {job.fold}: {mname} {v:.4f}")

            with to_file(trial_log):  # the trial's training lines go to its own log
                train_cv(tcfg, folds=folds, table=table, on_epoch=on_epoch, on_fold=on_fold)
            missing = [k for k in folds if k not in fold_values]
            if missing:
                raise PipelineError(f"{run_dir}: folds {missing} did not report a value")
            vals = [fold_values[k] for k in folds]
            trial.set_user_attr("cv_std", cv_std(vals))
            return float(sum(vals) / len(vals))
        except optuna.TrialPruned:
            for f in list(run_dir.rglob("*.pt")) + list(run_dir.rglob("*.safetensors")):
                f.unlink(missing_ok=True)
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            trial.set_user_attr("error", msg if isinstance(e, PipelineError) else f"{type(e).__name__}: {msg}")
            with open(trial_log, "a", encoding="utf-8") as f:
                f.write(traceback.format_exc())
            raise

    fails = {"row": 0, "last": ""}

    def progress(study, ft):
        state = ft.state.name
        secs = ft.duration.total_seconds() if ft.duration is not None else float("nan")
        ps = " ".join(f"{k}={fmt_value(v)}" for k, v in ft.params.items())
        if state == "COMPLETE":
            what = f"{cfg.metric} {ft.value:.4f}"
        elif state == "PRUNED":
            what = f"at {ft.user_attrs.get('pruned_at', '?')}" + (f" ({cfg.metric} {ft.value:.4f})" if ft.value is not None else "")
        else:
            what = ft.user_attrs.get("error", "failed")
        retry = ft.system_attrs.get("failed_trial")
        retry = f" (retry of trial {retry})" if retry is not None else ""
        bt = best_trial(study)
        best = f"best {bt.value:.4f} (trial {bt.number})" if bt is not None else "best -"
        log.info(f"trial {ft.number:>3} {state:<8} {what}  {secs:.1f}s  {ps}{retry}  | {best}")
        over = state == "FAIL" and str(ft.user_attrs.get("error", "")).startswith("OverBudget")
        if state == "FAIL" and not over:
            fails["row"] += 1
            fails["last"] = f"trial {ft.number}: {ft.user_attrs.get('error', 'failed')}"
            if fails["row"] >= MAX_FAILS_IN_A_ROW:
                study.stop()
        elif not over:
            fails["row"] = 0
        try:
            write_trials(study, out_dir)
            write_best(study, out_dir, space, base, cfg, fixed, cfg.metric)
        except OSError as e:
            log.info(f"warning: could not write {out_dir}: {e}")

    callbacks = [progress]
    if max_trials:
        callbacks.append(optuna.study.MaxTrialsCallback(max_trials, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                            TrialState.RUNNING, TrialState.WAITING)))
    t0 = time.time()
    n_run = n_trials if n_trials is not None else (None if timeout else cfg.tune.n_trials)
    try:
        if max_trials and _counted(study) >= max_trials:
            log.info(f"study {study_name!r} already has {_counted(study)} finished, running or queued trials "
                 f"(--max-trials {max_trials}); nothing to run")
        else:
            study.optimize(objective, n_trials=n_run, timeout=timeout, catch=(Exception,), callbacks=callbacks)
    finally:
        write_trials(study, out_dir)
        best_path = write_best(study, out_dir, space, base, cfg, fixed, cfg.metric)
    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    log.info(f"study {study_name!r}: {len(study.trials)} trials ({', '.join(f'{n} {k}' for k, n in counts.items() if n)}); "
         f"this run {time.time() - t0:.0f}s; wrote {out_dir / 'trials.csv'}")
    if cfg.tune.plots:
        write_plots(study, out_dir)
    bt = best_trial(study)
    if bt is not None:
        log.info(f"best: trial {bt.number}, {cfg.metric} {bt.value:.4f}: "
             + " ".join(f"{k}={fmt_value(v)}" for k, v in bt.params.items()))
        log.info(f"wrote {best_path}; use: pipeline train {cfg.path} --params {best_path}")
    log.info(f"dashboard: optuna-dashboard {shown}")
    if fails["row"] >= MAX_FAILS_IN_A_ROW:
        raise PipelineError(f"tune stopped: {fails['row']} trials in a row failed; last {fails['last']} "
                            f"(traceback in {out_dir}/trial_<n>/train.log)")
    return study


def _trial_config(cfg: Config, space: Space, base: dict, values: dict, name: str) -> Config:
    """The trial's config, validated like any config (a bad combination is one clear line)."""
    from pydantic import ValidationError

    from .config import _format_error

    d = space.apply(base, values)
    try:
        return Config(**d, path=cfg.path, name=name)
    except ValidationError as err:
        raise PipelineError(_format_error(Path(cfg.path or "config"), err).replace(": ", f": trial {name.rsplit('_', 1)[-1]}: ", 1)) from None

