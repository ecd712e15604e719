import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_cli
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.fold import run_fold
from pipeline.formats import read_table
from pipeline.models import apply_finetune, backbone_groups, build_model, load_checkpoint
from pipeline.train import build_optimizer, train_cv

quiet = lambda *a: None  # noqa: E731


def _prepare(path, overrides=()):
    cfg = load_config(path, list(overrides))
    run_fold(cfg, echo=quiet)
    return cfg


def test_train_cv_writes_oof_history_checkpoints(digits_config, capsys):
    path = digits_config(train={"epochs": 4})
    assert run_cli("fold", path) == 0
    assert run_cli("train", path) == 0
    out = capsys.readouterr().out
    assert "fold 2 epoch 4/4" in out and "wrote runs/comp/exp/oof.csv" in out
    run = Path("runs/comp/exp")
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    tr = read_table(load_config(path), "train")
    assert list(oof.columns) == ["id", "fold", "target"] + [f"p_{c}" for c in tr.class_names]
    assert sorted(oof["id"]) == sorted(tr.ids) and oof["id"].is_unique
    np.testing.assert_allclose(oof.filter(like="p_").sum(1), 1, atol=1e-5)
    assert (oof["target"].to_numpy() == tr.labels).all()
    acc = (oof.filter(like="p_").to_numpy().argmax(1) == oof["target"]).mean()
    assert acc > 0.7  # 4 epochs on real digits learn something
    hist = pd.read_csv(run / "fold_0" / "history.csv")
    assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "train_img_s"]
    assert hist["epoch"].tolist() == [1, 2, 3, 4]
    meta = json.loads((run / "fold_0" / "best.json").read_text())
    assert meta["class_names"] == tr.class_names and meta["in_chans"] == 1
    model, _ = load_checkpoint(run / "fold_0" / "best.safetensors")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert any((run / "fold_0" / "tb").iterdir())
    assert (run / "config.train.yaml").read_text().startswith("# resolved from")
    # rerun skips finished folds
    assert run_cli("train", path) == 0
    assert capsys.readouterr().out.count("done, skipping") == 3


def test_deterministic_on_cpu(digits_config, tmp_path):
    path = digits_config(augment=[{"name": "Affine", "rotate": [-10, 10], "p": 0.5}])
    cfg = _prepare(path)
    a = train_cv(cfg, echo=quiet)
    os.chdir(tmp_path / "..")
    os.makedirs("again", exist_ok=True)
    os.chdir("again")
    run_fold(cfg, echo=quiet)
    b = train_cv(cfg, echo=quiet)
    pd.testing.assert_frame_equal(a, b)


def test_folds_as_separate_jobs(digits_config, capsys):
    cfg = _prepare(digits_config())
    assert train_cv(cfg, folds=[0], echo=print) is None
    assert "oof.csv waits for fold(s) [1, 2]" in capsys.readouterr().out
    assert train_cv(cfg, folds=[2, 1], echo=quiet) is not None
    with pytest.raises(PipelineError, match=r"--folds: no fold 5; folds/comp.csv has folds 0..2"):
        train_cv(cfg, folds=[5], echo=quiet)


def test_config_change_retrains(digits_config, capsys):
    cfg = _prepare(digits_config())
    train_cv(cfg, echo=quiet)
    train_cv(load_config(cfg.path, ["train.lr=0.002"]), folds=[0], echo=print)
    assert "fold 0: finished under another config; retraining" in capsys.readouterr().out


@pytest.mark.parametrize("opt,sched", [("sgd", "step"), ("adam", "onecycle"), ("adamw", "cosine"), ("rmsprop", "plateau")])
def test_optimizers_and_schedulers(digits_config, opt, sched):
    cfg = _prepare(digits_config(train={"optimizer": opt, "scheduler": sched, "warmup_epochs": 0.5, "epochs": 2,
                                        "weight_decay": 1e-4, "label_smoothing": 0.1, "grad_clip": 1.0, "step_size": 1,
                                        "max_steps_per_epoch": 3}))
    oof = train_cv(cfg, folds=None, echo=quiet)
    assert np.isfinite(oof.filter(like="p_").to_numpy()).all()
    hist = pd.read_csv("runs/comp/exp/fold_0/history.csv")
    assert hist["lr"].nunique() > 1 or sched in ("plateau", "step")  # epoch schedulers log the lr used
    assert hist["lr"].iloc[0] <= cfg.train.lr


def test_new_head_starts_calibrated(digits_config):
    cfg = load_config(digits_config())
    tr = read_table(cfg, "train")
    model, _ = build_model(cfg, 1, 10, 0, tr.image_size)
    with torch.no_grad():
        p = torch.softmax(model(torch.rand(4, 1, 8, 8) * 255), 1)
    np.testing.assert_allclose(p.numpy(), 0.1, atol=1e-6)


def test_finetune_strategies(digits_config):
    cfg = load_config(digits_config(model={"backbone": "resnet18", "pretrained": False, "finetune": "partial",
                                           "unfreeze_stages": 2, "backbone_lr_mult": 0.1}))
    model, _ = build_model(cfg, 1, 10, 0, (8, 8))
    groups = backbone_groups(model.backbone)
    n = apply_finetune(model, "partial", 2)
    trainable = {k for k, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == set(groups[-1] + groups[-2]) and n == len(trainable)
    apply_finetune(model, "head", 0)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    opt = build_optimizer(cfg, model)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([cfg.train.lr, cfg.train.lr * 0.1])


def test_head_only_caches_features_and_keeps_backbone(digits_config, capsys):
    cfg = _prepare(digits_config(model={"backbone": "resnet18", "pretrained": False, "finetune": "head"},
                                 data={"image_size": 32}))
    train_cv(cfg, folds=[0], echo=print)
    assert "head-only: cached backbone features of 600 images" in capsys.readouterr().out
    trained, _ = load_checkpoint("runs/comp/exp/fold_0/best.safetensors")
    torch.manual_seed(0)
    from pipeline.train import derive_seed, seed_everything

    seed_everything(derive_seed("init", cfg.train.seed))
    fresh, _ = build_model(cfg, 1, 10, 0, (32, 32))
    for (k, a), b in zip(trained.backbone.state_dict().items(), fresh.backbone.state_dict().values()):
        assert torch.equal(a, b), k


def test_gradual_unfreeze(digits_config):
    cfg = _prepare(digits_config(model={"backbone": "resnet18", "pretrained": False, "finetune": "head", "unfreeze_after": 1},
                                 data={"image_size": 16}, train={"max_steps_per_epoch": 2}))
    train_cv(cfg, folds=[0], echo=quiet)
    trained, _ = load_checkpoint("runs/comp/exp/fold_0/best.safetensors")
    from pipeline.train import derive_seed, seed_everything

    seed_everything(derive_seed("init", cfg.train.seed))
    fresh, _ = build_model(cfg, 1, 10, 0, (16, 16))
    hist = pd.read_csv("runs/comp/exp/fold_0/history.csv")
    best_epoch = json.loads(Path("runs/comp/exp/fold_0/best.json").read_text())["epoch"]
    changed = any(not torch.equal(a, b) for a, b in zip(trained.backbone.parameters(), fresh.backbone.parameters()))
    assert changed == (best_epoch == 2) and len(hist) == 2


def test_bad_backbone_lists_close_matches(digits_config, capsys):
    path = digits_config(model={"backbone": "resnet181"})
    _prepare(path)
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err
    assert "model.backbone: timm does not know 'resnet181'; close matches: resnet18" in err


def test_checkpoint_that_does_not_fit(digits_config, tmp_path):
    cfg = _prepare(digits_config())
    train_cv(cfg, folds=[0], echo=quiet)
    meta_path = Path("runs/comp/exp/fold_0/best.json")
    meta = json.loads(meta_path.read_text())
    meta["in_chans"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match=r"best.safetensors: checkpoint does not fit simple_cnn with in_chans=3, 10 classes"):
        load_checkpoint("runs/comp/exp/fold_0/best.safetensors")
    Path("runs/comp/exp/fold_0/best.safetensors").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match=r"corrupt checkpoint"):
        load_checkpoint("runs/comp/exp/fold_0/best.safetensors")


def test_corrupt_resume_checkpoint_keeps_finished_folds(digits_config, capsys):
    path = digits_config()
    cfg = _prepare(path)
    train_cv(cfg, folds=[0], echo=quiet)
    d = Path("runs/comp/exp/fold_1")
    d.mkdir(parents=True)
    (d / "last.pt").write_bytes(b"not a checkpoint")
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err
    assert "fold_1/last.pt: corrupt resume checkpoint" in err and "delete it to restart fold 1" in err
    assert Path("runs/comp/exp/fold_0/done.json").exists()


def test_cuda_requested_without_gpu(digits_config, capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    path = digits_config()
    _prepare(path)
    assert run_cli("train", path, "train.device=cuda:1") == 2
    assert "train.device: cuda:1 requested but CUDA is not available" in capsys.readouterr().err


def test_killed_fold_resumes_to_same_oof(digits_config, tmp_path):
    """A real subprocess killed with SIGKILL mid-fold resumes from its last completed epoch."""
    path = digits_config(folds={"n_splits": 2, "seed": 0}, train={"epochs": 8, "lr": 1e-3},
                         model={"backbone": "resnet18", "pretrained": False}, data={"image_size": 32})
    cfg = _prepare(path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(path), "--folds", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    hist = Path("runs/comp/exp/fold_0/history.csv")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if hist.exists() and len(pd.read_csv(hist)) >= 2 and Path("runs/comp/exp/fold_0/last.pt").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not Path("runs/comp/exp/fold_0/done.json").exists()  # really unfinished
    epochs_before = len(pd.read_csv(hist))
    assert epochs_before < 8
    lines = []
    resumed = train_cv(cfg, echo=lines.append)
    said = [s for s in lines if "resuming after epoch" in s]
    assert said and said[0].startswith("fold 0: resuming after epoch")
    resumed_epoch = int(said[0].split("epoch ")[1].split()[0])
    assert resumed_epoch >= 1
    assert pd.read_csv(hist)["epoch"].tolist() == list(range(1, 9))  # trimmed and continued, no duplicates
    os.makedirs(tmp_path / "clean", exist_ok=True)
    os.chdir(tmp_path / "clean")
    run_fold(cfg, echo=quiet)
    clean = train_cv(cfg, echo=quiet)
    pcols = [c for c in clean.columns if c.startswith("p_")]
    np.testing.assert_allclose(resumed[pcols].to_numpy(), clean[pcols].to_numpy(), atol=1e-5)
