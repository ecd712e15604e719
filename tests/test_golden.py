"""Behaviour is kept byte for byte across refactors: tiny demo runs of each data format, trained,
evaluated and predicted through ``main(argv)``, give the same ``oof.csv``, ``oof_tta.csv`` and
``test_pred.csv`` as the files in ``tests/golden/`` (made before the layout moved).

Floating-point sums depend on the CPU's vector units and torch's thread count: the files are
compared byte for byte on the CPU and torch release they were made on (``tests/golden/machine.json``)
with 2 threads, and to 1e-5 elsewhere, where the last digits of a float may differ.
``python tests/test_golden.py --write`` writes them again (only when a change is meant to change them).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

GOLDEN = Path(__file__).parent / "golden"
FILES = ("oof.csv", "oof_tta.csv", "test_pred.csv")
TINY = {"epochs": 2, "batch_size": 32, "patience": 0, "device": "cpu", "fold_jobs": 1}
CASES = {
    # the Statoil format: two SAR bands and the incidence angle as scalar features, a timm backbone
    "iceberg": {
        "fmt": "statoil_json",
        "metric": "logloss",
        "folds": {"n_splits": 3, "seed": 0},
        "model": {"backbone": "test_efficientnet", "pretrained": False},
        "train": {**TINY, "lr": 3e-3, "optimizer": "adamw", "scheduler": "cosine", "warmup_epochs": 1},
        "augment": [{"name": "HorizontalFlip", "p": 0.5}, {"name": "RandomRotate90", "p": 0.5}],
        "predict": {"tta": ["identity", "hflip"]},
    },
    # digit-recognizer CSVs: the seeds' CNN, one-cycle, label smoothing auto (multi-class log-loss)
    "digits": {
        "fmt": "pixel_csv",
        "metric": "logloss",
        "folds": {"n_splits": 3, "seed": 1},
        "model": {"backbone": "simple_cnn", "pretrained": False, "drop_rate": 0.0},
        "train": {**TINY, "lr": 4e-3, "optimizer": "adam", "scheduler": "onecycle"},
        "augment": [{"name": "Affine", "rotate": [-10, 10], "scale": [0.9, 1.1], "p": 0.5}],
        "predict": {"tta": ["identity", "rotate5"]},
    },
    # an image folder: bn_cnn with per-image input norm and photometric augmentation, accuracy
    "folder": {
        "fmt": "image_folder",
        "metric": "accuracy",
        "folds": {"n_splits": 3, "seed": 2},
        "data": {"image_size": 32, "channels": 1},
        "model": {"backbone": "bn_cnn", "pretrained": False, "input_norm": "image"},
        "train": {**TINY, "lr": 3e-3, "optimizer": "adamw", "scheduler": "cosine"},
        "augment": [{"name": "RandomBrightnessContrast", "p": 0.5}],
        "predict": {"tta": ["identity", "zoom5"]},
    },
}


def _machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "torch": torch.__version__.split("+")[0], "threads": 2}


def _write_data(kind: str, out: Path) -> Path:
    from pipeline.data.demo_digits import write_folder
    from pipeline.data.demo_iceberg import write_iceberg

    if kind == "iceberg":
        write_iceberg(out, n_train=90, n_test=24, seed=11)
    elif kind == "digits":  # scikit-learn's real 8x8 digits as digit-recognizer CSVs: 300 train, 60 test
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = (x * 16).clip(0, 255).astype(int)
        out.mkdir(parents=True, exist_ok=True)
        cols = [f"pixel{i}" for i in range(64)]
        train = pd.DataFrame(x[:300], columns=cols)
        train.insert(0, "label", y[:300])
        train.to_csv(out / "train.csv", index=False)
        pd.DataFrame(x[300:360], columns=cols).to_csv(out / "test.csv", index=False)
    else:
        write_folder(out, n_train=120, n_test=24, seed=13)
    return out


def _run(kind: str, work: Path) -> Path:
    """Fold, train, evaluate and predict one tiny case in ``work``; returns its run folder."""
    import torch
    import yaml

    from pipeline.cli import main

    spec = {k: v for k, v in CASES[kind].items() if k != "fmt"}
    data = _write_data(kind, work / "data")
    cfg = {
        "competition": f"golden-{kind}",
        "data": {"format": CASES[kind]["fmt"], "dir": str(data), **spec.pop("data", {})},
        **spec,
        "evaluate": {"adversarial": False, "gradcam_samples": 0},
    }
    path = work / "golden.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for stage in ("fold", "train", "evaluate", "predict"):
            assert main([stage, str(path)]) == 0, stage
    finally:
        torch.set_num_threads(before)
    return work / "runs" / f"golden-{kind}" / "golden"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", sorted(CASES))
def test_tiny_runs_give_the_golden_predictions(kind, tmp_path):
    run = _run(kind, tmp_path)
    recorded = json.loads((GOLDEN / "machine.json").read_text())
    exact = recorded == _machine()
    for name in FILES:
        want, got = GOLDEN / kind / name, run / name
        assert got.is_file(), f"{kind}: {name} was not written"
        if exact:
            assert got.read_bytes() == want.read_bytes(), f"{kind}/{name} differs from tests/golden"
        else:
            a, b = pd.read_csv(want), pd.read_csv(got)
            assert list(a.columns) == list(b.columns) and (a["id"].astype(str) == b["id"].astype(str)).all()
            num = [c for c in a.columns if c.startswith("p_")]
            assert np.abs(a[num].to_numpy() - b[num].to_numpy()).max() <= 1e-5, f"{kind}/{name}"


def test_golden_files_are_complete():
    assert json.loads((GOLDEN / "machine.json").read_text()).keys() == {"cpu", "torch", "threads"}
    for kind in CASES:
        for name in FILES:
            df = pd.read_csv(GOLDEN / kind / name)
            assert len(df) > 0 and any(c.startswith("p_") for c in df.columns), f"{kind}/{name}"


if __name__ == "__main__" and "--write" in sys.argv:
    import os
    import shutil
    import tempfile

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    for kind in sorted(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            os.environ["PIPELINE_CACHE"] = str(Path(tmp) / ".cache")
            run = _run(kind, Path(tmp))
            (GOLDEN / kind).mkdir(parents=True, exist_ok=True)
            for name in FILES:
                shutil.copyfile(run / name, GOLDEN / kind / name)
    (GOLDEN / "machine.json").write_text(json.dumps(_machine(), indent=1) + "\n")
