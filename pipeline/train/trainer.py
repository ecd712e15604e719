"""One fold (or one refit) of training: components, ``train_one_epoch``, ``validate``, artifacts, callbacks.

Split as timm's train.py is split: ``build_components`` makes the model, EMA, optimiser, schedule,
augmentation and loss; ``train_one_epoch`` and ``validate`` are plain functions over them;
``Artifacts`` owns what a job writes in its folder (history, TensorBoard, best/last checkpoints,
resume state, done marker); callbacks (early stopping, the time-budget deadline, a caller's hook
such as an Optuna pruner) decide when to stop. ``FoldTrainer`` runs the loop. The CV driver
(``pipeline.train.cv``) decides which jobs run where; this module never imports it.

Randomness is derived from (seed, fold, epoch) at each epoch start, so a resumed fold replays
exactly what an uninterrupted one would. Under torchrun (``dist``, a ``pipeline.train.distributed.DistContext``)
the ranks train one job together: each its share of every global batch through DDP, rank 0 writing
the files and taking the decisions; in one process ``dist`` passes everything through.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.config.schema import Config
from pipeline.core.device import amp_plan, loader_kwargs, non_blocking
from pipeline.train.distributed import DistContext, convert_sync_bn
from pipeline.core.errors import PipelineError
from pipeline.models.inference import Rows, features_tensor, predict_logits
from pipeline.tasks import build_task
from pipeline.core.io import atomic_path, atomic_write_csv, exclusive, sweep_temps
from pipeline.core.metrics import logloss, score
from pipeline.models.backbones import apply_finetune, build_model, finetune_stage, freeze_bn_stats, save_checkpoint
from pipeline.config.registries import SCHEDULERS
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.runs.predictions import pred_frame, write_predictions
from pipeline.runs.layout import JobDir
from pipeline.data.table import Table

log = logging.getLogger(__name__)


# fold_of values besides a real row's fold (>= 0): a row every job trains on and none validates
# (a pseudo-labelled test row, pipeline/train/pseudo.py), and a row this job does not use at all
TRAIN_ONLY, UNUSED = -2, -3


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


# ---- components ----------------------------------------------------------------------------

@dataclass(kw_only=True)
class Components:
    """What one job trains with; built once per job, in a fixed order (the init RNG stream)."""

    model: nn.Module
    ema: object | None
    opt: torch.optim.Optimizer
    sched: object
    per_step: bool
    loss_fn: nn.Module
    augment: object | None
    steps_per_epoch: int
    weights_source: str
    scaler: torch.amp.GradScaler  # enabled for fp16 only; disabled, each of its calls passes through
    ddp: nn.Module | None = None  # under torchrun: DistributedDataParallel over a TrainStep of ``model``

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and checkpointed: the EMA when it is on."""
        return self.ema.module if self.ema is not None else self.model


def caches_embeddings(cfg: Config) -> bool:
    """A frozen backbone without augmentation: its features are computed once for every fold."""
    m = cfg.model  # mixing, augmentation and unfreezing all need the images themselves
    return m.finetune == "head" and not (cfg.augment or m.unfreeze_after or cfg.train.mixup_alpha or cfg.train.cutmix_alpha)


def steps_per_epoch(n_rows: int, t, world_size: int = 1) -> int:
    # a last batch of fewer than 2 rows per rank is dropped (BatchNorm)
    n = n_rows // t.batch_size + (n_rows % t.batch_size >= 2 * world_size)
    n = max(n, 1)
    return min(n, t.max_steps_per_epoch or n)


def build_components(*, cfg: Config, table: Table, tr_idx: np.ndarray, seed: int, device: torch.device,
                     channels_last: bool, with_augment: bool, precision: str = "fp32", world_size: int = 1) -> Components:
    if cfg.train.epochs == "auto":  # a caller skipped the plan: a bug, not bad input
        raise ValueError("train.epochs is auto: resolve the config with pipeline.plan.store.planned(cfg) first")
    seed_everything(derive_seed("init", seed))
    model, weights_source = build_model(cfg, table.channels, table.num_classes, len(table.feature_names), table.image_size)
    model.fit_normalisation(table.images, table.features)
    apply_finetune(model, finetune_stage(cfg.model, 1, cfg.train.epochs), cfg.model.unfreeze_stages)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = None
    if cfg.train.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    opt = build_optimizer(cfg, model)
    n_steps = steps_per_epoch(len(tr_idx), cfg.train, world_size)
    # per-step schedules advance once per optimizer step, i.e. every accum_steps batches
    sched, per_step = build_scheduler(cfg, opt, math.ceil(n_steps / cfg.train.accum_steps))
    augment = None
    if with_augment:
        from pipeline.data.augment import build_augment

        augment = build_augment(cfg.augment, table.value_range, table.channels, table.image_size, seed=seed,
                                where=f"{cfg.path}: augment")
    counts = class_mass(table, tr_idx)
    weight = None
    if cfg.train.class_weights == "balanced":
        weight = torch.tensor(counts.sum() / (table.num_classes * np.maximum(counts, 1)), dtype=torch.float32)
    from pipeline.config.auto import resolve_label_smoothing

    task = build_task(table.num_classes)
    loss_fn = task.loss(weight=weight, label_smoothing=resolve_label_smoothing(cfg, task)).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_plan(device.type, precision).scaler)
    return Components(model=model, ema=ema, opt=opt, sched=sched, per_step=per_step, loss_fn=loss_fn,
                      augment=augment, steps_per_epoch=n_steps, weights_source=weights_source, scaler=scaler)


def class_mass(table: Table, idx: np.ndarray) -> np.ndarray:
    """Rows per class among ``idx``, each counted with its loss weight and (soft) target: plain counts
    for a table without them."""
    if table.sample_weights is None and table.soft_targets is None:
        return np.bincount(table.labels[idx], minlength=table.num_classes)
    w = table.sample_weights[idx] if table.sample_weights is not None else np.ones(len(idx))
    t = table.soft_targets[idx] if table.soft_targets is not None else np.eye(table.num_classes)[table.labels[idx]]
    return (w[:, None] * t).sum(0)


# ---- one epoch -----------------------------------------------------------------------------

def epoch_batches(*, tr_idx: np.ndarray, labels: np.ndarray, num_classes: int, t, n_steps: int,
                  rng: np.random.Generator, world_size: int = 1) -> list[np.ndarray]:
    """The epoch's global batches (a torchrun rank trains its share of each: ``DistContext.shard_batches``)."""
    bs = t.batch_size
    if t.balanced_sampling:  # each class drawn equally often, with replacement
        y = labels[tr_idx]
        w = 1.0 / np.bincount(y, minlength=num_classes)[y]
        order = rng.choice(tr_idx, size=len(tr_idx), replace=True, p=w / w.sum())
    else:
        order = rng.permutation(tr_idx)
    batches = [np.sort(order[i:i + bs]) for i in range(0, len(order), bs)]  # sorted: memmap-friendly
    if len(batches) > 1 and len(batches[-1]) < 2 * world_size:  # BatchNorm cannot train on one sample (per rank)
        batches = batches[:-1]
    return batches[:n_steps]


def train_one_epoch(parts: Components, *, source, n_batches: int, table: Table, t, device: torch.device,
                    precision: str, channels_last: bool, rng: np.random.Generator,
                    embeddings: torch.Tensor | None = None, desc: str = "",
                    grad_weights: list[float] | None = None) -> tuple[float, float]:
    """One pass over ``source`` ((idx, image batch or None) pairs); returns (mean loss, images per second).
    ``grad_weights[i]`` scales batch i's gradient (a torchrun rank's share of the global batch)."""
    from tqdm.auto import tqdm

    model, opt, accum, scaler = parts.model, parts.opt, t.accum_steps, parts.scaler
    amp, nb = amp_plan(device.type, precision), non_blocking(device)
    if amp.scaler != scaler.is_enabled():  # the components were built for another precision: a bug
        raise ValueError(f"precision {precision} on {device.type} but the GradScaler is {'on' if scaler.is_enabled() else 'off'}")
    total, seen, right, t0 = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(source, total=n_batches, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    opt.zero_grad(set_to_none=True)
    for i, (idx, x) in enumerate(bar):
        y = torch.from_numpy(table.labels[idx]).to(device, non_blocking=nb)
        f = features_tensor(table.features, idx, device)
        if x is not None:
            x = x.to(device, non_blocking=nb)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        pos = torch.arange(len(idx), device=device)  # mix_batch permutes any per-row tensor: the partners' positions
        x, partner, lam = mix_batch(x, pos, t, rng) if x is not None else (x, pos, 1.0)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
            logits = train_forward(parts, x, f, embeddings[idx] if x is None else None)
            logits = logits.float()
            loss = batch_loss(parts.loss_fn, logits, table, idx, y, partner, lam)
        scaler.scale(loss * (grad_weights[i] if grad_weights is not None else 1.0) / accum).backward()
        if (i + 1) % accum == 0 or i + 1 == n_batches:  # gradient accumulation
            if t.grad_clip:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(opt)  # skipped when fp16 gradients overflowed; the scale then backs off
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if parts.ema is not None:
                parts.ema.update(model)
            if parts.per_step:
                parts.sched.step()
        total += loss.item() * len(idx)
        seen += len(idx)
        right += (logits.argmax(1) == y).sum().item()  # against the batch's own labels (mixed or not)
        bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{right / seen:.3f}")
    return total / max(seen, 1), seen / (time.perf_counter() - t0)


class TrainStep(nn.Module):
    """The training forward as one module, which DDP wraps: it syncs gradients only through ``forward``,
    so the head-only path (cached embeddings) must go through it too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, f, emb=None):
        return self.model(x, f) if emb is None else self.model.forward_head(emb, f)


def train_forward(parts: Components, x, f, emb):
    """Training logits of image batch ``x`` (or cached embeddings ``emb``), through DDP under torchrun."""
    if parts.ddp is not None:
        return parts.ddp(x, f, emb)
    return parts.model(x, f) if emb is None else parts.model.forward_head(emb, f)


def validate(model: nn.Module, *, table: Table, idx: np.ndarray, batch_size: int, device: torch.device,
             channels_last: bool, precision: str, embeddings: torch.Tensor | None = None) -> np.ndarray:
    """The task's predictions (class probabilities) of rows ``idx``."""
    task = build_task(table.num_classes)
    if embeddings is not None:
        with torch.no_grad():
            model.eval()
            logits = model.forward_head(embeddings[idx], features_tensor(table.features, idx, device))
        return task.activate(logits.double().cpu().numpy())
    feats = Rows(table.features, idx) if table.features is not None else None
    return task.activate(predict_logits(model, Rows(table.images, idx), feats, batch_size, device, channels_last, precision))


class BatchSource(torch.utils.data.Dataset):
    """Batch ``b`` = rows ``batches[b]``, augmented with its own seed, as a float32 tensor."""

    def __init__(self, *, images, batches, augment, seeds):
        self.images, self.batches, self.augment, self.seeds = images, batches, augment, seeds

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        idx = self.batches[b]
        imgs = self.images[idx]
        if self.augment is not None:
            self.augment.set_seed(self.seeds[b])
            imgs = self.augment.batch(imgs)
        return idx, torch.from_numpy(np.ascontiguousarray(imgs, dtype=np.float32))


def _worker_init(worker_id: int) -> None:
    import cv2

    cv2.setNumThreads(0)  # OpenCV threads in DataLoader workers hang or oversubscribe (albumentations #1246)
    torch.set_num_threads(1)


def mixed_loss(loss_fn, logits: torch.Tensor, y: torch.Tensor, y2: torch.Tensor, lam: float) -> torch.Tensor:
    """Loss of a mixed batch: lam * loss(y) + (1 - lam) * loss(partner). Without class weights this is
    the cross-entropy against the soft target lam * onehot(y) + (1 - lam) * onehot(y2), for 2 or more classes."""
    if lam == 1.0:
        return loss_fn(logits, y)
    return lam * loss_fn(logits, y) + (1 - lam) * loss_fn(logits, y2)


def batch_loss(loss_fn, logits: torch.Tensor, table: Table, idx: np.ndarray, y: torch.Tensor, partner: torch.Tensor,
               lam: float) -> torch.Tensor:
    """The loss of batch ``idx`` (``partner``: each row's mixing partner's position). A table with per-row
    weights or soft targets (pseudo-labelled rows): each row's cross-entropy against its target (label
    smoothing and class weights as ``loss_fn`` has them) times its weight, over the batch's class-weight
    mass, so weights of 1 and one-hot targets give ``mixed_loss`` exactly; a mixed row takes lam of its
    own weighted loss and 1 - lam of its partner's."""
    if table.sample_weights is None and table.soft_targets is None:
        return mixed_loss(loss_fn, logits, y, y[partner], lam)
    dev, cw = logits.device, loss_fn.weight
    s = torch.from_numpy(np.asarray(table.sample_weights[idx], np.float32)).to(dev) if table.sample_weights is not None \
        else torch.ones(len(idx), device=dev)
    target = torch.from_numpy(np.asarray(table.soft_targets[idx], np.float32)).to(dev) if table.soft_targets is not None \
        else nn.functional.one_hot(y, logits.shape[1]).float()

    task = build_task(logits.shape[1])

    def weighted(tgt, w):
        per_row = task.row_loss(logits, tgt, weight=cw, label_smoothing=loss_fn.label_smoothing)
        mass = tgt @ cw if cw is not None else torch.ones_like(w)
        return (w * per_row).sum() / mass.sum()

    return weighted(target, s) if lam == 1.0 else lam * weighted(target, s) + (1 - lam) * weighted(target[partner], s[partner])


def mix_batch(x: torch.Tensor, y: torch.Tensor, t, rng: np.random.Generator):
    """Mixup or CutMix (chosen at random when both are on); returns (x, y_partner, lam)."""
    modes = [m for m, a in (("mixup", t.mixup_alpha), ("cutmix", t.cutmix_alpha)) if a > 0]
    if not modes or len(x) < 2 or rng.random() >= t.mix_prob:
        return x, y, 1.0
    mode = modes[rng.integers(len(modes))]
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    if mode == "mixup":
        lam = float(rng.beta(t.mixup_alpha, t.mixup_alpha))
        return lam * x + (1 - lam) * x[perm], y[perm], lam
    lam = float(rng.beta(t.cutmix_alpha, t.cutmix_alpha))
    h, w = x.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the pasted area's true share
    return x, y[perm], lam


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
            raise PipelineError(f"{self.job.last}: corrupt resume checkpoint ({type(e).__name__}); delete it to restart "
                                f"{what} (finished folds are kept)") from None
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

    def __init__(self, *, cfg: Config, table: Table, fold_of: np.ndarray, job: JobDir, device: torch.device,
                 run_hash: str, precision: str = "fp32", embeddings: torch.Tensor | None = None,
                 on_epoch: Callable | None = None, deadline: float | None = None, done_extra: dict | None = None,
                 dist: DistContext = DistContext()):
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
            EarlyStopping(patience=cfg.train.patience), Deadline(at=deadline, epochs=cfg.train.epochs)]
        self.artifacts = Artifacts(job=job, run_hash=run_hash, writes=dist.is_main)
        self._trainable = None  # which weights trained when DDP was last wrapped around the model

    def build(self) -> None:
        self.parts = build_components(cfg=self.cfg, table=self.table, tr_idx=self.tr_idx, seed=self.job.seed,
                                      device=self.device, channels_last=self.channels_last,
                                      with_augment=self.embeddings is None, precision=self.precision,
                                      world_size=self.dist.world_size)
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
        return epoch_batches(tr_idx=self.tr_idx, labels=self.table.labels, num_classes=self.table.num_classes,
                             t=self.cfg.train, n_steps=self.parts.steps_per_epoch, rng=rng, world_size=self.dist.world_size)

    def loader(self, batches: list[np.ndarray], epoch: int):
        """(idx, augmented float batch) pairs. Each batch's augmentation is seeded from (seed, fold,
        epoch, batch number), so results do not depend on ``train.num_workers``."""
        job = self.job
        rank = (self.dist.rank,) if self.dist.active else ()  # ranks draw their own augmentations of their shares
        ds = BatchSource(images=self.table.images, batches=batches, augment=self.parts.augment,
                         seeds=[derive_seed("aug", job.seed, job.fold, epoch, b, *rank) for b in range(len(batches))])
        if self.cfg.train.num_workers == 0:
            return (ds[b] for b in range(len(ds)))
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.cfg.train.num_workers,
                                                worker_init_fn=_worker_init, prefetch_factor=4, **loader_kwargs(self.device),
                                                # its own generator, so workers leave the global torch RNG alone
                                                generator=torch.Generator().manual_seed(derive_seed("loader", epoch))))

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
        loss, img_s = train_one_epoch(self.parts, source=source, n_batches=len(batches), table=self.table, t=cfg.train,
                                      device=self.device, precision=self.precision, channels_last=self.channels_last,
                                      rng=rng, embeddings=self.embeddings, desc=f"fold {job.fold} epoch {epoch}",
                                      grad_weights=weights)
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
        probs = validate(self.parts.eval_model, table=self.table, idx=idx, batch_size=self.cfg.train.batch_size * 2,
                         device=self.device, channels_last=self.channels_last, precision=self.precision,
                         embeddings=self.embeddings)
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
            raise PipelineError(f"{self.artifacts.last_path}: corrupt resume checkpoint ({type(e).__name__}); delete it to "
                                f"restart {self.job.label} (finished folds are kept)") from None
        progress = Progress(best=st["best"], bad_epochs=st["bad_epochs"], history=self.artifacts.history_until(st["epoch"]))
        log.info(f"{self.job.label}: resuming after epoch {st['epoch']} (best val_loss {progress.best['val_loss']:.4f} "
                 f"at epoch {progress.best['epoch']})")
        return st["epoch"] + 1, progress

    def _state(self, epoch: int, progress: Progress) -> dict:
        p = self.parts
        st = {"model": p.model.state_dict(), "opt": p.opt.state_dict(), "sched": p.sched.state_dict(),
              "epoch": epoch, "best": progress.best, "bad_epochs": progress.bad_epochs, "scaler": p.scaler.state_dict()}
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
            self.parts.sched.step(val_loss) if SCHEDULERS.get(cfg.train.scheduler).on_metric else self.parts.sched.step()
        improved = epoch == cfg.train.epochs if self.refit else val_loss < progress.best["val_loss"] - 1e-7
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, mname: val_metric, "lr": lr,
               "seconds": round(time.time() - t0, 3), "train_img_s": round(img_s, 1)}
        self.artifacts.record_epoch(progress, row, ("train_loss", "val_loss", mname, "lr"))
        if improved:
            progress.best, progress.bad_epochs = {"val_loss": val_loss, "epoch": epoch, mname: val_metric}, 0
            self.artifacts.save_best(self.parts.eval_model, self.meta(progress.best))
            if not self.refit:
                self.artifacts.write_oof(self.oof_frame(probs))
        else:
            progress.bad_epochs += 1
        log.info(f"fold {self.job.fold} epoch {epoch}/{cfg.train.epochs}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
                 f"{mname} {val_metric:.4f}  {row['seconds']:.1f}s{'  *' if improved else ''}")
        return row

    def _loop(self, resume: tuple[int, Progress]) -> dict:
        start, progress = resume
        cfg, job = self.cfg, self.job
        self.artifacts.open_tb(start)
        for epoch in range(start, cfg.train.epochs + 1):
            row = self._epoch(epoch, progress)
            self.artifacts.save_last(self._state(epoch, progress))
            # decided on rank 0 (its clock, its hook) and broadcast, so all ranks stop at the same epoch
            reasons = self.dist.broadcast_decision(lambda: [r for cb in self.callbacks if (r := cb(job, epoch, row, progress))])
            if reasons:
                log.info(reasons[0])
                break
        mname = f"val_{cfg.metric}"
        best = progress.best
        done = self.artifacts.finish({"hash": self.hash, "fold": job.fold, "seed": job.seed, "best_epoch": best["epoch"],
                                      "val_loss": best["val_loss"], mname: best.get(mname),
                                      "epochs_run": len(progress.history), "weights": self.parts.weights_source,
                                      "world_size": self.dist.world_size, **self.done_extra})
        self.dist.barrier()  # the job's files are written when any rank moves on
        return done

    def meta(self, best: dict) -> dict:
        t = self.table
        return {"model": self.cfg.model.model_dump(), "in_chans": t.channels, "img_size": list(t.image_size),
                "class_names": t.class_names, "feature_names": t.feature_names, "n_features": len(t.feature_names),
                "value_range": list(t.value_range), "fold": self.job.fold, "seed": self.job.seed,
                "config_hash": self.hash, "weights": self.parts.weights_source, "precision": self.precision,
                "ema": self.parts.ema is not None, "world_size": self.dist.world_size, **best}

    def oof_frame(self, probs: np.ndarray) -> pd.DataFrame:
        t = self.table
        return pred_frame(t.ids[self.va_idx], probs, t.class_names, fold=np.full(len(self.va_idx), self.job.fold),
                          target=t.labels[self.va_idx])
