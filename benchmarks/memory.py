"""Memory on a large image_folder competition: N RGB images (default 25,000) read at 224x224.

1. Generates N random-ish 256x256 JPEGs (smooth colour fields + noise; two classes) with train.csv.
2. A fresh process reads them with the image_folder reader: every file is decoded and resized
   into the memory-mapped cache (time, peak RSS).
3. Another fresh process reads them again (the cache is mapped, nothing decoded: the load time),
   writes folds and trains fold 0 for one step-limited epoch (train.max_steps_per_epoch) plus the
   validation of that fold (N / n_splits images; 50 splits keep it short on a CPU), and reports its
   peak RSS, and at the end private memory (RssAnon) and file-backed pages (RssFile: torch's shared
   libraries plus the touched cache pages, page cache the kernel can reclaim).

Last line: one JSON object.

    python benchmarks/memory.py [--n 25000] [--size 224] [--steps 5] [--backbone resnet18]
                                [--n-splits 50] [--dir DIR] [--keep]
    python benchmarks/memory.py --smoke   # 40 images at 32 px, simple_cnn, 1 step (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SMOKE = {"n": 40, "size": 32, "steps": 1, "backbone": "simple_cnn", "n_splits": 4}


def generate(d: Path, n: int, side: int = 256) -> None:
    from PIL import Image

    (d / "train").mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
        img = np.asarray(low, np.int16) + rng.normal(0, 8, (side, side, 3)).astype(np.int16)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / "train" / f"{i}.jpg", quality=90)

    with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        list(ex.map(one, range(n)))
    labels = np.where(np.random.default_rng(0).random(n) < 0.5, "cat", "dog")
    import pandas as pd

    pd.DataFrame({"id": [str(i) for i in range(n)], "label": labels}).to_csv(d / "train.csv", index=False)


def write_config(d: Path, args) -> Path:
    import yaml

    cfg = {
        "competition": "memory-bench",
        "metric": "logloss",
        "data": {"format": "image_folder", "dir": str(d), "image_size": args.size, "channels": 3},
        "folds": {"n_splits": args.n_splits, "seed": 0},
        "model": {"backbone": args.backbone, "pretrained": False},
        "train": {
            "epochs": 1,
            "batch_size": 32,
            "max_steps_per_epoch": args.steps,
            "device": "cpu",
            "patience": 0,
            "num_workers": 0,
        },
    }
    path = d / "memory-bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rss() -> dict:
    """Peak RSS of this process (ru_maxrss, MiB) and the current RssAnon/RssFile (MiB)."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile"):
            out[f"{k.lower()}_mb"] = int(v.split()[0]) / 1024
    return out


def phase_decode(cfg_path: Path) -> dict:
    from pipeline.config.load import load_config
    from pipeline.data.formats import read_table

    t0 = time.perf_counter()
    t = read_table(load_config(cfg_path), "train")
    return {"decode_s": time.perf_counter() - t0, "shape": list(t.images.shape), **rss()}


def phase_train(cfg_path: Path) -> dict:
    from pipeline.config.load import load_config
    from pipeline.data.folds import run_fold
    from pipeline.data.formats import read_table
    from pipeline.train.cv import train_cv

    cfg = load_config(cfg_path)
    t0 = time.perf_counter()
    table = read_table(cfg, "train")
    load_s = time.perf_counter() - t0
    assert isinstance(table.images, np.memmap)
    after_load = rss()
    run_fold(cfg)
    t0 = time.perf_counter()
    train_cv(cfg, folds=[0], table=table)
    return {
        "load_s": load_s,
        "after_load_rss_mb": after_load["peak_rss_mb"],
        "train_s": time.perf_counter() - t0,
        **rss(),
    }


def child(phase: str, cfg_path: Path, cwd: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", phase, "--config", str(cfg_path)], cwd=cwd, capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(f"{phase} phase failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=25000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--n-splits", type=int, default=50)
    p.add_argument("--dir", help="work folder (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings ("
        + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
        + "): every phase runs, the figures mean nothing",
    )
    p.add_argument("--phase", choices=["decode", "train"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.phase:
        fn = phase_decode if args.phase == "decode" else phase_train
        print(json.dumps(fn(Path(args.config))))
        return

    work = Path(args.dir or tempfile.mkdtemp(prefix="memory-bench-"))
    os.environ.setdefault("PIPELINE_CACHE", str(work / "cache"))  # children inherit it
    try:
        data = work / "data"
        t0 = time.perf_counter()
        if not (data / "train.csv").exists():
            generate(data, args.n)
        gen_s = time.perf_counter() - t0
        src_mb = sum(f.stat().st_size for f in (data / "train").iterdir()) / 2**20
        print(f"generated {args.n} JPEGs 256x256 ({src_mb:.0f} MiB) in {gen_s:.0f}s", flush=True)
        cfg_path = write_config(data, args)
        dec = child("decode", cfg_path, work)
        cache_gb = args.n * 3 * args.size**2 / 1e9
        print(
            f"first read: decoded into the cache ({cache_gb:.2f} GB uint8) in {dec['decode_s']:.1f}s, "
            f"peak RSS {dec['peak_rss_mb']:.0f} MiB",
            flush=True,
        )
        tr = child("train", cfg_path, work)
        print(
            f"second read: cache mapped in {tr['load_s']:.2f}s (peak RSS so far {tr['after_load_rss_mb']:.0f} MiB); "
            f"fold 0, one epoch of {args.steps} steps ({args.backbone}, batch 32) + validation of "
            f"{args.n // args.n_splits} images in {tr['train_s']:.0f}s: peak RSS {tr['peak_rss_mb']:.0f} MiB "
            f"(at the end: private {tr['rssanon_mb']:.0f} MiB, file-backed {tr['rssfile_mb']:.0f} MiB)",
            flush=True,
        )
        print(
            json.dumps(
                {
                    "n": args.n,
                    "size": args.size,
                    "backbone": args.backbone,
                    "steps": args.steps,
                    "cache_gb": round(cache_gb, 3),
                    "generate_s": round(gen_s, 1),
                    "decode_s": round(dec["decode_s"], 1),
                    "decode_peak_rss_mb": round(dec["peak_rss_mb"]),
                    "cache_load_s": round(tr["load_s"], 3),
                    "load_peak_rss_mb": round(tr["after_load_rss_mb"]),
                    "train_s": round(tr["train_s"], 1),
                    "train_peak_rss_mb": round(tr["peak_rss_mb"]),
                    "train_end_rss_anon_mb": round(tr["rssanon_mb"]),
                    "train_end_rss_file_mb": round(tr["rssfile_mb"]),
                }
            )
        )
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
