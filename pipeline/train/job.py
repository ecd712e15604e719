"""One training job (a fold, or a refit) in its folder: ``FoldTrainer`` runs the loop of
``pipeline.train.trainer`` epoch by epoch; ``Artifacts`` owns what a job writes (history, TensorBoard,
best/last checkpoints, resume state, done marker); callbacks (early stopping, the time-budget deadline,
a caller's hook such as an Optuna pruner) decide when to stop. The CV driver (``pipeline.train.cv``)
decides which jobs run where; this module never imports it.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.config.registries import SCHEDULERS
from pipeline.config.schema import Config
from pipeline.core.device import loader_kwargs
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, atomic_write_csv, exclusive, sweep_temps
from pipeline.core.metrics import logloss, score
from pipeline.data.table import Table
from pipeline.models.backbones import apply_finetune, finetune_stage, freeze_bn_stats, save_checkpoint
from pipeline.runs.layout import JobDir
from pipeline.runs.predictions import pred_frame, write_predictions
from pipeline.train.distributed import DistContext, convert_sync_bn
from pipeline.train.trainer import (
    UNUSED,
    BatchSource,
    TrainStep,
    _worker_init,
    build_components,
    derive_seed,
    epoch_batches,
    seed_everything,
    train_one_epoch,
    validate,
)

log = logging.getLogger(__name__)


# ---- artifacts -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Progress:
    """What the loop carries from epoch to epoch, and what resume restores."""

    best: dict = field(default_factory=lambda: {"val_loss": math.inf, "epoch": 0})
    bad_epochs: int = 0
    history: list = field(default_factory=list)


class Artifacts:
    """What a job writes in its folder (names: ``runs.JobDir``): history, TensorBoard, the best
    checkpoint and its OOF rows, the resume state, and the done marker last. With ``writes`` false
    (a torchrun rank other than 0) it keeps the history in memory and writes nothing."""

    def __init__(self, *, job: JobDir, run_hash: str, writes: bool = True):
        self.job, self.hash, self.writes = job, run_hash, writes
        self.tb = None

    @property
    def last_path(self) -> Path:
        return self.job.last

    def open_tb(self, start_epoch: int) -> None:
        if not self.writes:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.job.tb), purge_step=start_epoch)

    def close(self) -> None:
        if self.tb is not None:  # else its writer thread outlives the fold (one per pruned trial)
            self.tb.close()
            self.tb = None

    def record_epoch(self, progress: Progress, row: dict, scalars) -> None:
        progress.history.append(row)
        if not self.writes:
            return
        atomic_write_csv(self.job.history, pd.DataFrame(progress.history))
        for k in scalars:
            self.tb.add_scalar(k, row[k], row["epoch"])

    def history_until(self, epoch: int) -> list:
        """History rows up to ``epoch`` (rows written after the last checkpoint are dropped)."""
        if not self.job.history.exists():
            return []
        return pd.read_csv(self.job.history).query("epoch <= @epoch").to_dict("records")

    def save_best(self, model: nn.Module, meta: dict) -> None:
        if self.writes:
            save_checkpoint(model, self.job.best_weights, meta)

    def write_oof(self, frame: pd.DataFrame) -> None:
        if self.writes:
            write_predictions(self.job.oof, frame, "oof")

    def save_last(self, state: dict) -> None:
        if not self.writes:
            return
        with atomic_path(self.job.last) as tmp:
            torch.save({**state, "hash": self.hash}, tmp)

    def load_last(self, device: torch.device, what: str) -> dict | None:
        """The resume state, None when there is none or it is another config's."""
        if not self.job.last.exists():
            return None
        try:
            st = torch.load(self.job.last, map_location=device, weights_only=True)
        except Exception as e:
            raise PipelineError(
                f"{self.job.last}: corrupt resume checkpoint ({type(e).__name__}); delete it to restart "
                f"{what} (finished folds are kept)"
            ) from None
        if st.get("hash") != self.hash:
            log.info(f"{what}: resume state is from another config; starting over")
            return None
        return st

    def finish(self, done: dict) -> dict:
        if self.writes:
            self.job.write_done(done)
            self.job.last.unlink(missing_ok=True)
        return done


# ---- callbacks: each returns why to stop after this epoch, or None -------------------------


class EarlyStopping:
    def __init__(self, *, patience: int):
        self.patience = patience

    def __call__(self, job: JobDir, epoch: int, row: dict, progress: Progress) -> str | None:
        if self.patience and progress.bad_epochs >= self.patience:
            return f"{job.label}: early stop after {progress.bad_epochs} epochs without val_loss improvement"
        return None


class Deadline:
    """The job's share of ``train.time_budget_s``: stop at the first epoch boundary past it."""

    def __init__(self, *, at: float | None, epochs: int):
        self.at, self.epochs = at, epochs

    def __call__(self, job: JobDir, epoch: int, row: dict, progress: Progress) -> str | None:
        if self.at is not None and time.time() >= self.at and epoch < self.epochs:
            return f"{job.label}: time budget share spent after epoch {epoch}; keeping the best epoch ({progress.best['epoch']})"
        return None


class EpochHook:
    """A caller's ``on_epoch(job, epoch, row)`` (e.g. an Optuna pruner); it stops by raising."""

    def __init__(self, *, fn: Callable):
        self.fn = fn

    def __call__(self, job: JobDir, epoch: int, row: dict, progress: Progress) -> None:
        self.fn(job, epoch, row)


# ---- the loop ---------------------------------------------------------------------------------


class FoldTrainer:
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
        self.cfg, self.table, self.job, self.device, self.hash = cfg, table, job, device, run_hash
        self.dist = dist
        self.precision, self.embeddings = precision, embeddings
        self.done_extra = done_extra or {}  # the caller's facts for done.json (e.g. its pseudo rows)
        self.refit = job.is_refit  # refit on all rows: no validation, the last epoch is kept
        self.tr_idx = np.flatnonzero((fold_of != job.fold) & (fold_of != UNUSED))
        self.va_idx = np.flatnonzero(fold_of == job.fold)
        if (len(self.va_idx) == 0 and not self.refit) or len(self.tr_idx) == 0:
            raise PipelineError(f"{cfg.folds_path}: fold {job.fold} is empty; rerun `pipeline fold {cfg.path}`")
        self.channels_last = cfg.train.channels_last and device.type != "mps" and embeddings is None
        # order matters: a caller's hook (pruning) runs before the stop rules, as the log lines show
        self.callbacks = ([EpochHook(fn=on_epoch)] if on_epoch is not None else []) + [
            EarlyStopping(patience=cfg.train.patience),
            Deadline(at=deadline, epochs=cfg.train.epochs),
        ]
        self.artifacts = Artifacts(job=job, run_hash=run_hash, writes=dist.is_main)
        self._trainable = None  # which weights trained when DDP was last wrapped around the model

    def build(self) -> None:
        self.parts = build_components(
            cfg=self.cfg,
            table=self.table,
            tr_idx=self.tr_idx,
            seed=self.job.seed,
            device=self.device,
            channels_last=self.channels_last,
            with_augment=self.embeddings is None,
            precision=self.precision,
            world_size=self.dist.world_size,
        )
        if self.dist.active and self.cfg.train.sync_bn:  # in place: the optimizer keeps the same weights
            self.parts.model = convert_sync_bn(self.parts.model)

    def _wrap_ddp(self) -> None:
        """Under torchrun, (re)build DDP when the set of trainable weights changed (a finetune stage)."""
        if not self.dist.active:
            return
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable != self._trainable:
            self.parts.ddp, self._trainable = self.dist.wrap(TrainStep(self.model), self.device), trainable

    # attribute access used by tests and tools
    @property
    def model(self) -> nn.Module:
        return self.parts.model

    @property
    def opt(self):
        return self.parts.opt

    @property
    def loss_fn(self):
        return self.parts.loss_fn

    @property
    def ema(self):
        return self.parts.ema

    def epoch_batches(self, epoch: int, rng: np.random.Generator) -> list[np.ndarray]:
        return epoch_batches(
            tr_idx=self.tr_idx,
            labels=self.table.labels,
            num_classes=self.table.num_classes,
            t=self.cfg.train,
            n_steps=self.parts.steps_per_epoch,
            rng=rng,
            world_size=self.dist.world_size,
        )

    def loader(self, batches: list[np.ndarray], epoch: int):
        """(idx, augmented float batch) pairs. Each batch's augmentation is seeded from (seed, fold,
        epoch, batch number), so results do not depend on ``train.num_workers``."""
        job = self.job
        rank = (self.dist.rank,) if self.dist.active else ()  # ranks draw their own augmentations of their shares
        ds = BatchSource(
            images=self.table.images,
            batches=batches,
            augment=self.parts.augment,
            seeds=[derive_seed("aug", job.seed, job.fold, epoch, b, *rank) for b in range(len(batches))],
        )
        if self.cfg.train.num_workers == 0:
            return (ds[b] for b in range(len(ds)))
        return iter(
            torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                shuffle=False,
                num_workers=self.cfg.train.num_workers,
                worker_init_fn=_worker_init,
                prefetch_factor=4,
                **loader_kwargs(self.device),
                # its own generator, so workers leave the global torch RNG alone
                generator=torch.Generator().manual_seed(derive_seed("loader", epoch)),
            )
        )

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the training rows; returns (mean loss, training images per second)."""
        cfg, job = self.cfg, self.job
        if cfg.model.unfreeze_after or cfg.model.finetune == "gradual":  # set per epoch, so a resumed job matches
            apply_finetune(self.model, finetune_stage(cfg.model, epoch, cfg.train.epochs), cfg.model.unfreeze_stages)
        rng = seed_everything(derive_seed("epoch", job.seed, job.fold, epoch))
        self.model.train()
        freeze_bn_stats(self.model, every=cfg.train.freeze_bn)
        self._wrap_ddp()
        batches, weights = self.dist.shard_batches(self.epoch_batches(epoch, rng))  # one process: all of each batch
        source = self.loader(batches, epoch) if self.embeddings is None else ((idx, None) for idx in batches)
        loss, img_s = train_one_epoch(
            self.parts,
            source=source,
            n_batches=len(batches),
            table=self.table,
            t=cfg.train,
            device=self.device,
            precision=self.precision,
            channels_last=self.channels_last,
            rng=rng,
            embeddings=self.embeddings,
            desc=f"fold {job.fold} epoch {epoch}",
            grad_weights=weights,
        )
        if not self.dist.active:
            return loss, img_s
        seen = sum(len(b) for b in batches)  # the world's mean loss and images per second
        total, seen, img_s = self.dist.all_reduce_sum([loss * seen, seen, img_s])
        return total / max(seen, 1), img_s

    def validate(self) -> np.ndarray:
        """Probabilities of the validation rows; under torchrun each rank predicts its share, and every
        rank gets all of them (the same val_loss everywhere: the scheduler and stop rules agree)."""
        idx = self.dist.shard(self.va_idx)
        if len(idx) == 0:  # more ranks than validation rows
            return self.dist.gather_rows(np.zeros((0, self.table.num_classes)))
        probs = validate(
            self.parts.eval_model,
            table=self.table,
            idx=idx,
            batch_size=self.cfg.train.batch_size * 2,
            device=self.device,
            channels_last=self.channels_last,
            precision=self.precision,
            embeddings=self.embeddings,
        )
        return self.dist.gather_rows(probs)

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
            f"fold {self.job.fold} epoch {epoch}/{cfg.train.epochs}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
            f"{mname} {val_metric:.4f}  {row['seconds']:.1f}s{'  *' if improved else ''}"
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
                lambda: [r for cb in self.callbacks if (r := cb(job, epoch, row, progress))]
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

    def meta(self, best: dict) -> dict:
        t = self.table
        return {
            "model": self.cfg.model.model_dump(),
            "in_chans": t.channels,
            "img_size": list(t.image_size),
            "class_names": t.class_names,
            "feature_names": t.feature_names,
            "n_features": len(t.feature_names),
            "value_range": list(t.value_range),
            "fold": self.job.fold,
            "seed": self.job.seed,
            "config_hash": self.hash,
            "weights": self.parts.weights_source,
            "precision": self.precision,
            "ema": self.parts.ema is not None,
            "world_size": self.dist.world_size,
            **best,
        }

    def oof_frame(self, probs: np.ndarray) -> pd.DataFrame:
        t = self.table
        return pred_frame(
            t.ids[self.va_idx],
            probs,
            t.class_names,
            fold=np.full(len(self.va_idx), self.job.fold),
            target=t.labels[self.va_idx],
        )
