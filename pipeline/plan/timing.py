"""Timing a config on this machine: a few real training steps and a validation pass on synthetic images of
the data's shape (``measure_speed``), beside the sibling jobs ``train.fold_jobs`` runs with it, cached per
machine in ``<cache>/throughput.json``. The plan times only small sizes and estimates the rest
(``pipeline.plan.speed.CostModel``), so no timing step is ever larger than the run can afford.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable

import numpy as np

from pipeline.config.schema import Config
from pipeline.plan.facts import Facts
from pipeline.plan.siblings import _Siblings
from pipeline.plan.speed import Speed

log = logging.getLogger(__name__)


def _synthetic_table(facts: Facts, size: int, n: int):
    from pipeline.data.table import Table

    rng = np.random.default_rng(0)
    lo, hi = facts.value_range
    shape = (n, facts.channels, size, size)
    images = (
        rng.integers(0, 256, shape, dtype=np.uint8)
        if facts.dtype == "uint8"
        else rng.uniform(lo, hi, shape).astype(facts.dtype)
    )
    feats = np.zeros((n, facts.n_features), np.float32) if facts.n_features else None
    return Table(
        ids=np.asarray([str(i) for i in range(n)], dtype=object),
        images=images,
        class_names=list(facts.class_names),
        labels=np.arange(n) % len(facts.class_names),
        features=feats,
        feature_names=list(facts.feature_names),
        value_range=facts.value_range,
    )


MEASURE_VERSION = 4  # in the cache key: a changed way of measuring measures again
MEASURE_TTL_S = 600  # a cached speed older than this is timed again: this machine's speed drifted 25%
# within half an hour (lite0 at 75 px timed 75 img/s, trained at 100-110 19 min later)


def measure_speed(
    cfg: Config, facts: Facts, size: int, threads: int, seconds: float = 2.5, siblings: int = 0, quick: bool = False
) -> Speed:
    """Time real training steps and a validation pass of ``cfg``'s model at ``size`` px on ``threads``
    threads, beside ``siblings`` copies of the same training (the jobs that run side by side:
    ``train.fold_jobs``); cached per machine, model, shape, batch, augmentation and precision. ``quick``:
    fewer, shorter chunks and the job's fixed costs estimated instead of timed (the plan's bounded share)."""
    import torch

    from pipeline.core.io import atomic_write_json, cache_dir
    from pipeline.train.precision import _machine

    t = cfg.train
    from pipeline.core.device import resolve_device

    device = resolve_device(cfg.train.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    key = "|".join(
        map(
            str,
            [
                MEASURE_VERSION,
                _machine(),
                device.type,
                gpu,
                cfg.model.backbone,
                cfg.model.finetune,
                cfg.model.input_size,
                size,
                facts.channels,
                facts.n_features,
                t.batch_size,
                t.precision,
                t.channels_last,
                threads,
                siblings,
                "quick" if quick else "full",
                hashlib.sha256(json.dumps(cfg.augment, sort_keys=True).encode()).hexdigest()[:8],
            ],
        )
    )
    path = cache_dir() / "throughput.json"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        cache = {}
    entry = cache.get(key)
    if not isinstance(entry, dict) or not time.time() - entry.get("at", 0) < MEASURE_TTL_S:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            entry = cache[key] = {
                **_time_steps(cfg, facts, size, min(seconds, QUICK_S) if quick else seconds, device, siblings, quick),
                "at": round(time.time(), 1),
            }
        finally:
            torch.set_num_threads(before)
        atomic_write_json(path, cache)
    return Speed(**{k: v for k, v in entry.items() if k != "at"})


QUICK_S = 0.8  # seconds of timed chunks in a quick timing
QUICK_EPOCH_S = (
    0.3  # a job's per-epoch cost besides its images when not timed: checkpoint, history, OOF (here 0.1-0.5 s)
)


def _time_steps(
    cfg: Config, facts: Facts, size: int, seconds: float, device, siblings: int = 0, quick: bool = False
) -> dict:
    """``Speed``'s fields for ``cfg`` at ``size`` px, timed on synthetic images (``measure_speed`` caches them)."""
    import torch

    bs = min(cfg.train.batch_size, max(2, facts.n_rows // 2))
    table = _synthetic_table(facts, size, bs * 8)
    # timed with the whole network training, as most epochs train (gradual ends so): a frozen part's speed-up
    # is STAGE_SPEEDUP's, applied to the epochs that train it (Shape.seconds)
    mode = "full"
    mcfg = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"epochs": 10}),
            "model": cfg.model.model_copy(update={"finetune": mode, "unfreeze_after": None}),
        }
    )
    precision = _timed_precision(cfg, device)

    def make_steps(augment: bool = True) -> tuple[Callable[[int], float], object]:
        return _make_steps(cfg, mcfg, table, bs, device, precision, augment=augment)

    t0 = time.perf_counter()
    steps, parts = make_steps()
    build_s = time.perf_counter() - t0
    train_img_s, val_img_s = _time_chunks(
        cfg, steps, parts, table, bs, device, seconds, siblings, make_steps, chunks=3 if quick else 5
    )
    if quick:
        epoch_s = QUICK_EPOCH_S
    else:
        build_s, epoch_s = _job_overheads(mcfg, table, bs, device, train_img_s, val_img_s, build_s)
    log.info(
        f"plan: measured {cfg.model.backbone} at {size} px on {torch.get_num_threads()} thread(s)"
        f"{f' beside {siblings} more' if siblings else ''}: {train_img_s:.0f} img/s training, "
        f"{val_img_s:.0f} img/s validation"
    )
    return {"train_img_s": train_img_s, "val_img_s": val_img_s, "build_s": build_s, "epoch_s": epoch_s}


def _make_steps(
    cfg: Config, mcfg: Config, table, bs: int, device, precision: str, augment: bool = True
) -> tuple[Callable[[int], float], object]:
    """(steps(n): seconds n training steps of ``mcfg`` take on ``table``, the components they train)."""
    from pipeline.train.trainer import BatchSource, build_components, train_one_epoch

    parts = build_components(
        cfg=mcfg,
        table=table,
        tr_idx=np.arange(len(table)),
        seed=0,
        device=device,
        channels_last=cfg.train.channels_last,
        with_augment=augment and bool(cfg.augment),
        precision=precision,
    )
    rng = np.random.default_rng(0)

    def steps(n: int) -> float:
        batches = [np.arange(i * bs, (i + 1) * bs) % len(table) for i in range(n)]
        src = BatchSource(images=table.images, batches=batches, augment=parts.augment, seeds=list(range(n)))
        t1 = time.perf_counter()
        train_one_epoch(
            parts,
            source=(src[b] for b in range(n)),
            n_batches=n,
            table=table,
            t=mcfg.train,
            device=device,
            precision=precision,
            channels_last=cfg.train.channels_last,
            rng=rng,
        )
        return time.perf_counter() - t1

    return steps, parts


def _time_chunks(
    cfg: Config, steps, parts, table, bs: int, device, seconds: float, siblings: int, make_steps, chunks: int = 5
) -> tuple[float, float]:
    """(training, validation) images per second: ``steps`` timed in chunks beside ``siblings`` copies of the
    training (``make_steps``), then a validation pass of ``parts``' model."""
    import contextlib

    from pipeline.train.trainer import validate

    # the siblings train without augmentation: its Python code would hold the one interpreter lock the
    # timed thread needs too (two processes share none), which timed a small CNN with four augmentations
    # 15% under its run (the folder demo, 500 vs 540-650 img/s)
    with (
        _Siblings(n=siblings, make_steps=lambda: make_steps(augment=False)[0]) if siblings else contextlib.nullcontext()
    ):
        warm = [steps(1) for _ in range(3 if chunks >= 5 else 2)]  # allocator, kernels: a first step runs slow
        step = min(warm)
        chunk = int(min(7, max(2, seconds / chunks / max(step, 1e-3))))
        # the median of the chunks: one burst of another process slows one chunk only, and beside
        # siblings the fastest chunk is the one that ran while they paused
        times = sorted(steps(chunk) for _ in range(chunks))
        train_img_s = chunk * bs / times[len(times) // 2]
        t1 = time.perf_counter()
        validate(
            parts.eval_model,
            table=table,
            idx=np.arange(len(table)),
            batch_size=bs * 2,
            device=device,
            channels_last=cfg.train.channels_last,
            precision="fp32",
        )
        val_img_s = len(table) / (time.perf_counter() - t1)
    return train_img_s, val_img_s


def _timed_precision(cfg: Config, device) -> str:
    """The precision a plan times: ``auto`` is fp32 on CPU (its measured choice comes after the plan)
    and the GPU's choice on CUDA (pipeline/core/device.py), which needs no measurement."""
    from pipeline.core.device import auto_precision, bf16_supported

    if cfg.train.precision != "auto":
        return cfg.train.precision
    return auto_precision(device.type, bf16_supported(device)) or "fp32"


def _job_overheads(
    cfg: Config, table, bs: int, device, train_img_s: float, val_img_s: float, build_s: float
) -> tuple[float, float]:
    """What a job costs besides its images, from a real ``FoldTrainer`` of three one-step epochs in a
    scratch folder: the start (model, weights, TensorBoard) and, per epoch, checkpoints, OOF, history
    and the loop's bookkeeping; on a small data set these outweigh the images."""
    import tempfile

    from pipeline.runs.layout import RunDir
    from pipeline.train.job import FoldTrainer

    tcfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"epochs": 3, "max_steps_per_epoch": 1, "patience": 0})}
    )
    fold_of = (np.arange(len(table)) >= bs).astype(int)  # fold 0: the first batch is validated, the rest trains
    stamps = []
    with tempfile.TemporaryDirectory(prefix="plan-") as tmp:
        job = RunDir(path=tmp, seeds=[0], cfg=tcfg).job_dir(0, 0)
        t0 = time.perf_counter()
        FoldTrainer(
            cfg=tcfg,
            table=table,
            fold_of=fold_of,
            job=job,
            device=device,
            run_hash="plan",
            precision=_timed_precision(cfg, device),
            on_epoch=lambda *_: stamps.append(time.perf_counter()),
        ).run()
    images = bs / train_img_s + bs / val_img_s
    epoch = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return max(build_s, stamps[0] - t0 - epoch), max(0.0, epoch - images)
