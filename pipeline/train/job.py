"""One training job (a fold, or a refit) in its folder: ``FoldTrainer`` runs the loop of
``pipeline.train.trainer`` epoch by epoch over the passes of ``pipeline.train.passes``; ``Artifacts``
(``pipeline.train.artifacts``) owns what a job writes (history, TensorBoard, best/last checkpoints,
resume state, done marker); callbacks (``pipeline.train.callbacks``: early stopping, the time-budget
deadline, a caller's hook such as an Optuna pruner) decide when to stop. The CV driver
(``pipeline.train.cv``) decides which jobs run where; this module never imports it.

A killed job resumes from its last completed epoch and replays exactly what an uninterrupted one
would. Under torchrun (``dist``, a ``pipeline.train.distributed.DistContext``) the ranks train one
job together: each its share of every global batch through DDP, rank 0 writing the files and taking
the decisions; in one process ``dist`` passes everything through.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack

import numpy as np
import torch

from pipeline.config.registries import SCHEDULERS
from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.io import exclusive, sweep_temps
from pipeline.core.metrics import logloss, score
from pipeline.data.table import Table
from pipeline.runs.layout import JobDir
from pipeline.train.artifacts import Artifacts, Progress
from pipeline.train.callbacks import Deadline, EarlyStopping, EpochHook
from pipeline.train.distributed import DistContext
from pipeline.train.passes import FoldPasses

log = logging.getLogger(__name__)


class FoldTrainer(FoldPasses):
    """Trains one job to the end, resuming from its last completed epoch."""

    def __init__(
        self,
        *,
        cfg: Config,
        table: Table,
        fold_of: np.ndarray,
        job: JobDir,
        device: torch.device,
        run_hash: str,
        precision: str = "fp32",
        embeddings: torch.Tensor | None = None,
        on_epoch: Callable | None = None,
        deadline: float | None = None,
        done_extra: dict | None = None,
        dist: DistContext = DistContext(),
    ):
        super().__init__(
            cfg=cfg,
            table=table,
            fold_of=fold_of,
            job=job,
            device=device,
            run_hash=run_hash,
            precision=precision,
            embeddings=embeddings,
            dist=dist,
        )
        self.done_extra = done_extra or {}  # the caller's facts for done.json (e.g. its pseudo rows)
        # order matters: a caller's hook (pruning) runs before the stop rules, as the log lines show
        self.callbacks = ([EpochHook(fn=on_epoch)] if on_epoch is not None else []) + [
            EarlyStopping(patience=cfg.train.patience),
            Deadline(at=deadline, epochs=cfg.train.epochs),
        ]
        self.artifacts = Artifacts(job=job, run_hash=run_hash, writes=dist.is_main)

    def run(self) -> dict:
        """Train the job to the end (or resume it); one process (one torchrun world) per job at a time."""
        with ExitStack() as held:
            self.dist.broadcast_decision(lambda: self._claim(held))  # rank 0 holds the lock: LockHeld on every rank
            self.build()
            try:
                return self._loop(self._resume())
            finally:
                self.artifacts.close()

    def _claim(self, held: ExitStack) -> None:
        self.job.path.mkdir(parents=True, exist_ok=True)
        held.enter_context(exclusive(self.job.lock, self.job.label))
        for tmp in sweep_temps(self.job.path, any_owner=True):  # we hold the job's lock: a killed run's leftovers
            log.info(f"{self.job.label}: removed {tmp.name}, left by a killed run")

    def _resume(self) -> tuple[int, Progress]:
        st = self.artifacts.load_last(self.device, self.job.label)
        if st is None:
            return 1, Progress()
        p = self.parts
        if len(st.get("opt", {}).get("param_groups", [])) != len(p.opt.param_groups):
            # written by an older version (one optimizer group for all weights, decay on biases too)
            log.info(f"{self.job.label}: resume state has another optimizer layout; starting over")
            return 1, Progress()
        try:
            p.model.load_state_dict(st["model"])
            p.opt.load_state_dict(st["opt"])
            p.sched.load_state_dict(st["sched"])
            if p.ema is not None:
                p.ema.load_state_dict(st["ema"])
            if st.get("scaler"):  # fp16's loss scale; empty from a disabled scaler (and from older versions)
                p.scaler.load_state_dict(st["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise PipelineError(
                f"{self.artifacts.last_path}: corrupt resume checkpoint ({type(e).__name__}); delete it to "
                f"restart {self.job.label} (finished folds are kept)"
            ) from None
        progress = Progress(
            best=st["best"], bad_epochs=st["bad_epochs"], history=self.artifacts.history_until(st["epoch"])
        )
        log.info(
            f"{self.job.label}: resuming after epoch {st['epoch']} (best val_loss {progress.best['val_loss']:.4f} "
            f"at epoch {progress.best['epoch']})"
        )
        return st["epoch"] + 1, progress

    def _state(self, epoch: int, progress: Progress) -> dict:
        p = self.parts
        st = {
            "model": p.model.state_dict(),
            "opt": p.opt.state_dict(),
            "sched": p.sched.state_dict(),
            "epoch": epoch,
            "best": progress.best,
            "bad_epochs": progress.bad_epochs,
            "scaler": p.scaler.state_dict(),
        }
        if p.ema is not None:
            st["ema"] = p.ema.state_dict()
        return st

    def _epoch(self, epoch: int, progress: Progress) -> dict:
        """Train and validate one epoch, record it, keep the best; returns its history row."""
        cfg, mname = self.cfg, f"val_{self.cfg.metric}"
        t0 = time.time()
        train_loss, img_s = self.train_epoch(epoch)
        if self.refit:
            probs, val_loss, val_metric = None, math.nan, math.nan
        else:
            y_va = self.table.labels[self.va_idx]
            probs = self.validate()
            val_loss = logloss(y_va, probs, cfg.evaluate.eps)
            val_metric = score(cfg.metric, y_va, probs, cfg.evaluate.eps)
        lr = self.opt.param_groups[0]["lr"]
        if not self.parts.per_step:
            self.parts.sched.step(val_loss) if SCHEDULERS.get(
                cfg.train.scheduler
            ).on_metric else self.parts.sched.step()
        improved = epoch == cfg.train.epochs if self.refit else val_loss < progress.best["val_loss"] - 1e-7
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            mname: val_metric,
            "lr": lr,
            "seconds": round(time.time() - t0, 3),
            "train_img_s": round(img_s, 1),
        }
        self.artifacts.record_epoch(progress, row, ("train_loss", "val_loss", mname, "lr"))
        if improved:
            progress.best, progress.bad_epochs = {"val_loss": val_loss, "epoch": epoch, mname: val_metric}, 0
            self.artifacts.save_best(self.parts.eval_model, self.meta(progress.best))
            if not self.refit:
                self.artifacts.write_oof(self.oof_frame(probs))
        else:
            progress.bad_epochs += 1
        log.info(
            f"fold {self.job.fold} epoch {epoch}/{cfg.train.epochs}  train_loss {train_loss:.4f}  "
            f"val_loss {val_loss:.4f}  {mname} {val_metric:.4f}  {row['seconds']:.1f}s{'  *' if improved else ''}"
        )
        return row

    def _loop(self, resume: tuple[int, Progress]) -> dict:
        start, progress = resume
        cfg, job = self.cfg, self.job
        self.artifacts.open_tb(start)
        for epoch in range(start, cfg.train.epochs + 1):
            row = self._epoch(epoch, progress)
            self.artifacts.save_last(self._state(epoch, progress))
            # decided on rank 0 (its clock, its hook) and broadcast, so all ranks stop at the same epoch
            reasons = self.dist.broadcast_decision(
                lambda epoch=epoch, row=row: [r for cb in self.callbacks if (r := cb(job, epoch, row, progress))]
            )
            if reasons:
                log.info(reasons[0])
                break
        mname = f"val_{cfg.metric}"
        best = progress.best
        done = self.artifacts.finish(
            {
                "hash": self.hash,
                "fold": job.fold,
                "seed": job.seed,
                "best_epoch": best["epoch"],
                "val_loss": best["val_loss"],
                mname: best.get(mname),
                "epochs_run": len(progress.history),
                "weights": self.parts.weights_source,
                "world_size": self.dist.world_size,
                **self.done_extra,
            }
        )
        self.dist.barrier()  # the job's files are written when any rank moves on
        return done
