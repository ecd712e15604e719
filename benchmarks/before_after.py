"""The training hot loop before and after a change: ``pipeline train`` img/s of two checkouts, side by side.

Each checkout (a git revision, checked out into a temporary worktree, and this working tree) trains
the same synthetic iceberg set (the size of the real one) with its own ``competitions/iceberg.yaml``
(``model.pretrained=false``, 2 epochs of ``--steps`` steps, the second counted), through its own
``benchmarks/train_throughput.py:pipeline_loop`` in a fresh process, with ``fold_jobs`` 1 (one fold on
every core: the loop's own overhead) and as configured. Rounds alternate (base, head, base, head, ...)
so a change in the machine's load hits both; medians and the ratio head / base are printed, the
last line as JSON.

    .venv/bin/python benchmarks/before_after.py --base 61e4aa1 [--rounds 3] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 1604

MEASURE = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
import yaml
import train_throughput as t
work, data, folds, name, steps, fold_jobs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
os.chdir(work)
base = work / f"{name}-base.yaml"
base.write_text(yaml.safe_dump({"extends": str(Path(sys.argv[7]) / "competitions" / "iceberg.yaml"), "competition": "bench",
                                "data": {"dir": data}, "folds": {"file": folds}, "model": {"pretrained": False},
                                "train": {"batch_size": t.BATCH, "device": "cpu", "precision": "auto"}}))
print(json.dumps(t.pipeline_loop(steps, base, work, name, fold_jobs)))
"""


def measure(checkout: Path, root: Path, name: str, steps: int, fold_jobs: int) -> float:
    """One measurement in ``root/name`` on the shared ``root/data`` and ``root/folds.csv``."""
    (root / name).mkdir()
    env = {**os.environ, "PYTHONPATH": str(checkout), "PIPELINE_CACHE": str(root / "cache")}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(root / name), str(root / "data"), str(root / "folds.csv"), name,
                          str(steps), str(fold_jobs), str(checkout)],
                         cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{checkout}: measurement failed:\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. the commit before a refactor)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from pipeline.config.load import load_config
    from pipeline.data.demo import write_iceberg
    from pipeline.data.folds import make_folds
    from pipeline.data.formats import read_table

    work = Path(tempfile.mkdtemp(prefix="bench-before-after-"))
    base_tree = work / "base-checkout"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base], check=True)
    try:
        write_iceberg(work / "data", n_train=N_TRAIN, n_test=10, seed=0)
        cfg_path = work / "folds.yaml"  # one folds file, written once, for both checkouts
        cfg_path.write_text(f"competition: bench\ndata: {{format: statoil_json, dir: {work / 'data'}}}\n")
        cfg = load_config(cfg_path)
        make_folds(cfg, read_table(cfg, "train")).to_csv(work / "folds.csv", index=False)
        fold_jobs = load_config(ROOT / "competitions" / "iceberg.yaml", check_data=False).train.fold_jobs
        trees = {"base": base_tree, "head": ROOT}
        rates = {(t, fj): [] for t in trees for fj in (1, fold_jobs)}
        for r in range(args.rounds):
            for t, tree in trees.items():
                for fj in (1, fold_jobs):
                    v = measure(tree, work, f"{t}{r}fj{fj}", args.steps, fj)
                    rates[(t, fj)].append(v)
                    print(f"round {r}: {t} ({'HEAD' if t == 'head' else args.base}) fold_jobs {fj}: {v:.1f} img/s "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        out = {}
        for fj in (1, fold_jobs):
            ratio = med[("head", fj)] / med[("base", fj)]
            out[f"fold_jobs_{fj}"] = {"base_img_s": round(med[("base", fj)], 1), "head_img_s": round(med[("head", fj)], 1),
                                      "ratio": round(ratio, 3)}
            print(f"fold_jobs {fj}: base {med[('base', fj)]:.1f} img/s, head {med[('head', fj)]:.1f} img/s, head/base {ratio:.3f}")
        print(json.dumps({"base": args.base, **out}))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)


if __name__ == "__main__":
    main()
