"""Training throughput on this CPU: pipeline vs a raw loop vs a typical hand-written script.

tf_efficientnet_lite0, 2 channels, 75x75, batch 32. Interleaved rounds, medians:
  (a) raw forward/backward/step on random tensors, fastest of {NCHW, channels-last} x {fp32, bf16}
  (b) the typical script: fp32 NCHW, torch.set_num_threads(2), DataLoader(num_workers=2, batch 32)
      over a per-sample albumentations Dataset (flips, affine)
  (c) `pipeline train` on the same data and augmentation: training-loop images per training-loop
      second (validation excluded), read from fold_0/history.csv
Last line: one JSON object with raw_img_s, naive_img_s, pipeline_img_s, ratio_raw, ratio_naive.

    python benchmarks/train_throughput.py [--rounds 3] [--steps 30]
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

BACKBONE, BATCH, SIZE, CHANS = "tf_efficientnet_lite0", 32, 75, 2
AUGMENT = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.5},
    {"name": "Affine", "translate_percent": [-0.08, 0.08], "scale": [0.9, 1.1], "rotate": [-15, 15], "p": 0.5},
]


def raw_loop(steps: int, channels_last: bool, precision: str) -> float:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, in_chans=CHANS, num_classes=2)
    x = torch.randn(BATCH, CHANS, SIZE, SIZE)
    y = torch.randint(0, 2, (BATCH,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else (lambda: torch.autocast("cpu", enabled=False))
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        with ctx():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * BATCH / (time.perf_counter() - t0)


def naive_loop(steps: int, images: np.ndarray, labels: np.ndarray) -> float:
    """What a typical Kaggle kernel does."""
    import albumentations as A
    import timm

    torch.set_num_threads(2)
    tf = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5),
                    A.Affine(translate_percent=(-0.08, 0.08), scale=(0.9, 1.1), rotate=(-15, 15), p=0.5)])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            img = tf(image=images[i].transpose(1, 2, 0))["image"].transpose(2, 0, 1)
            return torch.from_numpy(np.ascontiguousarray(img)), int(labels[i])

    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, in_chans=CHANS, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(DS(), batch_size=BATCH, shuffle=True, num_workers=2, drop_last=True)
    model.train()
    n, t0, it = 0, None, iter(loader)
    for i in range(steps + 3):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        if i == 3:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(x) if i >= 3 else 0
    return n / (time.perf_counter() - t0)


def pipeline_loop(steps: int, data_dir: Path, work: Path, round_: int) -> float:
    import yaml

    from pipeline.config import load_config
    from pipeline.fold import run_fold
    from pipeline.train import train_cv

    cfg_path = work / f"bench{round_}.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "extends": str(Path(__file__).resolve().parents[1] / "competitions" / "iceberg.yaml"),
        "competition": "bench", "data": {"dir": str(data_dir)},
        "model": {"pretrained": False}, "augment": AUGMENT,
        "train": {"epochs": 1, "batch_size": BATCH, "max_steps_per_epoch": steps, "precision": "auto", "device": "cpu"},
    }))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = load_config(cfg_path)
        run_fold(cfg, echo=lambda *a: None)
        train_cv(cfg, folds=[0], echo=lambda *a: None)
        import pandas as pd

        hist = pd.read_csv(cfg.run_dir / "fold_0" / "history.csv")
        return float(hist["train_img_s"].iloc[-1])
    finally:
        os.chdir(cwd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    from pipeline.demo_data import write_iceberg
    from pipeline.config import load_config
    from pipeline.formats import read_table

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    os.environ.setdefault("PIPELINE_CACHE", str(work / "cache"))
    data = work / "data"
    write_iceberg(data, n_train=1200, n_test=50, seed=0)
    (work / "t.yaml").write_text(f"competition: t\ndata: {{format: statoil_json, dir: {data}}}\n")
    table = read_table(load_config(work / "t.yaml"), "train")

    combos = [(cl, p) for cl in (False, True) for p in ("fp32", "bf16")]
    raw, naive, pipe = {c: [] for c in combos}, [], []
    for r in range(args.rounds):
        for c in combos:
            raw[c].append(raw_loop(args.steps, *c))
            print(f"round {r}: raw {'channels_last' if c[0] else 'NCHW'} {c[1]}: {raw[c][-1]:.1f} img/s", flush=True)
        naive.append(naive_loop(args.steps, table.images, table.labels))
        print(f"round {r}: naive script: {naive[-1]:.1f} img/s", flush=True)
        pipe.append(pipeline_loop(args.steps, data, work, r))
        print(f"round {r}: pipeline train: {pipe[-1]:.1f} img/s", flush=True)
        torch.set_num_threads(os.cpu_count() or 2)

    med = {c: statistics.median(v) for c, v in raw.items()}
    best = max(med, key=med.get)
    for c, v in med.items():
        print(f"raw {'channels_last' if c[0] else 'NCHW':>13} {c[1]}: median {v:.1f} img/s{'  <- fastest' if c == best else ''}")
    a, b, c = med[best], statistics.median(naive), statistics.median(pipe)
    print(f"naive script: median {b:.1f} img/s; pipeline: median {c:.1f} img/s")
    print(f"pipeline / raw = {c / a:.3f} (target >= 0.9); pipeline / naive = {c / b:.2f} (target >= 1.8)")
    print(json.dumps({"raw_img_s": round(a, 1), "naive_img_s": round(b, 1), "pipeline_img_s": round(c, 1),
                      "ratio_raw": round(c / a, 3), "ratio_naive": round(c / b, 3)}))


if __name__ == "__main__":
    main()
