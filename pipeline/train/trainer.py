"""The pieces of a training loop: ``build_components`` makes the model, EMA, optimiser, schedule,
augmentation and the task's loss; ``train_one_epoch`` and ``validate`` are plain functions over them;
the batches, the mixing (mixup, CutMix) and the per-row loss of pseudo-labelled rows. One job runs
them in ``pipeline.train.job.FoldTrainer``; planning times them (``pipeline.plan.speed``).

Randomness is derived from (seed, fold, epoch) at each epoch start, so a resumed fold replays
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.config.schema import Config
from pipeline.core.device import amp_plan, non_blocking
from pipeline.data.table import Table
from pipeline.models.backbones import apply_finetune, build_model, finetune_stage
from pipeline.models.inference import Rows, features_tensor, predict_logits
from pipeline.tasks import build_task
from pipeline.train.optim import build_optimizer, build_scheduler

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
    return m.finetune == "head" and not (
        cfg.augment or m.unfreeze_after or cfg.train.mixup_alpha or cfg.train.cutmix_alpha
    )


def steps_per_epoch(n_rows: int, t, world_size: int = 1) -> int:
    # a last batch of fewer than 2 rows per rank is dropped (BatchNorm)
    n = n_rows // t.batch_size + (n_rows % t.batch_size >= 2 * world_size)
    n = max(n, 1)
    return min(n, t.max_steps_per_epoch or n)


def build_components(
    *,
    cfg: Config,
    table: Table,
    tr_idx: np.ndarray,
    seed: int,
    device: torch.device,
    channels_last: bool,
    with_augment: bool,
    precision: str = "fp32",
    world_size: int = 1,
) -> Components:
    if cfg.train.epochs == "auto":  # a caller skipped the plan: a bug, not bad input
        raise ValueError("train.epochs is auto: resolve the config with pipeline.plan.store.planned(cfg) first")
    seed_everything(derive_seed("init", seed))
    model, weights_source = build_model(
        cfg, table.channels, table.num_classes, len(table.feature_names), table.image_size
    )
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

        augment = build_augment(
            cfg.augment, table.value_range, table.channels, table.image_size, seed=seed, where=f"{cfg.path}: augment"
        )
    counts = class_mass(table, tr_idx)
    weight = None
    if cfg.train.class_weights == "balanced":
        weight = torch.tensor(counts.sum() / (table.num_classes * np.maximum(counts, 1)), dtype=torch.float32)
    from pipeline.config.auto import resolve_label_smoothing

    task = build_task(table.num_classes)
    loss_fn = task.loss(weight=weight, label_smoothing=resolve_label_smoothing(cfg, task)).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_plan(device.type, precision).scaler)
    return Components(
        model=model,
        ema=ema,
        opt=opt,
        sched=sched,
        per_step=per_step,
        loss_fn=loss_fn,
        augment=augment,
        steps_per_epoch=n_steps,
        weights_source=weights_source,
        scaler=scaler,
    )


def class_mass(table: Table, idx: np.ndarray) -> np.ndarray:
    """Rows per class among ``idx``, each counted with its loss weight and (soft) target: plain counts
    for a table without them."""
    if table.sample_weights is None and table.soft_targets is None:
        return np.bincount(table.labels[idx], minlength=table.num_classes)
    w = table.sample_weights[idx] if table.sample_weights is not None else np.ones(len(idx))
    t = table.soft_targets[idx] if table.soft_targets is not None else np.eye(table.num_classes)[table.labels[idx]]
    return (w[:, None] * t).sum(0)


# ---- one epoch -----------------------------------------------------------------------------


def epoch_batches(
    *,
    tr_idx: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    t,
    n_steps: int,
    rng: np.random.Generator,
    world_size: int = 1,
) -> list[np.ndarray]:
    """The epoch's global batches (a torchrun rank trains its share of each: ``DistContext.shard_batches``)."""
    bs = t.batch_size
    if t.balanced_sampling:  # each class drawn equally often, with replacement
        y = labels[tr_idx]
        w = 1.0 / np.bincount(y, minlength=num_classes)[y]
        order = rng.choice(tr_idx, size=len(tr_idx), replace=True, p=w / w.sum())
    else:
        order = rng.permutation(tr_idx)
    batches = [np.sort(order[i : i + bs]) for i in range(0, len(order), bs)]  # sorted: memmap-friendly
    if len(batches) > 1 and len(batches[-1]) < 2 * world_size:  # BatchNorm cannot train on one sample (per rank)
        batches = batches[:-1]
    return batches[:n_steps]


def train_one_epoch(
    parts: Components,
    *,
    source,
    n_batches: int,
    table: Table,
    t,
    device: torch.device,
    precision: str,
    channels_last: bool,
    rng: np.random.Generator,
    embeddings: torch.Tensor | None = None,
    desc: str = "",
    grad_weights: list[float] | None = None,
) -> tuple[float, float]:
    """One pass over ``source`` ((idx, image batch or None) pairs); returns (mean loss, images per second).
    ``grad_weights[i]`` scales batch i's gradient (a torchrun rank's share of the global batch)."""
    from tqdm.auto import tqdm

    model, opt, accum, scaler = parts.model, parts.opt, t.accum_steps, parts.scaler
    amp, nb = amp_plan(device.type, precision), non_blocking(device)
    if amp.scaler != scaler.is_enabled():  # the components were built for another precision: a bug
        raise ValueError(
            f"precision {precision} on {device.type} but the GradScaler is {'on' if scaler.is_enabled() else 'off'}"
        )
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


def validate(
    model: nn.Module,
    *,
    table: Table,
    idx: np.ndarray,
    batch_size: int,
    device: torch.device,
    channels_last: bool,
    precision: str,
    embeddings: torch.Tensor | None = None,
) -> np.ndarray:
    """The task's predictions (class probabilities) of rows ``idx``."""
    task = build_task(table.num_classes)
    if embeddings is not None:
        with torch.no_grad():
            model.eval()
            logits = model.forward_head(embeddings[idx], features_tensor(table.features, idx, device))
        return task.activate(logits.double().cpu().numpy())
    feats = Rows(table.features, idx) if table.features is not None else None
    return task.activate(
        predict_logits(model, Rows(table.images, idx), feats, batch_size, device, channels_last, precision)
    )


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


def batch_loss(
    loss_fn, logits: torch.Tensor, table: Table, idx: np.ndarray, y: torch.Tensor, partner: torch.Tensor, lam: float
) -> torch.Tensor:
    """The loss of batch ``idx`` (``partner``: each row's mixing partner's position). A table with per-row
    weights or soft targets (pseudo-labelled rows): each row's cross-entropy against its target (label
    smoothing and class weights as ``loss_fn`` has them) times its weight, over the batch's class-weight
    mass, so weights of 1 and one-hot targets give ``mixed_loss`` exactly; a mixed row takes lam of its
    own weighted loss and 1 - lam of its partner's."""
    if table.sample_weights is None and table.soft_targets is None:
        return mixed_loss(loss_fn, logits, y, y[partner], lam)
    dev, cw = logits.device, loss_fn.weight
    s = (
        torch.from_numpy(np.asarray(table.sample_weights[idx], np.float32)).to(dev)
        if table.sample_weights is not None
        else torch.ones(len(idx), device=dev)
    )
    target = (
        torch.from_numpy(np.asarray(table.soft_targets[idx], np.float32)).to(dev)
        if table.soft_targets is not None
        else nn.functional.one_hot(y, logits.shape[1]).float()
    )

    task = build_task(logits.shape[1])

    def weighted(tgt, w):
        per_row = task.row_loss(logits, tgt, weight=cw, label_smoothing=loss_fn.label_smoothing)
        mass = tgt @ cw if cw is not None else torch.ones_like(w)
        return (w * per_row).sum() / mass.sum()

    return (
        weighted(target, s)
        if lam == 1.0
        else lam * weighted(target, s) + (1 - lam) * weighted(target[partner], s[partner])
    )


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
