"""Issue 13's comparison: best single member vs mean vs hillclimb vs gbm vs a pseudo-labelled member.

For each competition (the iceberg demo, SYNTHETIC SAR chips; the real MNIST digits of the digits demo),
in one run: a model zoo (``pipeline zoo``, three members on one folds file), then blends of its members
(``pipeline ensemble`` with ``mean``, ``hillclimb`` and ``gbm``), then one pseudo-labelled member (the
best member's config plus ``pseudo.from`` = that member, so fold k learns from the source's fold-k
test predictions). Per row: the nested OOF score (fitted fold by fold for the blends), and the score on
held-out test labels (``solution.csv``, used only here) of the probabilities the submission is made from
(``test_pred.csv`` read with the run's calibration). A second stage that does not beat the best member
on held-out data shows as such.

    .venv/bin/python benchmarks/second_stage.py                       # both competitions (~25 min here)
    .venv/bin/python benchmarks/second_stage.py --only iceberg --epochs 2 --n-train 200 --n-test 100
    .venv/bin/python benchmarks/second_stage.py --smoke   # every step once, tiny (tests/test_benchmarks.py)

``--smoke``: the iceberg demo with 60 training and 20 test chips, 1 epoch, 2 folds, every member a
``simple_cnn`` at 32 px (they differ by seed and learning rate), the folds one after the other in the
process (``train.fold_jobs=1``: no worker start-up per member), no TTA, no adversarial validation or
Grad-CAM in evaluate: the zoo, the three blends and the pseudo-labelled member still run, and the
figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMPETITIONS = {
    # base config, demo-data kind, members (name -> overrides), pseudo threshold
    "iceberg": (
        "competitions/iceberg-demo.yaml",
        "iceberg",
        {
            "lite0_s1": {"train.seed": 1},
            "lite0_s2": {"train.seed": 2},
            "cnn": {"model.backbone": "simple_cnn", "model.pretrained": False, "train.lr": 3.0e-3},
        },
        0.95,
    ),
    "digits": (
        "competitions/digits-demo.yaml",
        "digits",
        {"cnn_s1": {"train.seed": 1}, "cnn_s2": {"train.seed": 2}, "cnn_lr3e-3": {"train.seed": 3, "train.lr": 3.0e-3}},
        0.99,
    ),
}
METHODS = ("mean", "hillclimb", "gbm")
SMOKE = {"only": ["iceberg"], "epochs": 1, "n_train": 60, "n_test": 20}
SMOKE_SET = [
    "folds.n_splits=2",
    "train.fold_jobs=1",
    "model.backbone=simple_cnn",
    "model.pretrained=false",
    "model.input_size=32",
    "predict.tta=[identity]",
    "predict.tta_oof=false",
    "evaluate.adversarial=false",
    "evaluate.gradcam_samples=0",
]


def _yaml(path: Path, d: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def held_out(cfg, run_dir: Path, solution: Path) -> tuple[float, float]:
    """(metric, log-loss) of a run's calibrated test predictions against the solution file."""
    import numpy as np

    from pipeline.core.metrics import logloss, score
    from pipeline.predict.submission import read_solution
    from pipeline.runs.predictions import class_names_of, probs_of, read_predictions

    pred = read_predictions(run_dir / "test_pred.csv", "test", scaled=True)
    classes = class_names_of(pred)
    truth = read_solution(cfg, solution, classes).iloc[:, 0].reindex(pred["id"].astype(str).str.strip())
    by_name = {c: i for i, c in enumerate(classes)}
    y = np.array([by_name[v] if v in by_name else int(v) for v in truth.to_numpy()])
    p = probs_of(pred, classes)
    return score(cfg.metric, y, p), logloss(y, p)


def oof_score(cfg, run_dir: Path) -> float:
    """The run's OOF score as its predictions are used: calibrated OOF of the TTA kind predict names."""
    from pipeline.core.metrics import score
    from pipeline.runs.predictions import class_names_of, probs_of, read_predictions

    ens = run_dir / "ensemble.json"
    if ens.is_file():
        return json.loads(ens.read_text())["oof_score"]
    info = json.loads((run_dir / "predict.json").read_text()) if (run_dir / "predict.json").is_file() else {}
    oof = read_predictions(run_dir / info.get("oof", "oof.csv"), "oof", scaled=True)
    return score(cfg.metric, oof["target"].to_numpy(int), probs_of(oof, class_names_of(oof)))


def run_competition(key: str, args, work: Path) -> list[dict]:
    from pipeline.config.load import load_config
    from pipeline.core.metrics import GREATER_IS_BETTER
    from pipeline.data.demo import WRITERS
    from pipeline.ensemble.blend import run_ensemble
    from pipeline.stages import run_all
    from pipeline.zoo import run_zoo

    base, kind, members, threshold = COMPETITIONS[key]
    data = work / "data" / key
    if not (data / "solution.csv").is_file():
        kw = {"seed": args.seed}
        if args.n_test:
            kw["n_test"] = args.n_test
        if args.n_train and kind != "digits":
            kw["n_train"] = args.n_train
        print(WRITERS[kind](data, **kw), flush=True)
    # a copy of the base pointing at this folder's data and roots, so every stage's config finds them
    base_copy = _yaml(
        work / f"{key}.yaml",
        {
            "extends": str(ROOT / base),
            "data": {"dir": str(data)},
            "paths": {
                "runs": str(work / "runs"),
                "folds": str(work / "folds"),
                "submissions": str(work / "submissions"),
            },
        },
    )
    common = ([f"train.epochs={args.epochs}"] if args.epochs else []) + args.set
    zoo = _yaml(work / f"{key}-zoo.yaml", {"base": str(base_copy), "members": members})
    cfg = load_config(base_copy, common, check_data=False)
    rows, t0 = [], time.time()
    for r in run_zoo(zoo, common):
        rows.append(
            {"what": f"member {r['member']}", "run": cfg.run_dir.parent / r["experiment"], "seconds": r.get("train_s")}
        )
    for method in METHODS:
        t = time.time()
        ens = _yaml(
            work / f"{key}-{method}.yaml",
            {
                "competition": cfg.competition,
                "config": str(base_copy),
                "members": [str(r["run"]) for r in rows if r["what"].startswith("member")],
                "method": method,
                "name": f"{key}-zoo-{method}",
            },
        )
        run_ensemble(ens)
        rows.append(
            {"what": f"blend {method}", "run": cfg.run_dir.parent / f"{key}-zoo-{method}", "seconds": time.time() - t}
        )
    better = GREATER_IS_BETTER[cfg.metric]
    for r in rows:
        r["oof"] = oof_score(cfg, r["run"])
        r["test"], r["test_logloss"] = held_out(cfg, r["run"], data / "solution.csv")
    best = (max if better else min)((r for r in rows if r["what"].startswith("member")), key=lambda r: r["oof"])
    # a pseudo-labelled copy of the best member (by OOF: test labels never choose), labels from its own fold models
    name = best["what"].split()[-1]
    pseudo = _yaml(
        work / f"{key}-pseudo-{name}.yaml",
        {"extends": str(base_copy), "pseudo": {"from": str(best["run"]), "threshold": threshold}},
    )
    pcfg = load_config(pseudo, common + [f"{k}={json.dumps(v)}" for k, v in members[name].items()])
    t = time.time()
    run_all(pcfg)
    prow = {"what": f"pseudo ({name})", "run": pcfg.run_dir, "seconds": time.time() - t}
    prow["oof"] = oof_score(cfg, prow["run"])
    prow["test"], prow["test_logloss"] = held_out(cfg, prow["run"], data / "solution.csv")
    rows.append(prow)
    for r in rows:
        r["best"] = r is best
    print(table(key, cfg.metric, rows, best, better, time.time() - t0), flush=True)
    return rows


def table(key: str, metric: str, rows: list[dict], best: dict, better: bool, seconds: float) -> str:
    ll = metric != "logloss"  # a second log-loss column only when the metric is another
    head = (
        f"{'':<22} {'nested OOF ' + metric:>20} {'test ' + metric:>16}"
        + (f" {'test log-loss':>14}" if ll else "")
        + f" {'vs best member (test)':>22}"
    )
    out = [f"\n== {key}: {len(rows)} rows in {seconds:.0f} s ==", head]
    for r in rows:
        gain = r["test"] - best["test"]
        verdict = (
            "" if r is best else (f"{gain:+.4f} " + ("better" if (gain > 0) == better and gain != 0 else "not better"))
        )
        out.append(
            f"{r['what'] + (' *' if r['best'] else ''):<22} {r['oof']:>20.4f} {r['test']:>16.4f}"
            + (f" {r['test_logloss']:>14.4f}" if ll else "")
            + f" {verdict:>22}"
        )
    out.append("* the best single member by OOF (test labels choose nothing)")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a new temp folder)")
    ap.add_argument("--only", choices=list(COMPETITIONS), action="append")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs for every member (default: the base's)")
    ap.add_argument("--n-train", type=int, default=None, help="iceberg demo: training images")
    ap.add_argument("--n-test", type=int, default=None, help="held-out test images")
    ap.add_argument("--seed", type=int, default=0, help="demo data seed")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every member and the pseudo run"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny settings: every step runs once, the figures mean nothing"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        args.set = SMOKE_SET + args.set
    from pipeline.core.logs import to_stdout

    to_stdout()
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="second_stage-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working in {work}", flush=True)
    summary = {}
    for key in args.only or list(COMPETITIONS):
        rows = run_competition(key, args, work)
        summary[key] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows]
    print("JSON " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
