"""The training hot loop before and after a change: ``pipeline train`` img/s of two checkouts, side by side.

Each checkout (a git revision, exported with ``git archive`` into a temporary folder, and this working
tree) trains the same synthetic iceberg set (the size of the real one) with its own
``competitions/iceberg.yaml`` (the backbone pinned to ``tf_efficientnet_lite0`` with ``model.finetune=full``,
as iceberg.yaml had it before it said ``auto``; ``model.pretrained=false``; no time budget; 2 epochs of
``--steps`` steps, the second counted), through its own ``benchmarks/train_throughput.py:pipeline_loop``
in a fresh process, with ``fold_jobs`` 1 (one fold on every core: the loop's own overhead) and as
configured. Rounds alternate (base, head, base, head, ...) so a change in the machine's load hits both;
medians and the ratio head / base are printed, the last line as JSON.

    .venv/bin/python benchmarks/before_after.py --base 61e4aa1 [--rounds 3] [--steps 30]
    .venv/bin/python benchmarks/before_after.py --base HEAD --smoke   # tiny (tests/test_benchmarks.py)

``--smoke`` (1 round, 1 step, 60 images, batch 8, fp32, fold_jobs 1 only) shows that the script still runs
end to end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 1604
# fp32: precision auto times emulated bf16 steps on a CPU without native support (~10 s each)
SMOKE = {"rounds": 1, "steps": 1, "n_train": 60, "batch_size": 8, "precision": "fp32", "fold_jobs": [1]}

MEASURE = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
import yaml
import train_throughput as t
work, data, folds, name, steps, fold_jobs = Path(sys.argv[1]), *sys.argv[2:5], int(sys.argv[5]), int(sys.argv[6])
checkout, batch, precision = Path(sys.argv[7]), int(sys.argv[8]) or t.BATCH, sys.argv[9]
os.chdir(work)
base = work / f"{name}-base.yaml"
# the backbone pinned (iceberg.yaml says auto since 2026-12; before, it named this one), no budget (nothing to plan)
base.write_text(yaml.safe_dump({
    "extends": str(checkout / "competitions" / "iceberg.yaml"), "competition": "bench",
    "data": {"dir": data}, "folds": {"file": folds},
    "model": {"backbone": t.BACKBONE, "pretrained": False, "finetune": "full"},
    "train": {"batch_size": batch, "device": "cpu", "precision": precision, "time_budget_s": None},
}))
print(json.dumps(t.pipeline_loop(steps, base, work, name, fold_jobs)))
"""


def measure(
    checkout: Path, root: Path, name: str, steps: int, fold_jobs: int, batch: int = 0, precision: str = "auto"
) -> float:
    """One measurement in ``root/name`` on the shared ``root/data`` and ``root/folds.csv`` (``batch`` 0: the
    checkout's ``train_throughput.BATCH``)."""
    (root / name).mkdir()
    env = {**os.environ, "PYTHONPATH": str(checkout), "PIPELINE_CACHE": str(root / "cache")}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURE,
            str(root / name),
            str(root / "data"),
            str(root / "folds.csv"),
            name,
            str(steps),
            str(fold_jobs),
            str(checkout),
            str(batch),
            precision,
        ],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{checkout}: measurement failed:\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. the commit before a refactor)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--n-train", type=int, default=N_TRAIN, help="synthetic training images (default: the real train.json's count)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=0, help="train.batch_size (default: each checkout's train_throughput.BATCH)"
    )
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="train.precision")
    ap.add_argument(
        "--fold-jobs", type=int, nargs="+", help="fold_jobs values to measure (default: 1 and iceberg.yaml's)"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny settings: the script still runs, the figures mean nothing"
    )
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from pipeline.config.load import load_config
    from pipeline.data.demo_iceberg import write_iceberg
    from pipeline.data.folds import make_folds
    from pipeline.data.formats import read_table

    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not rev:
        sys.exit(f"--base {args.base!r}: not a commit of {ROOT}")
    work = Path(tempfile.mkdtemp(prefix="bench-before-after-"))
    base_tree = work / "base-checkout"
    base_tree.mkdir()
    # the base revision's files, exactly as committed; read-only on the repository (no worktree to register and prune)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive, check=True)
    try:
        write_iceberg(work / "data", n_train=args.n_train, n_test=10, seed=0)
        cfg_path = work / "folds.yaml"  # one folds file, written once, for both checkouts
        cfg_path.write_text(f"competition: bench\ndata: {{format: statoil_json, dir: {work / 'data'}}}\n")
        cfg = load_config(cfg_path)
        make_folds(cfg, read_table(cfg, "train")).to_csv(work / "folds.csv", index=False)
        configured = load_config(ROOT / "competitions" / "iceberg.yaml", check_data=False).train.fold_jobs
        fold_jobs = list(dict.fromkeys(args.fold_jobs or [1, configured]))
        trees = {"base": base_tree, "head": ROOT}
        rates = {(t, fj): [] for t in trees for fj in fold_jobs}
        print(f"base {args.base} ({rev[:12]}) in {base_tree}; head: the working tree {ROOT}", flush=True)
        for r in range(args.rounds):
            for t, tree in trees.items():
                for fj in fold_jobs:
                    v = measure(tree, work, f"{t}{r}fj{fj}", args.steps, fj, args.batch_size, args.precision)
                    rates[(t, fj)].append(v)
                    print(
                        f"round {r}: {t} ({'working tree' if t == 'head' else args.base}) fold_jobs {fj}: "
                        f"{v:.1f} img/s "
                        f"(load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
        med = {k: statistics.median(v) for k, v in rates.items()}
        out = {}
        for fj in fold_jobs:
            ratio = med[("head", fj)] / med[("base", fj)]
            out[f"fold_jobs_{fj}"] = {
                "base_img_s": round(med[("base", fj)], 1),
                "head_img_s": round(med[("head", fj)], 1),
                "ratio": round(ratio, 3),
            }
            print(
                f"fold_jobs {fj}: base {med[('base', fj)]:.1f} img/s, head {med[('head', fj)]:.1f} img/s, "
                f"head/base {ratio:.3f}"
            )
        print(json.dumps({"base": args.base, **out}))
    finally:
        shutil.rmtree(base_tree, ignore_errors=True)


if __name__ == "__main__":
    main()
