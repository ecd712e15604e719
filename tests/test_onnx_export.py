"""``pipeline export CONFIG --onnx`` and ``predict.engine: onnx``: every fold model as a graph checked against
torch on its OOF images, predictions that match torch's, and one-line refusals that write nothing."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_TRAIN, cli_error, run_cli

RUN = Path("runs/comp/exp")


def _files(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if ".cache" not in p.parts}


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory, sk_digits_dir):
    """One trained, evaluated 3-fold run (made once), copied into each test's folder by ``trained``."""
    import os

    import yaml

    home = tmp_path_factory.mktemp("onnx-run")
    cfg = home / "exp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "competition": "comp",
                "data": {"format": "pixel_csv", "dir": str(sk_digits_dir)},
                "metric": "accuracy",
                "folds": {"n_splits": 3, "seed": 0},
                "model": {"backbone": "simple_cnn", "pretrained": False, "drop_rate": 0.0},
                "train": dict(TINY_TRAIN),
                "predict": {"tta": ["identity", "hflip", "rot180"]},
                "evaluate": {"adversarial": False, "gradcam_samples": 0},
            }
        )
    )
    here = os.getcwd()
    os.chdir(home)
    try:
        assert run_cli("fold", cfg) == 0 and run_cli("train", cfg) == 0 and run_cli("evaluate", cfg) == 0
    finally:
        os.chdir(here)
    return home


@pytest.fixture
def trained(_trained_once, tmp_path):
    import shutil

    for name in ("runs", "folds", "exp.yaml"):
        src = _trained_once / name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, tmp_path / name)
    return tmp_path / "exp.yaml"


def test_export_then_predict_with_onnx_matches_torch(trained):
    assert run_cli("export", trained, "--onnx") == 0
    for k in range(3):
        meta = json.loads((RUN / f"fold_{k}" / "model.onnx.json").read_text())
        assert (RUN / f"fold_{k}" / "model.onnx").is_file()
        assert meta["opset"] == 17 and meta["max_abs_dp"] <= 1e-4 and meta["rows"] > 100
    assert run_cli("predict", trained) == 0
    torch_pred = pd.read_csv(RUN / "test_pred.csv")
    assert run_cli("predict", trained, "predict.engine=onnx") == 0
    onnx_pred = pd.read_csv(RUN / "test_pred.csv")
    cols = [c for c in torch_pred.columns if c.startswith("p_")]
    assert torch_pred["id"].tolist() == onnx_pred["id"].tolist()
    assert np.abs(torch_pred[cols].to_numpy() - onnx_pred[cols].to_numpy()).max() <= 1e-4


def test_onnx_engine_without_an_export_is_one_line(capsys, trained):
    before = _files(Path.cwd())
    err = cli_error(capsys, "predict", trained, "predict.engine=onnx")
    assert "model.onnx: not exported" in err and "pipeline export" in err and "--onnx" in err
    assert _files(Path.cwd()) == before


def test_onnx_of_other_weights_is_refused(capsys, trained):
    assert run_cli("export", trained, "--onnx") == 0
    meta = RUN / "fold_1" / "model.onnx.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "weights_sha256": "0" * 64}))
    before = _files(Path.cwd())
    err = cli_error(capsys, "predict", trained, "predict.engine=onnx")
    assert "fold_1/model.onnx: exported from other weights" in err and "pipeline export" in err
    assert _files(Path.cwd()) == before


def test_a_model_that_disagrees_is_named_and_nothing_is_written(capsys, trained, monkeypatch):
    import pipeline.predict.export as export

    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # any difference, even 0, is too much
    before = _files(Path.cwd())
    err = cli_error(capsys, "export", trained, "--onnx")
    assert "fold_0/best.safetensors: the ONNX export differs from torch" in err and "nothing exported" in err
    assert _files(Path.cwd()) == before


def test_export_needs_the_format_and_the_models(capsys, digits_config):
    cfg = digits_config()
    assert "choose the format: --onnx" in cli_error(capsys, "export", cfg)
    assert run_cli("fold", cfg) == 0
    before = _files(Path.cwd())
    err = cli_error(capsys, "export", cfg, "--onnx")
    assert "no trained models" in err and "pipeline train" in err
    assert _files(Path.cwd()) == before


@pytest.mark.slow
def test_scalar_features_go_into_the_graph(make_config, iceberg_dir):
    cfg = make_config(
        iceberg_dir,
        folds={"n_splits": 2},
        model={"backbone": "simple_cnn", "pretrained": False, "use_features": True},
        train={"epochs": 1, "batch_size": 32, "device": "cpu", "precision": "fp32"},
        predict={"tta": ["identity", "hflip"]},
        evaluate={"adversarial": False, "gradcam_samples": 0},
        augment=[],
    )
    assert run_cli("fold", cfg) == 0 and run_cli("train", cfg) == 0 and run_cli("evaluate", cfg) == 0
    assert run_cli("export", cfg, "--onnx") == 0
    import onnx

    graph = onnx.load(str(RUN / "fold_0" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["images", "features"]
    assert run_cli("predict", cfg) == 0
    a = pd.read_csv(RUN / "test_pred.csv")
    assert run_cli("predict", cfg, "predict.engine=onnx") == 0
    b = pd.read_csv(RUN / "test_pred.csv")
    assert np.abs(a.filter(like="p_").to_numpy() - b.filter(like="p_").to_numpy()).max() <= 1e-4
