"""One training job's passes over its rows (``FoldPasses``): which rows it trains on and validates, the
components it builds (``pipeline.train.trainer.build_components``), an epoch's batches, loader and
training pass, the validation pass, and the checkpoint meta and OOF frame a validation pass leaves.
``pipeline.train.job.FoldTrainer`` adds the loop around them (resume, stop rules, files).

Under torchrun (``dist``, a ``pipeline.train.distributed.DistContext``) each rank trains its share of
every global batch through DDP and validates its share of the rows; in one process ``dist`` passes
everything through.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.config.schema import Config
from pipeline.core.device import loader_kwargs
from pipeline.core.errors import PipelineError
from pipeline.data.table import Table
from pipeline.models.backbones import apply_finetune, finetune_stage, freeze_bn_stats
from pipeline.runs.layout import JobDir
from pipeline.runs.predictions import pred_frame
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


class FoldPasses:
    """A job's rows and components, and its training and validation passes (``build`` first)."""

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
        dist: DistContext = DistContext(),
    ):
        self.cfg, self.table, self.job, self.device, self.hash = cfg, table, job, device, run_hash
        self.dist = dist
        self.precision, self.embeddings = precision, embeddings
        self.refit = job.is_refit  # refit on all rows: no validation, the last epoch is kept
        self.tr_idx = np.flatnonzero((fold_of != job.fold) & (fold_of != UNUSED))
        self.va_idx = np.flatnonzero(fold_of == job.fold)
        if (len(self.va_idx) == 0 and not self.refit) or len(self.tr_idx) == 0:
            raise PipelineError(f"{cfg.folds_path}: fold {job.fold} is empty; rerun `pipeline fold {cfg.path}`")
        self.channels_last = cfg.train.channels_last and device.type != "mps" and embeddings is None
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
