"""Issue 11's comparison on the shift stand-ins: shipped configs vs a hand-written loop, equal budget.

On ``pipeline demo-data shift-folder`` (real MNIST digits at 128 px grey; test drawn with a bolder pen,
wider scale/rotation/position ranges and low-contrast noisy paper; written to ``--data`` when missing),
or with ``--kind shift-digits`` the same shift scanned at 28 px as digit-recognizer CSVs (``--kind
hard-digits``: both splits drawn as that test, no shift), each contestant gets the same ``--budget``
seconds of training:

- every ``--config`` (default: shift-folder ``competitions/folder-demo.yaml`` and ``competitions/image-folder.yaml``,
  shift-digits and hard-digits ``competitions/digits-demo.yaml`` and ``competitions/digits.yaml``; a missing one is
  skipped with a message) as a user runs it: ``pipeline run CONFIG data.dir=...
  train.time_budget_s=BUDGET``, in a fresh process with its own ``paths.runs/folds/submissions`` and
  cache (``PIPELINE_CACHE``) under ``--work``, so nothing is shared between contestants or reused;
- ``benchmarks/baseline_loop.py`` (the plain timm + albumentations 5-fold Adam script).

Per contestant: training seconds (the pipeline's ``train`` stage; the script's folds), whole-run
seconds (every stage, or the whole script, after imports), held-out test accuracy (the pipeline's
submission file scored by ``validate-submission``'s scorer against ``solution.csv``) and log-loss
(the probabilities the submission was made from: ``test_pred.csv`` with the run's temperature).
One table, ratios against the baseline, and a last line of JSON.

    .venv/bin/python benchmarks/shift_folder.py --budget 800            # the issue's setting (long)
    .venv/bin/python benchmarks/shift_folder.py --budget 30 --data /tmp/sf --n-train 340 --n-test 100
    .venv/bin/python benchmarks/shift_folder.py --kind shift-digits --budget 520 --data /tmp/sd \
        --baseline-arg=--size=28 --baseline-arg=--no-pretrained --baseline-arg=--model=resnet10t
    .venv/bin/python benchmarks/shift_folder.py --smoke   # tiny, every step once (tests/test_benchmarks.py)

``--smoke``: 34 train and 10 test images written under the work folder, a 5 s budget, one contestant config
(``competitions/folder-demo.yaml`` with 2 folds of 1 epoch, no TTA, no adversarial validation or Grad-CAM) and
the baseline as resnet10t from scratch at 16 px, 2 folds of 1 epoch: the script still runs, the figures mean
nothing. The exit code is 1 when a contestant failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "shift-folder": ["competitions/folder-demo.yaml", "competitions/image-folder.yaml"],
    "shift-digits": ["competitions/digits-demo.yaml", "competitions/digits.yaml"],
    "hard-digits": ["competitions/digits-demo.yaml", "competitions/digits.yaml"],
}

SMOKE = {
    "budget": 5.0,
    "n_train": 34,
    "n_test": 10,
    "config": [ROOT / "competitions" / "folder-demo.yaml"],
    "set": [
        "folds.n_splits=2",
        "train.epochs=1",
        "train.fold_jobs=1",
        "predict.tta=[identity]",
        "predict.tta_oof=false",
        "evaluate.adversarial=false",
        "evaluate.gradcam_samples=0",
    ],
    "baseline_arg": ["--size=16", "--no-pretrained", "--model=resnet10t", "--folds=2", "--epochs=1"],
}

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import shift_folder
shift_folder.pipeline_child(sys.argv[2], sys.argv[3], sys.argv[4:])
"""


def pipeline_child(config: str, solution: str, overrides: list[str]) -> None:
    """In the contestant's own process: ``run_all`` (what ``pipeline run`` does), then score; prints RESULT json."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import log_loss

    from pipeline.config.load import load_config
    from pipeline.core.logs import to_stdout
    from pipeline.predict.submission import check_submission, submissions_dir
    from pipeline.runs.layout import RunDir
    from pipeline.runs.predictions import class_names_of, probs_of, read_predictions
    from pipeline.stages import run_all

    to_stdout()
    t0 = time.time()
    cfg = load_config(config, overrides)
    times = run_all(cfg)
    whole = time.time() - t0
    sub = max(submissions_dir(cfg).glob("*.csv"), key=lambda p: p.stat().st_mtime)
    accuracy = check_submission(cfg, sub, solution)
    pred = read_predictions(RunDir.of(cfg).test_pred, "test", scaled=True)
    sol = pd.read_csv(solution, dtype=str)  # id,label (image folder) or ImageId,Label (digit CSVs)
    truth = sol.set_index(sol.columns[0])[sol.columns[1]].reindex(pred["id"].astype(str))
    classes = class_names_of(pred)
    code = {c: i for i, c in enumerate(classes)}
    if not truth.isin(list(code)).all():  # a solution of class indices (Statoil's is_iceberg 0/1), not names
        code = {str(i): i for i in range(len(classes))}
    y = truth.map(code).to_numpy()
    probs = probs_of(pred, classes)
    loss = log_loss(y, probs, labels=np.arange(len(classes)))
    if "is_iceberg" in sol.columns:  # a probability submission is scored by log-loss: the accuracy of its argmax
        accuracy = float((probs.argmax(1) == y).mean())
    print(
        "RESULT "
        + json.dumps(
            {
                "train_s": round(times.get("train", 0.0), 1),
                "total_s": round(whole, 1),
                "stages": {k: round(v, 1) for k, v in times.items()},
                "submission": str(sub),
                "test_accuracy": round(float(accuracy), 4),
                "test_logloss": round(float(loss), 4),
            }
        )
    )


def _child(cmd: list[str], log: Path, env: dict, prefix: str, result: Path | None = None) -> dict | None:
    """Run one contestant, its output to ``log``; the JSON it printed after ``prefix``, or the last
    line of its ``result`` file (None: it failed)."""
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if result is not None:
        lines = [prefix + ln for ln in result.read_text().splitlines()] if result.is_file() else []
    else:
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith(prefix)]
    if rc or not lines:
        tail = "\n    ".join(log.read_text().splitlines()[-5:])
        print(f"  failed (exit {rc}); last lines of {log}:\n    {tail}")
        return None
    return json.loads(lines[-1][len(prefix) :])


def _env(root: Path) -> dict:
    """A contestant's environment: this checkout's pipeline, its own cold cache, no hub."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PIPELINE_CACHE": str(root / "cache"),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
    }


def run_pipeline(config: Path, data: Path, budget: float, work: Path, extra: list[str]) -> dict | None:
    root = work / config.stem
    root.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.dir={data}",
        f"train.time_budget_s={budget:g}",
        f"paths.runs={root / 'runs'}",
        f"paths.folds={root / 'folds'}",
        f"paths.submissions={root / 'submissions'}",
        *extra,
    ]
    env = _env(root)
    print(f"[{config.stem}] pipeline run {config} {' '.join(overrides)}  (log: {root / 'run.log'})", flush=True)
    cmd = [sys.executable, "-c", CHILD, str(ROOT / "benchmarks"), str(config), str(data / "solution.csv"), *overrides]
    return _child(cmd, root / "run.log", env, "RESULT ")


def run_baseline(data: Path, budget: float, work: Path, extra: list[str]) -> dict | None:
    root = work / "baseline_loop"
    root.mkdir(parents=True, exist_ok=True)
    env = _env(root)
    result = root / "result.jsonl"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "baseline_loop.py"),
        "--data",
        str(data),
        "--budget",
        f"{budget:g}",
        "--json",
        str(result),
        *extra,
    ]
    print(f"[baseline_loop] {' '.join(cmd[1:])}  (log: {root / 'run.log'})", flush=True)
    return _child(cmd, root / "run.log", env, "", result)


def table(results: dict[str, dict | None], budget: float) -> str:
    head = (
        f"{'contestant':<24} {'train s':>8} {'train/budget':>12} {'whole s':>8} {'whole/budget':>12} "
        f"{'test acc':>9} {'log-loss':>9}"
    )
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        if r is None:
            rows.append(f"{name:<24} {'failed or skipped':>50}")
            continue
        rows.append(
            f"{name:<24} {r['train_s']:>8.0f} {r['train_s'] / budget:>12.2f} {r['total_s']:>8.0f} "
            f"{r['total_s'] / budget:>12.2f} {r['test_accuracy']:>9.4f} {r['test_logloss']:>9.4f}"
        )
    base = results.get("baseline_loop")
    if base:
        for name, r in results.items():
            if r and name != "baseline_loop":
                rows.append(
                    f"{name} vs baseline_loop: accuracy {r['test_accuracy'] - base['test_accuracy']:+.4f}, "
                    f"log-loss x{r['test_logloss'] / base['test_logloss']:.2f}, "
                    f"training time x{r['train_s'] / max(base['train_s'], 1e-9):.2f}"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, help="seconds of training for every contestant (required without --smoke)")
    ap.add_argument(
        "--kind", choices=sorted(CONFIGS), default="shift-folder", help="the stand-in (pipeline demo-data KIND)"
    )
    ap.add_argument("--data", type=Path, help="the stand-in's data (written when missing; default data/KIND)")
    ap.add_argument("--n-train", type=int, default=3400, help="when writing the data")
    ap.add_argument("--n-test", type=int, default=1000, help="when writing the data")
    ap.add_argument("--seed", type=int, default=0, help="when writing the data")
    ap.add_argument(
        "--config", action="append", type=Path, help="repeatable; default the kind's demo config and the one to copy"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every pipeline run"
    )
    ap.add_argument(
        "--baseline-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra baseline_loop.py argument, e.g. --baseline-arg=--no-pretrained",
    )
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--work", type=Path, help="folder for the runs (default a new temporary folder, kept)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings (see above): the script still runs, the figures mean nothing",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.budget, args.n_train, args.n_test = SMOKE["budget"], SMOKE["n_train"], SMOKE["n_test"]
        args.config = args.config or SMOKE["config"]
        args.set, args.baseline_arg = SMOKE["set"] + args.set, SMOKE["baseline_arg"] + args.baseline_arg
        args.work = args.work or Path(tempfile.mkdtemp(prefix=f"{args.kind}-smoke-"))
        args.data = args.data or args.work / "data"  # never a full-size data/KIND left by a real run
    elif args.budget is None:
        ap.error("--budget is required (or --smoke)")
    data = (args.data or Path("data") / args.kind).resolve()
    if not (data / "solution.csv").is_file():
        from pipeline.data.demo import WRITERS

        print(f"writing {data}: {WRITERS[args.kind](data, n_train=args.n_train, n_test=args.n_test, seed=args.seed)}")
    else:
        print(f"using the existing {data} (delete it to regenerate)")
    work = (args.work or Path(tempfile.mkdtemp(prefix=f"{args.kind}-bench-"))).resolve()
    results: dict[str, dict | None] = {}
    for config in args.config or [ROOT / c for c in CONFIGS[args.kind]]:
        config = Path(config).resolve()
        if not config.is_file():
            print(f"[{config.stem}] skipped: {config} does not exist")
            continue
        results[config.stem] = run_pipeline(config, data, args.budget, work, args.set)
    if not args.no_baseline:
        results["baseline_loop"] = run_baseline(data, args.budget, work, args.baseline_arg)
    print(f"\n{args.kind} ({data}), budget {args.budget:g}s each; runs under {work}")
    print(table(results, args.budget))
    print(json.dumps({"budget_s": args.budget, "data": str(data), "results": results}))
    return results


if __name__ == "__main__":
    failed = [name for name, r in main().items() if r is None]
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
