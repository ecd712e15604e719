"""Issue 14's comparison: training img/s of the same folds through each way of spreading them, side by side.

Contestants, each in a fresh run folder on the same data, folds and config (the iceberg demo's synthetic
chips, ``tf_efficientnet_lite0`` at 75 px by default, a fixed number of epochs, no early stopping):

- ``local``: one process, the folds one after the other on every core;
- ``fold_jobs 2``: ``train.executor=processes train.fold_jobs=2``, two folds at once, one per core;
- ``torchrun 2``: ``torchrun --nproc_per_node 2 -m pipeline train`` (DDP, gloo on CPU), each fold
  data-parallel over two one-thread ranks, with the same global batch;
- ``ray 2x1``: ``train.executor=ray`` on a local Ray cluster of a head and a worker node started
  with ``ray start`` (one CPU each), a fold per task.

img/s = training images seen (rows of each fold's training part x epochs run, summed over folds) over
the training seconds the driver logs (``training took N s``: from the first job's start to the last
job's end, start-up of the jobs included, imports excluded). Ratios are against ``local``.

    .venv/bin/python benchmarks/scale.py                     # 2 folds x 2 epochs on 400 chips
    .venv/bin/python benchmarks/scale.py --n-train 120 --epochs 1 --backbone simple_cnn --skip ray
    .venv/bin/python benchmarks/scale.py --smoke [--skip none]   # tiny (tests/test_benchmarks.py)

``--smoke``: 60 chips, 2 folds x 1 epoch of simple_cnn; without a ``--skip`` it runs ``local`` and ``torchrun 2``
and skips ``fold_jobs`` (two more processes that import torch) and ``ray`` (a two-node cluster takes a minute
to start on a loaded 2-core machine); ``--skip none`` runs every contestant. The
figures mean nothing.

The Ray nodes are ``ray start --block`` processes in their own sessions, ended by their process groups at
the end: ``ray stop`` would end every Ray process of the user on the machine, not only this cluster's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = {"n_train": 60, "epochs": 1, "folds": 2, "backbone": "simple_cnn"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(work: Path, threads: int | None = None) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PIPELINE_CACHE": str(work / "cache"),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }  # loopback: no token from ~/.ray
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(cmd: list[str], log: Path, env: dict, cwd: Path) -> str:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    text = log.read_text()
    if rc:
        tail = "\n    ".join(text.splitlines()[-8:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {rc}); {log}:\n    {tail}")
    return text


def images_seen(run: Path) -> int:
    """Rows trained over all folds and epochs, from each fold's history and OOF (validation) size."""
    import pandas as pd

    oof = pd.read_csv(run / "oof.csv")
    n = len(oof)
    total = 0
    for fold, rows in oof.groupby("fold").size().items():
        hist = pd.read_csv(run / f"fold_{fold}" / "history.csv")
        total += (n - rows) * len(hist)
    return total


def contestant(name: str, work: Path, cfg: Path, overrides: list[str], launcher: list[str], env: dict) -> dict:
    root = work / name.replace(" ", "_")
    root.mkdir(parents=True, exist_ok=True)
    paths = [f"paths.runs={root / 'runs'}", f"paths.folds={work / 'folds'}", f"paths.submissions={root / 'subs'}"]
    print(f"[{name}] {' '.join(launcher + ['train', str(cfg)] + overrides)}", flush=True)
    text = _run(launcher + ["train", str(cfg), *paths, *overrides], root / "train.log", env, work)
    spent = [float(m) for m in re.findall(r"training took (\d+(?:\.\d+)?) s", text)]
    if not spent:
        raise RuntimeError(f"[{name}] no 'training took' line in {root / 'train.log'}")
    run = next((root / "runs").glob("*/*/oof.csv")).parent
    seen = images_seen(run)
    return {"name": name, "train_s": spent[-1], "images": seen, "img_s": seen / max(spent[-1], 1e-9)}


class RayCluster:
    """A head and one worker node on loopback, one CPU each: ``ray start --block``, each in its own session,
    so ending its process group ends that node and nothing else."""

    def __init__(self, work: Path, env: dict):
        self.env, self.port, self.work, self.nodes = env, _free_port(), work, []
        self.temp = Path(tempfile.mkdtemp(prefix="rayb", dir="/tmp"))  # ray's socket paths must stay short

    def _node(self, name: str, args: list[str]) -> None:
        log = self.work / f"ray-{name}.log"
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args],
            env=self.env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes.append(proc)
        end = time.time() + 240
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > end:
                tail = "\n    ".join(log.read_text().splitlines()[-8:])
                raise RuntimeError(f"ray {name} node did not start; {log}:\n    {tail}")
            time.sleep(0.2)

    def __enter__(self) -> str:
        try:
            self._node(
                "head", ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp}"]
            )
            self._node("worker", [f"--address=127.0.0.1:{self.port}"])
        except BaseException:
            self.__exit__()
            raise
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.nodes):  # the worker first, then the head
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.temp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["fold_jobs", "torchrun", "ray", "none"],
        help="a contestant not to run (repeatable; none: run all, the default without --smoke)",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings ("
        + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
        + ", skip fold_jobs and ray unless --skip is given): the figures mean nothing",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        args.skip = args.skip or ["fold_jobs", "ray"]
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from pipeline.data.demo_iceberg import write_iceberg

    data = work / "data"
    if not (data / "train.json").is_file():
        write_iceberg(data, n_train=args.n_train, n_test=20, seed=0)
    import yaml

    cfg = work / "scale.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "extends": str(ROOT / "competitions" / "iceberg-demo.yaml"),
                "data": {"dir": str(data)},
                "folds": {"n_splits": args.folds},
                "model": {"backbone": args.backbone, "pretrained": args.backbone.startswith("tf_efficientnet_lite")},
                "train": {
                    "epochs": args.epochs,
                    "patience": 0,
                    "batch_size": args.batch_size,
                    "precision": "fp32",
                    "time_budget_s": None,
                    "num_workers": 0,
                },
            }
        )
    )
    py = [sys.executable, "-m", "pipeline"]
    _run(py + ["fold", str(cfg), f"paths.folds={work / 'folds'}"], work / "fold.log", _env(work), work)
    results = [contestant("local", work, cfg, ["train.executor=local", "train.fold_jobs=1"], py, _env(work))]
    if "fold_jobs" not in args.skip:
        results.append(
            contestant("fold_jobs 2", work, cfg, ["train.executor=processes", "train.fold_jobs=2"], py, _env(work))
        )
    if "torchrun" not in args.skip:
        tr = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "pipeline"]
        results.append(
            contestant("torchrun 2", work, cfg, ["train.executor=local", "train.fold_jobs=1"], tr, _env(work, 1))
        )
    if "ray" not in args.skip:
        env = _env(work, 1)
        # a SIGTERM (a test's timeout, a CI cancel) unwinds through RayCluster.__exit__: its nodes run in their own
        # sessions, so nothing else would end them
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with RayCluster(work, env) as address:
            results.append(
                contestant(
                    "ray 2x1",
                    work,
                    cfg,
                    ["train.executor=ray", f"train.ray_address={address}", "train.ray_num_cpus=1"],
                    py,
                    env,
                )
            )
    base = results[0]["img_s"]
    print(
        f"\n{args.folds} folds x {args.epochs} epochs of {args.backbone} on {args.n_train} chips, "
        f"batch {args.batch_size}"
    )
    print(f"{'contestant':<14} {'train s':>8} {'images':>8} {'img/s':>8} {'vs local':>9}")
    for r in results:
        print(f"{r['name']:<14} {r['train_s']:>8.1f} {r['images']:>8d} {r['img_s']:>8.1f} {r['img_s'] / base:>8.2f}x")
    print("JSON " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
