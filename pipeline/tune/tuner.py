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

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.logs import to_file
from pipeline.core.metrics import METRICS, cv_std
from pipeline.runs.layout import tune_dir
from pipeline.tune.report import best_trial, fmt_value, write_best, write_plots, write_trials
from pipeline.tune.samplers import PRUNERS, build_pruner, build_sampler, check_sampler
from pipeline.tune.space import Space, _lookup, check_augment, parse_space

log = logging.getLogger(__name__)

MAX_FAILS_IN_A_ROW = 3


class OverBudget(Exception):
    """This trial would exceed --max-trials: it is marked FAIL without training."""


# ---- storage --------------------------------------------------------------------------


def default_storage(cfg: Config) -> str:
    path = (tune_dir(cfg) / "optuna.db").resolve()
    return f"sqlite:///{path}"


def open_storage(url: str, tc, flag: str = "--storage"):
    """An RDBStorage with heartbeat and retry of dead workers' trials; one-line errors."""
    import optuna
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:
        raise PipelineError(
            f"{flag} {url!r}: not a database URL; expected e.g. sqlite:///runs/tune.db "
            "or postgresql://user@host:5432/dbname"
        ) from None
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
            return optuna.storages.RDBStorage(
                u.render_as_string(hide_password=False),
                engine_kwargs=kw,
                heartbeat_interval=tc.heartbeat_s,
                grace_period=tc.grace_s,
                **cb,
            )

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
        raise PipelineError(
            f"{flag} {shown}: unknown database kind {u.drivername!r}; expected sqlite:// or postgresql:// "
            "(any SQLAlchemy URL whose driver is installed)"
        ) from None
    except ImportError as e:
        raise PipelineError(f"{flag} {shown}: the database driver is not installed ({e.name or e})") from None
    except sqlalchemy.exc.OperationalError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise PipelineError(
            f"{flag} {shown}: cannot connect ({reason[0] if reason else type(e).__name__}); "
            "is the server running and the URL right?"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise PipelineError(f"{flag} {shown}: database error ({reason[0] if reason else type(e).__name__})") from None
    except RuntimeError as e:  # optuna's schema version check
        raise PipelineError(
            f"{flag} {shown}: {str(e).splitlines()[0]} (`optuna storage upgrade --storage URL`)"
        ) from None


# ---- study ----------------------------------------------------------------------------


def open_study(cfg: Config, storage, study_name: str, direction: str, sampler, pruner, shown_url: str):
    import optuna

    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except Exception as e:  # e.g. the DB refused a write
        raise PipelineError(
            f"--storage {shown_url}: cannot open study {study_name!r} ({str(e).splitlines()[0]})"
        ) from None
    if len(study.directions) != 1:
        raise PipelineError(
            f"--study {study_name}: exists in {shown_url} as a multi-objective study; use another --study name"
        )
    have = study.direction.name.lower()
    if have != direction:
        raise PipelineError(
            f"--study {study_name}: exists in {shown_url} and {have}s, but metric {cfg.metric} is "
            f"{direction}d; use another --study name"
        )
    attrs = study.user_attrs
    if "metric" in attrs and attrs["metric"] != cfg.metric:
        raise PipelineError(
            f"--study {study_name}: exists in {shown_url} for metric {attrs['metric']}, this config's "
            f"metric is {cfg.metric}; use another --study name"
        )
    if "metric" not in attrs:
        study.set_user_attr("metric", cfg.metric)
        study.set_user_attr("competition", cfg.competition)
    return study


def _counted(study, before: int | None = None) -> int:
    from optuna.trial import TrialState

    ts = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    )
    return sum(1 for t in ts if before is None or t.number < before)


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
            f"{path}: tune.space: nothing to search{why}; expected keys like train.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}"
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
            f"  note: WilcoxonPruner cannot reach p < {tc.p_threshold:g} with {len(folds)} folds, so nothing is pruned; "
            "use tune.pruner median or more folds"
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


class Objective:
    """One trial: sample the space, train the tuned folds into the trial's own run directory
    (its training output in train.log there) and return the mean fold value. Reports to the
    pruner as it trains; a pruned trial's checkpoints are deleted, a failed one's reason is kept."""

    def __init__(
        self,
        *,
        cfg: Config,
        space: Space,
        base: dict,
        table,
        folds: list[int],
        study,
        out_dir: Path,
        study_name: str,
        max_trials: int | None,
    ):
        self.cfg, self.space, self.base, self.table, self.folds, self.study = cfg, space, base, table, folds, study
        self.out_dir, self.study_name, self.max_trials = out_dir, study_name, max_trials
        self.mname = f"val_{cfg.metric}"
        self.epoch_wise = PRUNERS.get(cfg.tune.pruner).epoch_wise

    def __call__(self, trial) -> float:
        import optuna

        if self.max_trials and _counted(self.study, before=trial.number) >= self.max_trials:
            self.study.stop()
            msg = f"over --max-trials {self.max_trials}: other workers' trials reached it first; not trained"
            trial.set_user_attr("error", f"OverBudget: {msg}")
            raise OverBudget(msg)
        run_dir = self.out_dir / f"trial_{trial.number}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a trial number is never reused within a study
        run_dir.mkdir(parents=True)
        try:
            return self._train(trial, run_dir)
        except optuna.TrialPruned:
            for f in list(run_dir.rglob("*.pt")) + list(run_dir.rglob("*.safetensors")):
                f.unlink(missing_ok=True)
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            trial.set_user_attr("error", msg if isinstance(e, PipelineError) else f"{type(e).__name__}: {msg}")
            with open(run_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(traceback.format_exc())
            raise

    def _train(self, trial, run_dir: Path) -> float:
        from pipeline.train.cv import train_cv

        values = self.space.sample(trial, self.base)
        tcfg = _trial_config(self.cfg, self.space, self.base, values, f"tune/{self.study_name}/trial_{trial.number}")
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("folds", self.folds)
        fold_values: dict[int, float] = {}

        def on_epoch(job, epoch, row):
            self._on_epoch(trial, job, epoch, row)

        def on_fold(job, done):
            self._on_fold(trial, fold_values, job, done)

        with to_file(run_dir / "train.log"):  # the trial's training lines go to its own log
            train_cv(tcfg, folds=self.folds, table=self.table, on_epoch=on_epoch, on_fold=on_fold)
        missing = [k for k in self.folds if k not in fold_values]
        if missing:
            raise PipelineError(f"{run_dir}: folds {missing} did not report a value")
        vals = [fold_values[k] for k in self.folds]
        trial.set_user_attr("cv_std", cv_std(vals))
        self._write_hparams(tcfg, values, vals)
        return float(sum(vals) / len(vals))

    def _write_hparams(self, tcfg: Config, values: dict, fold_scores: list[float]) -> None:
        """The trial's TensorBoard HParams session: headline and searched keys, the tuned folds' CV metric."""
        from pipeline.runs.layout import RunDir
        from pipeline.train.hparams import cv_metrics, headline, write_hparams

        run = RunDir.of(tcfg)
        try:
            write_hparams(
                run.tb_hparams,
                {**headline(tcfg, self.table.image_size), **values},
                cv_metrics(tcfg.metric, fold_scores),
            )
        except OSError as e:  # the trial's value stands without it
            log.info(f"warning: could not write TensorBoard HParams to {run.tb_hparams}: {e}")

    def _on_epoch(self, trial, job, epoch: int, row: dict) -> None:
        """Epoch-wise pruners: the first tuned fold's value after each epoch (step = epoch)."""
        if not (self.epoch_wise and job.fold == self.folds[0]):
            return
        v = float(row[self.mname])
        if math.isfinite(v):
            self._report(trial, v, epoch, f"fold {job.fold} epoch {epoch}")

    def _on_fold(self, trial, fold_values: dict, job, done: dict) -> None:
        """Each finished fold's value; the other pruners see it (step = fold number)."""
        v = float(done.get(self.mname, math.nan))
        fold_values[job.fold] = v
        trial.set_user_attr("fold_values", {str(k): x for k, x in fold_values.items()})
        if not self.epoch_wise and math.isfinite(v):
            self._report(trial, v, job.fold, f"after fold {job.fold}")

    def _report(self, trial, value: float, step: int, where: str) -> None:
        import optuna

        trial.report(value, step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at", where)
            raise optuna.TrialPruned(f"{where}: {self.mname} {value:.4f}")


class Progress:
    """Study callback after every trial: one log line, stop after ``MAX_FAILS_IN_A_ROW`` failures
    in a row (a trial over --max-trials does not count), and trials.csv / best.yaml rewritten."""

    def __init__(self, *, cfg: Config, space: Space, base: dict, fixed: dict, out_dir: Path):
        self.cfg, self.space, self.base, self.fixed, self.out_dir = cfg, space, base, fixed, out_dir
        self.fails_in_a_row, self.last_fail = 0, ""

    def __call__(self, study, ft) -> None:
        log.info(self.line(study, ft))
        state = ft.state.name
        over = state == "FAIL" and str(ft.user_attrs.get("error", "")).startswith("OverBudget")
        if state == "FAIL" and not over:
            self.fails_in_a_row += 1
            self.last_fail = f"trial {ft.number}: {ft.user_attrs.get('error', 'failed')}"
            if self.fails_in_a_row >= MAX_FAILS_IN_A_ROW:
                study.stop()
        elif not over:
            self.fails_in_a_row = 0
        try:
            write_trials(study, self.out_dir)
            write_best(study, self.out_dir, self.space, self.base, self.cfg, self.fixed, self.cfg.metric)
        except OSError as e:
            log.info(f"warning: could not write {self.out_dir}: {e}")

    def line(self, study, ft) -> str:
        metric, state = self.cfg.metric, ft.state.name
        secs = ft.duration.total_seconds() if ft.duration is not None else float("nan")
        ps = " ".join(f"{k}={fmt_value(v)}" for k, v in ft.params.items())
        if state == "COMPLETE":
            what = f"{metric} {ft.value:.4f}"
        elif state == "PRUNED":
            what = f"at {ft.user_attrs.get('pruned_at', '?')}" + (
                f" ({metric} {ft.value:.4f})" if ft.value is not None else ""
            )
        else:
            what = ft.user_attrs.get("error", "failed")
        retry = ft.system_attrs.get("failed_trial")
        retry = f" (retry of trial {retry})" if retry is not None else ""
        bt = best_trial(study)
        best = f"best {bt.value:.4f} (trial {bt.number})" if bt is not None else "best -"
        return f"trial {ft.number:>3} {state:<8} {what}  {secs:.1f}s  {ps}{retry}  | {best}"


def _trial_config(cfg: Config, space: Space, base: dict, values: dict, name: str) -> Config:
    """The trial's config, validated like any config (a bad combination is one clear line)."""
    from pydantic import ValidationError

    from pipeline.config.load import _format_error

    d = space.apply(base, values)
    try:
        return Config(**d, path=cfg.path, name=name, plan=cfg.plan)  # the base's plan: trials do not re-plan
    except ValidationError as err:
        raise PipelineError(
            _format_error(Path(cfg.path or "config"), err).replace(": ", f": trial {name.rsplit('_', 1)[-1]}: ", 1)
        ) from None
