"""Which trained models belong to a config: the run hash a finished job is valid for, and the finished
fold (and refit) models the later stages use, each refused in one line when it is missing or stale."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.errors import PipelineError
from pipeline.data.folds import folds_digest, n_folds
from pipeline.runs.layout import JobDir, RunDir

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def run_hash(cfg: Config) -> str:
    """What a finished job is valid for: this training config *and* these fold assignments (a
    regenerated folds file with the same settings, e.g. from changed data, retrains) *and*, with
    ``pseudo``, the source's prediction files (a re-predicted source retrains)."""
    h = f"{RunDir.of(cfg).train_hash}-{folds_digest(cfg)}"
    if cfg.pseudo is None:
        return h
    from pipeline.train.pseudo import pseudo_digest

    return f"{h}-p{pseudo_digest(cfg)}"


def check_trained(cfg: Config, *, required: bool = True) -> None:
    """The models (and oof.csv) must come from this config's training sections; ``required``: and exist."""
    run = RunDir.of(cfg)
    snap, have, want = run.snapshot("train"), run.snapshot_hash("train"), run.train_hash
    if have is None and required:
        raise PipelineError(f"{run.path}: no trained models; run `pipeline train {cfg.path}` first")
    if have is not None and have != want:
        raise PipelineError(
            f"{snap}: models were trained under another config (train hash {have}, this config {want}); "
            f"rerun `pipeline train {cfg.path}`"
        )


def models_by_fold(cfg: Config) -> list[list[JobDir]]:
    """Finished fold models of the current training config: entry k holds fold k's, one per seed."""
    check_trained(cfg)
    run = RunDir.of(cfg)
    groups = [[run.job_dir(k, s) for s in run.seeds] for k in range(n_folds(cfg))]
    _check_finished(cfg, [d for g in groups for d in g])
    return groups


def model_dirs(cfg: Config, *, refit: bool = False) -> list[JobDir]:
    """Finished model folders: the fold models fold-major (each fold's seeds together), or the refit ones."""
    if not refit:
        return [d for group in models_by_fold(cfg) for d in group]
    check_trained(cfg)
    run = RunDir.of(cfg)
    dirs = [run.refit_dir(s) for s in run.seeds]
    _check_finished(cfg, dirs)
    return dirs


def _check_finished(cfg: Config, dirs: list[JobDir]) -> None:
    if not cfg.folds_path.is_file():  # the run hash includes the folds file's digest
        raise PipelineError(
            f"{cfg.folds_path}: folds file not found, so the models' folds cannot be checked; "
            f"run `pipeline fold {cfg.path}` (or restore the file training used)"
        )
    want = run_hash(cfg)
    for d in dirs:
        if not d.is_done(want):
            raise PipelineError(f"{d}: model not finished; run `pipeline train {cfg.path}` first")
