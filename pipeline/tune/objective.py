"""One trial and the study's view of it: ``Objective`` samples the space and trains the tuned folds into the
trial's own run folder (reporting to the pruner as it goes), ``Progress`` logs each finished trial and stops
after repeated failures, and ``_trial_config`` validates a trial's config."""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import traceback
from pathlib import Path

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.logs import to_file
from pipeline.core.metrics import cv_std
from pipeline.tune.report import best_trial, fmt_value, write_best, write_trials
from pipeline.tune.samplers import PRUNERS
from pipeline.tune.space import Space
from pipeline.tune.study import _counted

log = logging.getLogger(__name__)

MAX_FAILS_IN_A_ROW = 3


class OverBudget(Exception):
    """This trial would exceed --max-trials: it is marked FAIL without training."""


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
