"""Training stage: one model per fold (and seed), out-of-fold predictions, resumable.

Layout under ``runs/<competition>/<experiment>/``:
  config.train.yaml / .hash   resolved config and its train-stage hash
  fold_<k>/                   (``fold_<k>_seed<s>/`` when ``train.seeds`` has several)
      best.safetensors + best.json   best epoch's weights and what built them
      last.pt                        resume state (weights_only-loadable), removed when done
      history.csv                    epoch,train_loss,val_loss,val_<metric>,lr,seconds
      oof.csv                        this fold's validation predictions at the best epoch
      done.json                      written last: the fold is finished
      tb/                            TensorBoard scalars
  oof.csv                     id,fold,target,p_<class>... every training row exactly once

Randomness is derived from (seed, fold, epoch) at each epoch start, so a resumed fold
replays exactly what an uninterrupted one would.
"""
from __future__ import annotations

import logging
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import STAGE_SECTIONS, Config, write_snapshot
from .device import resolve_device
from .errors import LockHeld, PipelineError
from .fold import folds_digest, load_folds
from .inference import autocast, features_tensor, predict_logits, softmax, to_tensor
from .io import atomic_path, atomic_write_csv, atomic_write_json, exclusive
from .metrics import logloss, score
from .models import apply_finetune, build_model, freeze_bn_stats, save_checkpoint, unfreeze_all
from .table import Table

log = logging.getLogger(__name__)


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def job_name(fold: int, seed: int, n_seeds: int) -> str:
    return f"fold_{fold}" if n_seeds == 1 else f"fold_{fold}_seed{seed}"


@dataclass
class Job:
    fold: int
    seed: int
    dir: Path


# ---- optimiser and schedule ------------------------------------------------------------

def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": head, "lr": t.lr}]
    if backbone:  # discriminative LR; frozen params are included so gradual unfreezing needs no rebuild
        groups.append({"params": backbone, "lr": t.lr * cfg.model.backbone_lr_mult})
    # One fused kernel per step instead of ~6 ops per tensor: ~5% faster steps for
    # tf_efficientnet_lite0 on 2 CPU cores (benchmarks/train_throughput.py); deterministic.
    fused = {"fused": True} if model_device(model).type in ("cpu", "cuda") else {}
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.momentum > 0, **fused)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay, **fused)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, **fused)
    return torch.optim.RMSprop(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_scheduler(cfg: Config, opt, steps_per_epoch: int):
    """Returns (scheduler, per_step). Cosine and one-cycle step per batch, the others per epoch."""
    t = cfg.train
    total = t.epochs * steps_per_epoch
    warm = int(t.warmup_epochs * steps_per_epoch)
    if t.scheduler == "cosine":
        def f(step):
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return torch.optim.lr_scheduler.LambdaLR(opt, f), True
    if t.scheduler == "onecycle":
        max_lr = [g["lr"] for g in opt.param_groups]
        total = max(total, 4)
        # warm-up share of the run; at least 2 steps each way (OneCycleLR divides by both phases)
        pct = min(max(warm / total if warm else 0.3, 2 / total), 1 - 2 / total)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=pct), True
    if t.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.gamma), False
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=t.gamma, patience=max(1, t.patience // 2)), False
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), True


# ---- the loop -------------------------------------------------------------------------

class FoldTrainer:
    def __init__(self, cfg: Config, table: Table, fold_of: np.ndarray, job: Job, device: torch.device,
                 run_hash: str, embeddings: torch.Tensor | None = None, on_epoch=None,
                 precision: str = "fp32", deadline: float | None = None):
        self.cfg, self.table, self.job, self.device, self.hash = cfg, table, job, device, run_hash
        self.on_epoch, self.precision, self.deadline = on_epoch, precision, deadline
        self.refit = job.fold < 0  # refit on all rows: no validation, the last epoch is kept
        self.tr_idx = np.flatnonzero(fold_of != job.fold)
        self.va_idx = np.flatnonzero(fold_of == job.fold)
        if (len(self.va_idx) == 0 and not self.refit) or len(self.tr_idx) == 0:
            raise PipelineError(f"{cfg.folds_path}: fold {job.fold} is empty; rerun `pipeline fold {cfg.path}`")
        self.embeddings = embeddings
        self.channels_last = cfg.train.channels_last and device.type != "mps" and embeddings is None

    def build(self):
        cfg, t = self.cfg, self.table
        seed_everything(derive_seed("init", self.job.seed))
        model, self.weights_source = build_model(cfg, t.channels, t.num_classes, len(t.feature_names), t.image_size)
        model.fit_normalisation(t.images, t.features)
        apply_finetune(model, cfg.model.finetune, cfg.model.unfreeze_stages)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = None
        if cfg.train.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
        self.opt = build_optimizer(cfg, model)
        self.steps_per_epoch = self._steps_per_epoch()
        # per-step schedules advance once per optimizer step, i.e. every accum_steps batches
        self.sched, self.per_step = build_scheduler(cfg, self.opt, math.ceil(self.steps_per_epoch / cfg.train.accum_steps))
        from .augment import build_augment

        self.augment = None if self.embeddings is not None else build_augment(
            cfg.augment, t.value_range, t.channels, t.image_size, seed=self.job.seed, where=f"{cfg.path}: augment")
        counts = np.bincount(t.labels[self.tr_idx], minlength=t.num_classes)
        weight = None
        if cfg.train.class_weights == "balanced":
            weight = torch.tensor(len(self.tr_idx) / (t.num_classes * np.maximum(counts, 1)), dtype=torch.float32)
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing).to(self.device)

    def _steps_per_epoch(self) -> int:
        n = len(self.tr_idx) // self.cfg.train.batch_size + (len(self.tr_idx) % self.cfg.train.batch_size > 1)
        n = max(n, 1)
        return min(n, self.cfg.train.max_steps_per_epoch or n)

    # -- state for resume --
    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and checkpointed: the EMA when it is on."""
        return self.ema.module if self.ema is not None else self.model

    def state(self, epoch: int, best: dict, bad_epochs: int) -> dict:
        st = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
              "epoch": epoch, "best": best, "bad_epochs": bad_epochs, "hash": self.hash}
        if self.ema is not None:
            st["ema"] = self.ema.state_dict()
        return st

    def resume(self, path: Path) -> dict | None:
        """Load the resume state into model, optimiser and scheduler; None if it is another config's."""
        try:
            st = torch.load(path, map_location=self.device, weights_only=True)
            if st.get("hash") != self.hash:
                return None
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["opt"])
            self.sched.load_state_dict(st["sched"])
            if self.ema is not None:
                self.ema.load_state_dict(st["ema"])
            return st
        except Exception as e:
            raise PipelineError(f"{path}: corrupt resume checkpoint ({type(e).__name__}); delete it to restart fold {self.job.fold} (finished folds are kept)") from None

    def epoch_batches(self, epoch: int, rng: np.random.Generator) -> list[np.ndarray]:
        t, bs = self.table, self.cfg.train.batch_size
        if self.cfg.train.balanced_sampling:  # each class drawn equally often, with replacement
            y = t.labels[self.tr_idx]
            w = 1.0 / np.bincount(y, minlength=t.num_classes)[y]
            order = rng.choice(self.tr_idx, size=len(self.tr_idx), replace=True, p=w / w.sum())
        else:
            order = rng.permutation(self.tr_idx)
        batches = [np.sort(order[i:i + bs]) for i in range(0, len(order), bs)]  # sorted: memmap-friendly
        if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm cannot train on one sample
            batches = batches[:-1]
        return batches[: self.steps_per_epoch]

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the training rows; returns (mean loss, training images per second)."""
        cfg, t, model = self.cfg, self.table, self.model
        if cfg.model.unfreeze_after and epoch > cfg.model.unfreeze_after:
            unfreeze_all(model)
        rng = seed_everything(derive_seed("epoch", self.job.seed, self.job.fold, epoch))
        model.train()
        freeze_bn_stats(model)
        batches = self.epoch_batches(epoch, rng)
        accum = cfg.train.accum_steps
        total, seen, right, t0 = 0.0, 0, 0, time.perf_counter()
        from tqdm.auto import tqdm

        source = self.loader(batches, epoch) if self.embeddings is None else ((idx, None) for idx in batches)
        bar = tqdm(source, total=len(batches), desc=f"fold {self.job.fold} epoch {epoch}", leave=False, disable=None, dynamic_ncols=True)
        self.opt.zero_grad(set_to_none=True)
        for i, (idx, x) in enumerate(bar):
            y = torch.from_numpy(t.labels[idx]).to(self.device)
            f = features_tensor(t.features, idx, self.device)
            if x is not None:
                x = x.to(self.device)
                x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
            x, y2, lam = mix_batch(x, y, cfg.train, rng) if x is not None else (x, y, 1.0)
            with autocast(self.device, self.precision):
                logits = model(x, f) if x is not None else model.forward_head(self.embeddings[idx], f)
                logits = logits.float()
                loss = mixed_loss(self.loss_fn, logits, y, y2, lam)
            (loss / accum).backward()
            if (i + 1) % accum == 0 or i + 1 == len(batches):  # gradient accumulation
                if cfg.train.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(model)
                if self.per_step:
                    self.sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            right += (logits.argmax(1) == y).sum().item()  # against the batch's own labels (mixed or not)
            bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{right / seen:.3f}")
        return total / max(seen, 1), seen / (time.perf_counter() - t0)

    def loader(self, batches: list[np.ndarray], epoch: int):
        """(idx, augmented float batch) pairs. Each batch's augmentation is seeded from (seed, fold,
        epoch, batch number), so results do not depend on ``train.num_workers``."""
        ds = BatchSource(self.table.images, batches, self.augment,
                         [derive_seed("aug", self.job.seed, self.job.fold, epoch, b) for b in range(len(batches))])
        if self.cfg.train.num_workers == 0:
            return (ds[b] for b in range(len(ds)))
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.cfg.train.num_workers,
                                                worker_init_fn=_worker_init, prefetch_factor=4,
                                                # its own generator, so workers leave the global torch RNG alone
                                                generator=torch.Generator().manual_seed(derive_seed("loader", epoch))))

    def validate(self) -> np.ndarray:
        t, model = self.table, self.eval_model
        if self.embeddings is not None:
            with torch.no_grad():
                model.eval()
                idx = self.va_idx
                logits = model.forward_head(self.embeddings[idx], features_tensor(t.features, idx, self.device))
            return softmax(logits.double().cpu().numpy())
        logits = predict_logits(model, _Rows(t.images, self.va_idx), _Rows(t.features, self.va_idx) if t.features is not None else None,
                                self.cfg.train.batch_size * 2, self.device, self.channels_last, self.precision)
        return softmax(logits)

    def run(self) -> dict:
        """Train the fold to the end (or resume it); one process per fold at a time."""
        self.job.dir.mkdir(parents=True, exist_ok=True)
        what = "refit" if self.refit else f"fold {self.job.fold}"
        with exclusive(self.job.dir / "lock", what):
            return self._run()

    def _run(self) -> dict:
        cfg, job, t = self.cfg, self.job, self.table
        self.build()
        last, hist_path = job.dir / "last.pt", job.dir / "history.csv"
        history, best, bad, start = [], {"val_loss": math.inf, "epoch": 0}, 0, 1
        if last.exists():
            st = self.resume(last)
            if st is None:
                log.info(f"fold {job.fold}: resume state is from another config; starting over")
            else:
                start, best, bad = st["epoch"] + 1, st["best"], st["bad_epochs"]
                if hist_path.exists():
                    history = pd.read_csv(hist_path).query("epoch <= @start - 1").to_dict("records")
                log.info(f"fold {job.fold}: resuming after epoch {st['epoch']} (best val_loss {best['val_loss']:.4f} at epoch {best['epoch']})")
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(job.dir / "tb"), purge_step=start)
        mname = f"val_{cfg.metric}"
        y_va = t.labels[self.va_idx]
        for epoch in range(start, cfg.train.epochs + 1):
            t0 = time.time()
            train_loss, img_s = self.train_epoch(epoch)
            if self.refit:
                probs, val_loss, val_metric = None, math.nan, math.nan
            else:
                probs = self.validate()
                val_loss = logloss(y_va, probs, cfg.evaluate.eps)
                val_metric = score(cfg.metric, y_va, probs, cfg.evaluate.eps)
            lr = self.opt.param_groups[0]["lr"]
            if not self.per_step:
                self.sched.step(val_loss) if cfg.train.scheduler == "plateau" else self.sched.step()
            improved = epoch == cfg.train.epochs if self.refit else val_loss < best["val_loss"] - 1e-7
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, mname: val_metric, "lr": lr,
                   "seconds": round(time.time() - t0, 3), "train_img_s": round(img_s, 1)}
            history.append(row)
            atomic_write_csv(hist_path, pd.DataFrame(history))
            for k in ("train_loss", "val_loss", mname, "lr"):
                tb.add_scalar(k, row[k], epoch)
            if improved:
                best, bad = {"val_loss": val_loss, "epoch": epoch, mname: val_metric}, 0
                save_checkpoint(self.eval_model, job.dir / "best.safetensors", self.meta(best))
                if not self.refit:
                    self.write_fold_oof(probs)
            else:
                bad += 1
            log.info(f"fold {job.fold} epoch {epoch}/{cfg.train.epochs}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
                      f"{mname} {val_metric:.4f}  {row['seconds']:.1f}s{'  *' if improved else ''}")
            stop = cfg.train.patience and bad >= cfg.train.patience
            with atomic_path(last) as tmp:
                torch.save(self.state(epoch, best, bad), tmp)
            if self.on_epoch is not None:  # e.g. an Optuna pruner; may raise to stop at once
                try:
                    self.on_epoch(job, epoch, row)
                except BaseException:
                    tb.close()  # else its writer thread outlives the fold (one per pruned trial)
                    raise
            if stop:
                log.info(f"fold {job.fold}: early stop after {bad} epochs without val_loss improvement")
                break
            if self.deadline is not None and time.time() >= self.deadline and epoch < cfg.train.epochs:
                log.info(f"fold {job.fold}: time budget share spent after epoch {epoch}; keeping the best epoch ({best['epoch']})")
                break
        tb.close()
        done = {"hash": self.hash, "fold": job.fold, "seed": job.seed, "best_epoch": best["epoch"],
                "val_loss": best["val_loss"], mname: best.get(mname), "epochs_run": len(history),
                "weights": self.weights_source}
        atomic_write_json(job.dir / "done.json", done)
        last.unlink(missing_ok=True)
        return done

    def meta(self, best: dict) -> dict:
        t = self.table
        return {"model": self.cfg.model.model_dump(), "in_chans": t.channels, "img_size": list(t.image_size),
                "class_names": t.class_names, "feature_names": t.feature_names, "n_features": len(t.feature_names),
                "value_range": list(t.value_range), "fold": self.job.fold, "seed": self.job.seed,
                "config_hash": self.hash, "weights": self.weights_source, "precision": self.precision,
                "ema": self.ema is not None, **best}

    def write_fold_oof(self, probs: np.ndarray) -> None:
        t = self.table
        df = pd.DataFrame({"id": t.ids[self.va_idx], "fold": self.job.fold, "target": t.labels[self.va_idx]})
        for k, name in enumerate(t.class_names):
            df[f"p_{name}"] = probs[:, k]
        atomic_write_csv(self.job.dir / "oof.csv", df, float_format="%.8g")


class BatchSource(torch.utils.data.Dataset):
    """Batch ``b`` = rows ``batches[b]``, augmented with its own seed, as a float32 tensor."""

    def __init__(self, images, batches, augment, seeds):
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


class _Rows:
    """Lazy row subset of an array (avoids copying a memmap to predict a fold)."""

    def __init__(self, arr, idx):
        self.arr, self.idx = arr, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.arr[self.idx[i]]


# ---- CV driver -------------------------------------------------------------------------

def _caches_embeddings(cfg: Config) -> bool:
    m = cfg.model  # mixing, augmentation and unfreezing all need the images themselves
    return m.finetune == "head" and not (cfg.augment or m.unfreeze_after or cfg.train.mixup_alpha or cfg.train.cutmix_alpha)


def _head_embeddings(cfg: Config, table: Table, device: torch.device, seed: int) -> torch.Tensor | None:
    """With a frozen backbone and no augmentation, features are computed once for every fold."""
    if not _caches_embeddings(cfg):
        return None
    seed_everything(derive_seed("init", seed))  # the same init as each fold's model
    model, _ = build_model(cfg, table.channels, table.num_classes, len(table.feature_names), table.image_size)
    model.fit_normalisation(table.images, table.features)
    model.to(device).eval()
    t0 = time.time()
    with torch.no_grad():
        out = [model.embed(to_tensor(table.images[s:s + 256], device)) for s in range(0, len(table), 256)]
    log.info(f"head-only: cached backbone features of {len(table)} images in {time.time() - t0:.1f}s")
    return torch.cat(out)


def train_cv(cfg: Config, folds: list[int] | None = None, table: Table | None = None,
             on_epoch=None, on_fold=None) -> pd.DataFrame | None:
    """Train every requested fold (skipping finished ones); returns the OOF frame once all folds are done.

    ``on_epoch(job, epoch, history_row)`` runs after each epoch and ``on_fold(job, done)`` after each
    finished fold (done.json contents); either may raise to stop training (e.g. optuna.TrialPruned).
    """
    from .formats import read_table

    table = table if table is not None else read_table(cfg, "train")
    fold_of = load_folds(cfg, table)
    n_folds = int(fold_of.max()) + 1
    wanted = list(range(n_folds)) if folds is None else folds
    bad = [k for k in wanted if not 0 <= k < n_folds]
    if bad:
        raise PipelineError(f"--folds: no fold {bad[0]}; {cfg.folds_path} has folds 0..{n_folds - 1}")
    device = resolve_device(cfg.train.device)
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    config_hash = cfg.hash(*STAGE_SECTIONS["train"])
    run_hash = job_hash(cfg)
    seeds = cfg.train.seeds or [cfg.train.seed]
    precision = _run_precision(cfg, table, device, run, config_hash)
    write_snapshot(cfg, run / "config.train.yaml", "train",
                   {"train.precision": precision} if cfg.train.precision == "auto" else None)
    jobs = [(seed, k) for seed in seeds for k in wanted]
    n_refit = len(seeds) if cfg.train.refit else 0  # the time budget is shared by the refit models too
    t_start = time.time()
    log.info(f"train {cfg.name}: {cfg.model.backbone} ({'pretrained' if cfg.model.pretrained else 'from scratch'}, finetune {cfg.model.finetune}) "
         f"on {len(table)} images {table.channels}x{table.image_size[0]}x{table.image_size[1]}, folds {wanted}, seeds {seeds}, device {device}")
    todo = [job for job in (Job(k, seed, run / job_name(k, seed, len(seeds))) for seed, k in jobs)
            if _needs_training(job, run_hash, len(seeds))]
    n_par = min(cfg.train.fold_jobs, len(todo))
    if n_par > 1 and device.type == "cpu" and on_epoch is None and on_fold is None and not _caches_embeddings(cfg):
        from .fold_jobs import run_parallel

        run_parallel(cfg, todo, n_par, run_hash, precision, t_start, len(todo) + n_refit)
        todo = []
    embeddings, emb_seed = None, None
    for j, job in enumerate(todo):
        k, seed = job.fold, job.seed
        if emb_seed != seed:
            embeddings, emb_seed = None, seed
        if embeddings is None:
            embeddings = _head_embeddings(cfg, table, device, seed)
        deadline = _deadline(cfg, t_start, len(todo) - j + n_refit)
        res = job_outcome(job, FoldTrainer(cfg, table, fold_of, job, device, run_hash, embeddings, on_epoch,
                                           precision, deadline).run)
        if res is not None and on_fold is not None:
            on_fold(job, res)
    oof = collect_oof(cfg, table, fold_of, run_hash)
    if oof is not None and cfg.train.refit:
        for i, seed in enumerate(seeds):
            refit(cfg, table, fold_of, seed, device, run_hash, precision, _deadline(cfg, t_start, len(seeds) - i))
    return oof


def job_outcome(job: Job, run) -> dict | None:
    """``run()`` a fold job and say how it ended: its done.json contents, or None when another
    process (GPU, machine) holds the fold, which is then left to it."""
    try:
        res = run()
    except LockHeld as e:
        log.info(f"fold {job.fold}: skipping, {e}")
        return None
    log.info(f"fold {job.fold}: best epoch {res['best_epoch']}, val_loss {res['val_loss']:.4f}")
    return res


def job_hash(cfg: Config) -> str:
    """What a finished fold is valid for: this training config *and* these fold assignments (a
    regenerated folds file with the same settings, e.g. from changed data, retrains)."""
    return f"{cfg.hash(*STAGE_SECTIONS['train'])}-{folds_digest(cfg)}"


def _needs_training(job: Job, run_hash: str, n_seeds: int) -> bool:
    """False for a job finished under this run hash; a job finished under another one starts over."""
    done = job.dir / "done.json"
    if done.exists() and json.loads(done.read_text()).get("hash") == run_hash:
        log.info(f"fold {job.fold}{'' if n_seeds == 1 else f' seed {job.seed}'}: done, skipping")
        return False
    if done.exists():
        log.info(f"fold {job.fold}: finished under another config; retraining")
        done.unlink()
    return True


def _deadline(cfg: Config, t_start: float, jobs_left: int) -> float | None:
    """When the next job must stop: the budget left, shared equally by the jobs left."""
    if not cfg.train.time_budget_s:
        return None
    left = cfg.train.time_budget_s - (time.time() - t_start)
    return time.time() + max(left, 0) / max(jobs_left, 1)


def refit(cfg: Config, table: Table, fold_of: np.ndarray, seed: int, device, run_hash: str, precision: str,
          deadline: float | None = None) -> dict:
    """Train on every row for the epoch count CV chose (median best epoch); saved under ``refit[_seed<s>]/``."""
    seeds = cfg.train.seeds or [cfg.train.seed]
    n_folds = int(fold_of.max()) + 1
    best = [json.loads((cfg.run_dir / job_name(k, seed, len(seeds)) / "done.json").read_text())["best_epoch"] for k in range(n_folds)]
    epochs = max(1, int(np.median(best)))
    d = cfg.run_dir / ("refit" if len(seeds) == 1 else f"refit_seed{seed}")
    done = d / "done.json"
    if done.exists() and json.loads(done.read_text()).get("hash") == run_hash:
        log.info(f"refit{'' if len(seeds) == 1 else f' seed {seed}'}: done, skipping")
        return json.loads(done.read_text())
    log.info(f"refit on all {len(table)} rows for {epochs} epochs (median best epoch of the folds: {best})")
    rcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs, "patience": 0})})
    job = Job(-1, seed, d)
    return FoldTrainer(rcfg, table, np.full(len(table), 0), job, device, run_hash, None, None, precision, deadline).run()


def _run_precision(cfg: Config, table: Table, device, run: Path, config_hash: str) -> str:
    """Resolve ``train.precision`` once per run and keep it in ``precision.json`` so resumes (and
    folds trained later, elsewhere) reuse it; a changed config resolves it again."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    path = run / "precision.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("hash") == config_hash:
            return saved["precision"]
    from .precision import resolve_precision

    seed_everything(0)
    model, _ = build_model(cfg, table.channels, table.num_classes, len(table.feature_names), table.image_size, load_weights=False)
    model.to(device)
    bs = min(cfg.train.batch_size, len(table))
    x = to_tensor(table.images[:bs], device, cfg.train.channels_last)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    feats = features_tensor(table.features, np.arange(bs), device)
    choice = resolve_precision("auto", model, x, feats, f"{cfg.model.backbone}|cl={cfg.train.channels_last}")
    atomic_write_json(path, {"precision": choice, "hash": config_hash})
    return choice


def collect_oof(cfg: Config, table: Table, fold_of: np.ndarray, run_hash: str) -> pd.DataFrame | None:
    """Average seeds per fold and write ``oof.csv`` when every fold is finished."""
    run = cfg.run_dir
    seeds = cfg.train.seeds or [cfg.train.seed]
    n_folds = int(fold_of.max()) + 1
    frames, waiting = [], []
    for k in range(n_folds):
        per_seed = []
        for s in seeds:
            d = run / job_name(k, s, len(seeds))
            ok = (d / "done.json").exists() and json.loads((d / "done.json").read_text()).get("hash") == run_hash
            if not ok:
                waiting.append(k)
                break
            per_seed.append(pd.read_csv(d / "oof.csv", dtype={"id": str}))
        else:
            df = per_seed[0].copy()
            pcols = [c for c in df.columns if c.startswith("p_")]
            df[pcols] = np.mean([f[pcols].to_numpy() for f in per_seed], axis=0)
            frames.append(df)
    if waiting:
        log.info(f"oof.csv waits for fold(s) {sorted(set(waiting))}")
        return None
    oof = pd.concat(frames).set_index("id").reindex(pd.Index(table.ids.astype(str), name="id")).reset_index()
    if oof["fold"].isna().any() or len(oof) != len(table):
        raise PipelineError(f"{run}: fold predictions do not cover every training row exactly once; rerun `pipeline train {cfg.path}`")
    oof["fold"] = oof["fold"].astype(int)
    oof["target"] = oof["target"].astype(int)
    atomic_write_csv(run / "oof.csv", oof, float_format="%.8g")
    probs = oof[[f"p_{c}" for c in table.class_names]].to_numpy()
    log.info(f"wrote {run / 'oof.csv'}: OOF {cfg.metric} {score(cfg.metric, oof['target'].to_numpy(), probs):.4f}, "
         f"logloss {logloss(oof['target'].to_numpy(), probs):.4f}")
    return oof
