"""One fold end to end on this machine's accelerator, in fp32, fp16 and bf16, with training img/s.

The CUDA paths of the pipeline (fp16 with ``torch.amp.GradScaler``, bf16 autocast, pinned memory and
``non_blocking`` copies, the cuDNN flags, ``cuda:K``) cannot run in this repository's CPU-only test
suite; their decisions are unit-tested there (tests/test_gpu_paths.py) and this script runs them for
real. A user with a GPU runs it once:

    .venv/bin/python benchmarks/gpu_smoke.py                       # auto device: cuda when there is one
    .venv/bin/python benchmarks/gpu_smoke.py --device cuda:1 --no-deterministic --epochs 3

It writes synthetic iceberg data (``pipeline demo-data iceberg``) to a temporary folder, folds it, and
per precision trains fold 0 through ``pipeline.train.cv.train_cv`` (the library path ``pipeline train`` takes)
in its own run folder; then it checks the fold's outputs (done marker, finite validation log-loss, OOF
rows that are probabilities) and prints the last epoch's training img/s (the first epoch pays for
cuDNN's autotuning and the allocator). A precision the device cannot do is skipped with the reason
(fp16 off CUDA; bf16 on a GPU without native bf16). Exit code 1 when a precision that ran failed a check.

``--device cpu`` runs in the test suite with tiny sizes (tests/test_gpu_paths.py, and ``--smoke --device cpu`` as a
script in tests/test_benchmarks.py), so this cannot rot; its numbers there mean nothing. Without a GPU,
``--device auto`` says so and runs the same CPU path.

``--smoke``: simple_cnn at 16 px, 40 images, 2 folds, 1 epoch, batch 16, no loader workers (any device).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PRECISIONS = ("fp32", "fp16", "bf16")
SMOKE = {
    "backbone": "simple_cnn",
    "input_size": 16,
    "n_train": 40,
    "folds": 2,
    "epochs": 1,
    "batch_size": 16,
    "num_workers": 0,
}


def skip_reason(device, precision: str) -> str | None:
    """Why ``device`` cannot train in ``precision`` (None: it can), from the pipeline's own decisions."""
    import torch

    from pipeline.core.device import amp_plan, bf16_supported
    from pipeline.core.errors import PipelineError

    try:
        amp_plan(device.type, precision)
    except PipelineError as e:
        return str(e).split(";")[0]
    if precision == "bf16" and device.type == "cuda" and not bf16_supported(device):
        return (
            f"{torch.cuda.get_device_name(device)} has no native bf16 "
            "(torch.cuda.is_bf16_supported(including_emulation=False))"
        )
    return None


def _config(work: Path, data: Path, args) -> Path:
    import yaml

    cfg = {
        "competition": "gpu-smoke",
        "metric": "logloss",
        "data": {"format": "statoil_json", "dir": str(data)},
        "folds": {"n_splits": args.folds, "seed": 0},
        "model": {"backbone": args.backbone, "pretrained": False, "input_size": args.input_size},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": 1e-3,
            "patience": 0,
            "device": args.device,
            "deterministic": args.deterministic,
            "num_workers": args.num_workers,
            "max_steps_per_epoch": args.max_steps,
            "label_smoothing": 0.0,
        },
        "augment": [{"name": "HorizontalFlip", "p": 0.5}],
    }
    path = work / "gpu-smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_one(config: Path, work: Path, precision: str) -> dict:
    """Fold 0 in ``precision`` in its own run folder; its img/s, val log-loss and checks."""
    import numpy as np
    import pandas as pd

    from pipeline.config.load import load_config
    from pipeline.runs.layout import RunDir
    from pipeline.runs.predictions import probs_of, read_predictions
    from pipeline.train.cv import train_cv

    cfg = load_config(
        config,
        [f"train.precision={precision}", f"paths.runs={work / ('runs-' + precision)}", f"paths.folds={work / 'folds'}"],
    )
    t0 = time.perf_counter()
    train_cv(cfg, folds=[0])
    wall = time.perf_counter() - t0
    job = RunDir.of(cfg).job_dir(0, cfg.train.seed)
    hist = pd.read_csv(job.history)
    done = job.read_done()
    oof = read_predictions(job.oof, "oof")
    probs = probs_of(oof)
    checks = {
        "done": done is not None,
        "val_loss finite": bool(np.isfinite(hist["val_loss"]).all()),
        "train_loss finite": bool(np.isfinite(hist["train_loss"]).all()),
        "oof probabilities": bool(len(probs) and np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-4)),
    }
    return {
        "precision": precision,
        "train_img_s": float(hist["train_img_s"].iloc[-1]),
        "val_loss": float(hist["val_loss"].min()),
        "epochs": len(hist),
        "seconds": round(wall, 1),
        "ok": all(checks.values()),
        "failed": [k for k, v in checks.items() if not v],
    }


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"gpu smoke on {device}: fold 0 end to end per precision",
        f"{'precision':<10} {'img/s':>10} {'val_loss':>10} {'epochs':>7}  status",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['precision']:<10} {'-':>10} {'-':>10} {'-':>7}  skipped: {r['skipped']}")
        else:
            status = "ok" if r["ok"] else "FAILED: " + ", ".join(r["failed"])
            lines.append(
                f"{r['precision']:<10} {r['train_img_s']:>10.1f} {r['val_loss']:>10.4f} {r['epochs']:>7}  {status}"
            )
    base = next((r for r in rows if r["precision"] == "fp32" and "skipped" not in r), None)
    for r in rows:
        if base and r is not base and "skipped" not in r and base["train_img_s"] > 0:
            lines.append(f"{r['precision']} vs fp32: x{r['train_img_s'] / base['train_img_s']:.2f} img/s")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (train.device)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,fp16,bf16")
    p.add_argument("--backbone", default="resnet18", help="a timm model (random init: nothing is downloaded)")
    p.add_argument("--input-size", type=int, default=128, help="model.input_size: batches are resized to this side")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--folds", type=int, default=5, help="folds.n_splits (only fold 0 is trained)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=None, help="train.max_steps_per_epoch")
    p.add_argument("--num-workers", type=int, default=2, help="train.num_workers (pinned batches on CUDA)")
    p.add_argument(
        "--no-deterministic",
        dest="deterministic",
        action="store_false",
        help="train.deterministic=false: cudnn.benchmark picks the fastest kernels",
    )
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings ("
        + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
        + "): every precision's path once, the figures mean nothing",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    wanted = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in wanted if p not in PRECISIONS]
    if bad:
        raise SystemExit(f"--precisions: {bad[0]!r}; expected a subset of {','.join(PRECISIONS)}")
    from pipeline.config.load import load_config
    from pipeline.core.device import resolve_device
    from pipeline.core.logs import to_stdout
    from pipeline.data.demo_iceberg import write_iceberg
    from pipeline.data.folds import run_fold

    to_stdout()
    device = resolve_device(args.device)
    if args.device == "auto" and device.type == "cpu":
        print(
            "no GPU here (torch.cuda.is_available() is False, no mps): the CPU path runs instead; "
            "its figures say nothing about a GPU",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_iceberg(work / "data", n_train=args.n_train, n_test=10, seed=0)
        config = _config(work, work / "data", args)
        run_fold(load_config(config, [f"paths.folds={work / 'folds'}"]))
        rows = []
        for precision in wanted:
            reason = skip_reason(device, precision)
            rows.append({"precision": precision, "skipped": reason} if reason else run_one(config, work, precision))
    name = str(device) + (f" ({__import__('torch').cuda.get_device_name(device)})" if device.type == "cuda" else "")
    print(table(rows, name))
    res = {
        "device": name,
        "deterministic": args.deterministic,
        "backbone": args.backbone,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "rows": rows,
        "ok": all(r.get("ok", True) for r in rows) and any("skipped" not in r for r in rows),
    }
    print(json.dumps(res))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
