"""Pruning vs no pruning under the same wall-time budget, on the iceberg demo.

    python benchmarks/tune_pruning.py [--budget-s 130] [--seeds 0,1,2] [--n-train 300] [--epochs 6] [--folds 0,1]

For each sampler seed, ``pipeline tune`` runs twice on synthetic iceberg data
(``pipeline demo-data iceberg``) with the config ``competitions/iceberg-demo.yaml`` and its
``tune:`` block: once with ``tune.pruner=median`` (epoch log-loss of the first tuned fold) and once
with ``tune.pruner=none``, each for ``--budget-s`` seconds (``--timeout``: no trial starts after
it; the trial in flight finishes, and the rate below divides by the real elapsed time). To fit a
CPU, the model is ``simple_cnn`` on 24x24 inputs (the backbone keys of the space are pinned), 2 of
5 folds are averaged and both the sampler and the pruner start modelling after 2 trials.

Reports, as medians over the seeds: trials finished (COMPLETE or PRUNED) per hour and the best
CV log-loss reached; the target is at least twice the trials with pruning, with a best value no
worse than the unpruned one by more than one CV standard deviation (the fold spread of the
unpruned best trial). The last line is one JSON object; the exit code is 1 when a search finished no trial.

``--smoke`` (one seed, 3 s per search, 40 images, 2 epochs, fold 0 only, one start-up trial) shows that
both arms still run; its figures mean nothing.
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

# Keys of competitions/iceberg.yaml's space that only mean something for a timm backbone.
PINNED = {
    "model.backbone": "simple_cnn",
    "model.pretrained": "false",
    "model.finetune": "full",
    "model.backbone_lr_mult": "1.0",
}
SMOKE = {"budget_s": 3.0, "seeds": "0", "n_train": 40, "epochs": 2, "folds": "0", "startup": 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=130, help="wall-time budget of each search")
    ap.add_argument("--seeds", default="0,1,2", help="sampler seeds (tune.seed)")
    ap.add_argument("--n-train", type=int, default=300, help="synthetic training images")
    ap.add_argument("--epochs", type=int, default=6, help="train.epochs of every trial")
    ap.add_argument("--folds", default="0,1", help="tune.folds: the folds each trial averages")
    ap.add_argument("--input-size", type=int, default=24, help="model.input_size (simple_cnn)")
    ap.add_argument("--startup", type=int, default=2, help="tune.n_startup_trials")
    ap.add_argument("--workdir", help="keep data, runs and the SQLite studies here (default: a temp dir)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings ("
        + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
        + "): both arms run, the figures mean nothing",
    )
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    seeds = [int(s) for s in args.seeds.split(",")]

    import torch
    from optuna.trial import TrialState

    from pipeline.config.load import load_config
    from pipeline.core.logs import to_file
    from pipeline.data.demo_iceberg import write_iceberg
    from pipeline.data.folds import run_fold
    from pipeline.tune.tuner import tune

    torch.set_num_threads(1)  # the machine is shared; both arms alike
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tune-pruning-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    data = work / "data"
    if not (data / "train.json").exists():
        print(write_iceberg(data, n_train=args.n_train, n_test=10, seed=0), file=sys.stderr)
    base = [
        f"data.dir={data}",
        f"train.epochs={args.epochs}",
        "train.patience=0",
        "train.batch_size=64",
        "train.device=cpu",
        "train.num_workers=0",
        "tune.plots=false",
        f"tune.n_startup_trials={args.startup}",
        f"tune.folds=[{args.folds}]",
        f"model.input_size={args.input_size}",
    ] + [f"{k}={v}" for k, v in PINNED.items()]
    cfg0 = load_config(ROOT / "competitions" / "iceberg-demo.yaml", base)
    run_fold(cfg0)

    results = {"pruned": [], "plain": []}
    for seed in seeds:
        for arm, pruner in (("pruned", "median"), ("plain", "none")):
            overrides = base + [f"tune.seed={seed}", f"tune.pruner={pruner}"]
            cfg = load_config(ROOT / "competitions" / "iceberg-demo.yaml", overrides)
            name = f"{arm}-s{seed}-{int(time.time())}"
            t0 = time.time()
            with to_file(work / "tune.log"):
                study = tune(
                    cfg,
                    timeout=args.budget_s,
                    storage=f"sqlite:///{work / 'bench.db'}",
                    study_name=name,
                    pinned=list(PINNED),
                )
            elapsed = time.time() - t0
            fin = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            n_complete = sum(t.state == TrialState.COMPLETE for t in fin)
            try:
                bt = study.best_trial
                best, std = bt.value, bt.user_attrs.get("cv_std", float("nan"))
            except ValueError:
                best, std = float("nan"), float("nan")
            r = {
                "seed": seed,
                "trials": len(fin),
                "complete": n_complete,
                "elapsed_s": elapsed,
                "per_hour": len(fin) / elapsed * 3600,
                "best": best,
                "best_std": std,
            }
            results[arm].append(r)
            print(
                f"{arm:<6} seed {seed}: {len(fin):3d} trials ({n_complete} complete, {len(fin) - n_complete} pruned) "
                f"in {elapsed:.0f}s = {r['per_hour']:.0f}/h; best CV log-loss {best:.4f} (fold std {std:.4f})",
                flush=True,
            )

    empty = [f"{arm} seed {r['seed']}" for arm, rs in results.items() for r in rs if not r["trials"]]
    if empty:  # every trial failed (see tune.log): nothing to compare
        print(f"no trial finished in: {', '.join(empty)} (per-trial lines in {work / 'tune.log'})", file=sys.stderr)
        return 1
    med = {
        arm: {k: statistics.median(r[k] for r in rs) for k in ("per_hour", "best", "best_std")}
        for arm, rs in results.items()
    }
    ratio = med["pruned"]["per_hour"] / med["plain"]["per_hour"]
    gap = med["pruned"]["best"] - med["plain"]["best"]  # log-loss: lower is better
    std = med["plain"]["best_std"]
    ok = ratio >= 2 and gap <= std
    print(
        f"median over seeds {seeds}, budget {args.budget_s:g}s each: pruned {med['pruned']['per_hour']:.0f} trials/h, "
        f"plain {med['plain']['per_hour']:.0f} trials/h (x{ratio:.2f}); "
        f"best log-loss pruned {med['pruned']['best']:.4f}, "
        f"plain {med['plain']['best']:.4f} (gap {gap:+.4f}, one CV std {std:.4f}); "
        f"target {'met' if ok else 'NOT met'}"
    )
    print(f"(per-trial lines in {work / 'tune.log'})")
    print(
        json.dumps(
            {
                "trials_per_hour_pruned": round(med["pruned"]["per_hour"], 1),
                "trials_per_hour_plain": round(med["plain"]["per_hour"], 1),
                "best_pruned": round(med["pruned"]["best"], 5),
                "best_plain": round(med["plain"]["best"], 5),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
