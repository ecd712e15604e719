"""The benchmark suite that guards every default: the configs to copy on real data of several kinds, at two
budgets each, side by side with the plain hand-written 5-fold script at the same budget.

Sets (built once under ``--work``; each set's test labels go to ``solution.csv``, read only to score):

- ``shift-digits``: real MNIST digits as 28 px digit-recognizer CSVs, the test set drawn with another pen,
  scale and paper (``pipeline demo-data shift-digits``), with ``competitions/digits.yaml``;
- ``hard-digits``: the same conditions for train and test, no shift (``pipeline demo-data hard-digits``);
- ``shift-folder``: real MNIST digits at 128 px grey in a folder, test shifted (the SAR-chip stand-in),
  ``competitions/image-folder.yaml``;
- ``flowers``: ``../shared/data/flowers`` (5 classes of 128 px photos) split 80/20 by class, the train
  images in class sub-folders (``train/<class>/<file>``) and the test images flat, ``image-folder.yaml``;
- ``flowers-400``: the same photos at 400 px, the test ones cropped to 70% first (another scale: the aerial
  stand-in, large RGB files), ``image-folder.yaml``;
- ``cifar10``: ``../shared/data/cifar10`` (32 px photos, class sub-folders; its own test split), ``image-folder.yaml``;
- ``iceberg``: the synthetic two-band SAR chips (``pipeline demo-data iceberg``, 106 training rows as the
  real competition's smallest budget case), ``competitions/iceberg.yaml``.

Per set and budget it prints the pipeline (``pipeline run CONFIG data.dir=... --budget B`` in a fresh
process with its own cache) against ``benchmarks/baseline_loop.py`` at the same budget: held-out accuracy
and log-loss, training seconds over the budget (the race and the train stage), and the whole run over the
budget, then the change against ``--base COMMIT`` (the same pipeline command run from that commit's files,
exported with ``git archive``) when given. The last line is JSON. It is a benchmark, not a test: ``make
test-all`` runs only its ``--smoke`` (a tiny set at an 8 s budget).

    .venv/bin/python benchmarks/suite.py --work /tmp/suite [--sets flowers cifar10] [--budgets 90 300] [--base HEAD~3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIG = {"shift-digits": "digits.yaml", "hard-digits": "digits.yaml", "iceberg": "iceberg.yaml"}
BASELINE = {  # the plain script as a competitor would first write it for each kind of data
    "shift-digits": ["--size=28", "--no-pretrained", "--model=resnet10t"],
    "hard-digits": ["--size=28", "--no-pretrained", "--model=resnet10t"],
    "cifar10": ["--size=32"],
    "iceberg": ["--size=75"],
}
SETS = ["shift-digits", "hard-digits", "shift-folder", "flowers", "flowers-400", "cifar10", "iceberg"]
# --smoke: a tiny iceberg set at one small budget, the stages' extras off (tests/test_benchmarks.py)
SMOKE_OVERRIDES = ["evaluate.adversarial=false", "evaluate.gradcam_samples=0", "folds.n_splits=2"]


def build(name: str, out: Path, seed: int = 0, smoke: bool = False) -> Path | None:
    """The set's competition folder (made once); None when its source data is absent."""
    if (out / "solution.csv").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    if name in ("shift-digits", "hard-digits", "shift-folder"):
        from pipeline.data.demo import WRITERS

        WRITERS[name](tmp, seed=seed)
    elif name == "iceberg":
        from pipeline.data.demo import WRITERS

        WRITERS["iceberg"](tmp, **({"n_train": 40, "n_test": 20} if smoke else {"n_train": 106, "n_test": 300}), seed=3)
    elif name in ("flowers", "flowers-400"):
        if not (SHARED / "flowers").is_dir():
            return None
        _split_folder(SHARED / "flowers", tmp, seed, size=400 if name == "flowers-400" else None)
    elif name == "cifar10":
        if not (SHARED / "cifar10").is_dir():
            return None
        _copy_cifar(SHARED / "cifar10", tmp)
    tmp.rename(out)
    return out


def _split_folder(src: Path, out: Path, seed: int, size: int | None) -> None:
    """``src/<class>/*.jpg`` -> ``out/train/<class>/`` (80% by class) and ``out/test/`` flat (20%, renamed so a
    file name tells nothing), ``solution.csv`` id,label. With ``size``: every image resized to it, the test
    images cropped to their central 70% first (the objects larger: another scale)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (out / "test").mkdir(parents=True)
    rows = []
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir()):
        files = sorted(p for p in (src / cls).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        test = set(rng.choice(len(files), size=len(files) // 5, replace=False).tolist())
        (out / "train" / cls).mkdir(parents=True)
        for i, f in enumerate(files):
            is_test = i in test
            name = f"t{len(rows):05d}.jpg" if is_test else f.name
            dst = out / ("test" if is_test else f"train/{cls}") / name
            if size is None:
                shutil.copyfile(f, dst)
            else:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    if is_test:
                        w, h = im.size
                        im = im.crop((int(0.15 * w), int(0.15 * h), int(0.85 * w), int(0.85 * h)))
                    im.resize((size, size), Image.LANCZOS).save(dst, quality=90)
            if is_test:
                rows.append((name, cls))
    _solution(out, rows)


def _copy_cifar(src: Path, out: Path) -> None:
    shutil.copytree(src / "train", out / "train")
    (out / "test").mkdir()
    rows = []
    for cls in sorted(p.name for p in (src / "test").iterdir() if p.is_dir()):
        for f in sorted((src / "test" / cls).iterdir()):
            name = f"t{len(rows):05d}{f.suffix}"
            shutil.copyfile(f, out / "test" / name)
            rows.append((name, cls))
    _solution(out, rows)


def _solution(out: Path, rows: list[tuple[str, str]]) -> None:
    import pandas as pd

    pd.DataFrame(rows, columns=["id", "label"]).to_csv(out / "solution.csv", index=False)


def contest(name: str, data: Path, budget: float, work: Path, base: Path | None, smoke: bool = False) -> dict:
    """The pipeline (and ``base``'s, when given) and the plain script on one set at one budget."""
    import shift_folder as sf

    config = ROOT / "competitions" / CONFIG.get(name, "image-folder.yaml")
    where = work / f"{name}-{budget:g}"
    out = {"set": name, "budget": budget, "config": config.name}
    out["pipeline"] = _score(sf.run_pipeline(config, data, budget, where, SMOKE_OVERRIDES if smoke else []), budget)
    if base is not None:
        out["base"] = _score(_run_at(base, config, data, budget, where / "base"), budget)
    extra = ["--smoke"] if smoke else BASELINE.get(name, [])
    out["baseline_loop"] = _score(sf.run_baseline(data, budget, where, extra), budget)
    return out


def _run_at(base: Path, config: Path, data: Path, budget: float, where: Path) -> dict | None:
    """The pipeline of the ``base`` checkout on the same set: its own code, config, benchmark child and process
    (run from that folder, so ``import pipeline`` finds its code)."""
    import shift_folder as sf

    where.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.dir={data}",
        f"train.time_budget_s={budget:g}",
        f"paths.runs={where / 'runs'}",
        f"paths.folds={where / 'folds'}",
        f"paths.submissions={where / 'submissions'}",
    ]
    env = {**sf._env(where), "PYTHONPATH": str(base)}
    cmd = [
        sys.executable,
        "-c",
        sf.CHILD,
        str(base / "benchmarks"),
        str(base / "competitions" / config.name),
        str(data / "solution.csv"),
        *overrides,
    ]
    log = where / "run.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=base, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    if rc or not lines:
        print(f"  base failed (exit {rc}); see {log}")
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def _score(r: dict | None, budget: float) -> dict | None:
    if r is None:
        return None
    stages = r.get("stages", {})
    trained = stages.get("race", 0.0) + stages.get("train", r.get("train_s", 0.0))
    return {
        "accuracy": r["test_accuracy"],
        "logloss": r["test_logloss"],
        "train_over_budget": round(trained / budget, 2),
        "whole_over_budget": round(r["total_s"] / budget, 2),
        "stages": stages,
    }


def report(rows: list[dict]) -> str:
    head = f"{'set':<14} {'budget':>6}  {'who':<14} {'acc':>6} {'logloss':>8} {'train/B':>8} {'whole/B':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for who in ("pipeline", "base", "baseline_loop"):
            if who not in r:
                continue
            s = r[who]
            if s is None:
                lines.append(f"{r['set']:<14} {r['budget']:>6.0f}  {who:<14} {'failed':>6}")
                continue
            lines.append(
                f"{r['set']:<14} {r['budget']:>6.0f}  {who:<14} {s['accuracy']:>6.3f} {s['logloss']:>8.3f} "
                f"{s['train_over_budget']:>8.2f} {s['whole_over_budget']:>8.2f}"
            )
        p, b = r.get("pipeline"), r.get("baseline_loop")
        if p and b:
            beats = p["accuracy"] > b["accuracy"] and p["logloss"] < b["logloss"]
            lines.append(f"{'':<22} pipeline {'beats' if beats else 'does NOT beat'} the plain script on both")
        if p and r.get("base"):
            lines.append(
                f"{'':<22} change against --base: accuracy {p['accuracy'] - r['base']['accuracy']:+.3f}, "
                f"log-loss {p['logloss'] - r['base']['logloss']:+.3f}"
            )
    return "\n".join(lines)


def _export(rev: str, work: Path) -> Path:
    """The ``rev`` checkout's files (``git archive``, no worktree registered in the repository)."""
    out = work / "base"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pipeline-suite")
    ap.add_argument("--sets", nargs="+", default=SETS, choices=SETS)
    ap.add_argument("--budgets", nargs="+", type=float, default=[90.0, 300.0])
    ap.add_argument("--base", help="a commit whose pipeline runs beside this one on every set and budget")
    ap.add_argument("--json", type=Path, help="append each result as one JSON line")
    ap.add_argument("--smoke", action="store_true", help="a tiny iceberg set at an 8 s budget: it still runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sets, args.budgets = ["iceberg"], [8.0]
    args.work.mkdir(parents=True, exist_ok=True)
    base = _export(args.base, args.work) if args.base else None
    rows = []
    try:
        for name in args.sets:
            data = build(name, args.work / "data" / (name + ("-smoke" if args.smoke else "")), smoke=args.smoke)
            if data is None:
                print(f"[{name}] skipped: {SHARED} holds no source data for it")
                continue
            for budget in args.budgets:
                rows.append(contest(name, data, budget, args.work / "runs", base, smoke=args.smoke))
                print(report(rows[-1:]), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")
    finally:
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    print(report(rows))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.exit(main())
