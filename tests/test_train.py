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
from conftest import lock_held_elsewhere, run_cli
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.folds import run_fold
from pipeline.data.formats import read_table
from pipeline.models.backbones import apply_finetune, backbone_groups, build_model, load_checkpoint
from pipeline.train.cv import train_cv
from pipeline.train.optim import build_optimizer

quiet = lambda *a: None  # noqa: E731


def _prepare(path, overrides=()):
    cfg = load_config(path, list(overrides))
    run_fold(cfg)
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
    model.eval()  # the checkpoint reproduces fold 0's saved OOF predictions
    oof0 = pd.read_csv(run / "fold_0" / "oof.csv", dtype={"id": str})
    rows = pd.Index(tr.ids.astype(str)).get_indexer(oof0["id"])
    with torch.no_grad():
        again = torch.softmax(model(torch.from_numpy(tr.images[rows].astype(np.float32)), None).double(), 1).numpy()
    np.testing.assert_allclose(again, oof0.filter(like="p_").to_numpy(), atol=1e-5)
    assert any((run / "fold_0" / "tb").iterdir())
    assert (run / "config.train.yaml").read_text().startswith("# resolved from")
    # rerun skips finished folds
    assert run_cli("train", path) == 0
    assert capsys.readouterr().out.count("done, skipping") == 3


def test_deterministic_on_cpu(digits_config, tmp_path):
    path = digits_config(augment=[{"name": "Affine", "rotate": [-10, 10], "p": 0.5}])
    cfg = _prepare(path)
    a = train_cv(cfg)
    os.chdir(tmp_path / "..")
    os.makedirs("again", exist_ok=True)
    os.chdir("again")
    run_fold(cfg)
    b = train_cv(cfg)
    pd.testing.assert_frame_equal(a, b)


def test_folds_as_separate_jobs(digits_config, capsys):
    cfg = _prepare(digits_config())
    assert train_cv(cfg, folds=[0]) is None
    assert "oof.csv waits for fold(s) [1, 2]" in capsys.readouterr().out
    assert train_cv(cfg, folds=[2, 1]) is not None
    with pytest.raises(PipelineError, match=r"--folds: no fold 5; folds/comp.csv has folds 0..2"):
        train_cv(cfg, folds=[5])


def test_config_change_retrains(digits_config, capsys):
    cfg = _prepare(digits_config())
    train_cv(cfg)
    train_cv(load_config(cfg.path, ["train.lr=0.002"]), folds=[0])
    assert "fold 0: finished under another config; kept in" in capsys.readouterr().out


@pytest.mark.parametrize(
    "opt,sched", [("sgd", "step"), ("adam", "onecycle"), ("adamw", "cosine"), ("rmsprop", "plateau")]
)
def test_optimizers_and_schedulers(digits_config, opt, sched):
    cfg = _prepare(
        digits_config(
            train={
                "optimizer": opt,
                "scheduler": sched,
                "warmup_epochs": 0.5,
                "epochs": 2,
                "weight_decay": 1e-4,
                "label_smoothing": 0.1,
                "grad_clip": 1.0,
                "step_size": 1,
                "max_steps_per_epoch": 3,
            }
        )
    )
    oof = train_cv(cfg, folds=None)
    assert np.isfinite(oof.filter(like="p_").to_numpy()).all()
    hist = pd.read_csv("runs/comp/exp/fold_0/history.csv")
    assert hist["lr"].nunique() > 1 or sched in ("plateau", "step")  # epoch schedulers log the lr used
    assert hist["lr"].iloc[0] <= cfg.train.lr


def test_new_head_starts_calibrated(digits_config):
    """On pretrained features a new head predicts the uniform distribution; from scratch it keeps
    PyTorch's init (a zero head would pass no gradient back to layers that have everything to learn)."""
    for pretrained in (True, False):
        cfg = load_config(digits_config(model={"backbone": "tf_efficientnet_lite0", "pretrained": pretrained}))
        model, source = build_model(cfg, 1, 10, 0, (32, 32))
        assert (source != "random init") == pretrained
        with torch.no_grad():
            p = torch.softmax(model.eval()(torch.rand(4, 1, 32, 32) * 255), 1).numpy()
        assert np.allclose(p, 0.1, atol=1e-6) == pretrained and (model.head[1].weight.abs().sum() > 0) != pretrained


@pytest.mark.parametrize("size, chans", [(4, 1), (8, 1), (28, 1), (29, 2), (47, 3)])
def test_bn_cnn_takes_any_small_size_and_channel_count(digits_config, size, chans):
    """The from-scratch CNN for small images (plan.SCRATCH): pooled, so any side from 4 px; its coarse
    groups cover every parameter (gradual fine-tuning and Grad-CAM rely on them)."""
    cfg = load_config(digits_config(model={"backbone": "bn_cnn"}))
    model, source = build_model(cfg, chans, 10, 0, (size, size))
    assert source == "random init" and model.backbone.num_features == 128
    assert model(torch.rand(3, chans, size, size) * 255).shape == (3, 10)
    groups = backbone_groups(model.backbone)
    assert sorted(n for g in groups for n in g) == sorted(n for n, _ in model.backbone.named_parameters())
    # the stem and three stages (unfreeze_stages: 1 is the last conv-BN, not one BatchNorm)
    assert [sorted({n.split(".")[1] for n in g}, key=int) for g in groups] == [
        ["0", "1"],
        ["3", "4"],
        ["8", "9", "11", "12"],
        ["16", "17"],
    ]
    with pytest.raises(PipelineError, match="no pretrained weights for .bn_cnn."):
        build_model(
            load_config(digits_config(model={"backbone": "bn_cnn", "pretrained": True})), chans, 10, 0, (size, size)
        )


def test_bn_cnn_learns_the_digits(digits_config):
    """Three epochs on 400 of the 8x8 digits: the held-out fold well above chance (0.54), the loss falling."""
    cfg = _prepare(digits_config(model={"backbone": "bn_cnn"}, train={"epochs": 3}))
    train_cv(cfg, folds=[0])
    hist = pd.read_csv("runs/comp/exp/fold_0/history.csv")
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0] and hist["val_accuracy"].max() > 0.4, (
        hist
    )  # chance: 0.1


@given(scale=st.floats(0.05, 20), offset=st.floats(-200, 200), chans=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_per_image_input_norm_ignores_brightness_and_contrast(digits_config, scale, offset, chans, seed):
    """model.input_norm: image: an image scanned brighter, darker or at another contrast (a x + b, a > 0)
    gives the same prediction; the dataset statistics are fitted on the standardised images."""
    torch.manual_seed(seed)
    cfg = load_config(digits_config(model={"backbone": "bn_cnn", "input_norm": "image"}))
    model, _ = build_model(cfg, chans, 10, 0, (12, 12))
    torch.nn.init.normal_(model.head[1].weight)
    x = torch.rand(4, chans, 12, 12) * 255
    model.fit_normalisation(x.numpy(), None)  # the statistics of the standardised images: any scale gives them
    stats = model.img_mean.clone(), model.img_std.clone()
    model.fit_normalisation(x.numpy() * 3 + 7, None)
    assert torch.allclose(stats[0], model.img_mean, atol=1e-5) and torch.allclose(stats[1], model.img_std, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x * scale + offset)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * a.abs().max().item())
    flat = model(torch.full((1, chans, 12, 12), 9.0)).detach()  # a flat image: zeros in, no NaN out
    assert torch.isfinite(flat).all()


def test_input_norm_is_kept_with_the_checkpoint(digits_config):
    """A run trained with input_norm: image predicts with it from its checkpoint alone; a checkpoint
    written before the key existed rebuilds with the dataset normalisation."""
    cfg = _prepare(digits_config(model={"backbone": "bn_cnn", "input_norm": "image"}, train={"epochs": 1}))
    train_cv(cfg, folds=[0])
    model, meta = load_checkpoint("runs/comp/exp/fold_0/best.safetensors")
    assert meta["model"]["input_norm"] == "image" and model.per_image
    meta["model"].pop("input_norm")
    Path("runs/comp/exp/fold_0/best.json").write_text(json.dumps(meta))
    assert not load_checkpoint("runs/comp/exp/fold_0/best.safetensors")[0].per_image


def test_finetune_strategies(digits_config):
    cfg = load_config(
        digits_config(
            model={
                "backbone": "resnet18",
                "pretrained": False,
                "finetune": "partial",
                "unfreeze_stages": 2,
                "backbone_lr_mult": 0.1,
            }
        )
    )
    model, _ = build_model(cfg, 1, 10, 0, (8, 8))
    groups = backbone_groups(model.backbone)
    n = apply_finetune(model, "partial", 2)
    trainable = {k for k, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == set(groups[-1] + groups[-2]) and n == len(trainable)
    apply_finetune(model, "head", 0)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    opt = build_optimizer(cfg, model)
    lr_of = {id(q): g["lr"] for g in opt.param_groups for q in g["params"]}  # head, then backbone x (decayed, not)
    assert all(
        lr_of[id(q)] == pytest.approx(cfg.train.lr * (0.1 if n.startswith("backbone.") else 1))
        for n, q in model.named_parameters()
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.train.lr) and len(lr_of) == len(list(model.parameters()))


def test_head_only_caches_features_and_keeps_backbone(digits_config, capsys):
    cfg = _prepare(
        digits_config(model={"backbone": "resnet18", "pretrained": False, "finetune": "head"}, data={"image_size": 32})
    )
    train_cv(cfg, folds=[0])
    assert "head-only: cached backbone features of 600 images" in capsys.readouterr().out
    trained, _ = load_checkpoint("runs/comp/exp/fold_0/best.safetensors")
    torch.manual_seed(0)
    from pipeline.train.trainer import derive_seed, seed_everything

    seed_everything(derive_seed("init", cfg.train.seed))
    fresh, _ = build_model(cfg, 1, 10, 0, (32, 32))
    for (k, a), b in zip(trained.backbone.state_dict().items(), fresh.backbone.state_dict().values()):
        assert torch.equal(a, b), k


def test_gradual_unfreeze(digits_config):
    cfg = _prepare(
        digits_config(
            model={"backbone": "resnet18", "pretrained": False, "finetune": "head", "unfreeze_after": 1},
            data={"image_size": 16},
            train={"max_steps_per_epoch": 2},
        )
    )
    train_cv(cfg, folds=[0])
    trained, _ = load_checkpoint("runs/comp/exp/fold_0/best.safetensors")
    from pipeline.train.trainer import derive_seed, seed_everything

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
    train_cv(cfg, folds=[0])
    meta_path = Path("runs/comp/exp/fold_0/best.json")
    meta = json.loads(meta_path.read_text())
    meta["in_chans"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        PipelineError, match=r"best.safetensors: checkpoint does not fit simple_cnn with in_chans=3, 10 classes"
    ):
        load_checkpoint("runs/comp/exp/fold_0/best.safetensors")
    Path("runs/comp/exp/fold_0/best.safetensors").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match=r"corrupt checkpoint"):
        load_checkpoint("runs/comp/exp/fold_0/best.safetensors")


def test_corrupt_resume_checkpoint_keeps_finished_folds(digits_config, capsys):
    path = digits_config()
    cfg = _prepare(path)
    train_cv(cfg, folds=[0])
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


@pytest.mark.slow  # heavy: full tier (make test-all)
def test_killed_fold_resumes_to_same_oof(digits_config, tmp_path, capsys):
    """A real subprocess killed with SIGKILL mid-fold resumes from its last completed epoch."""
    path = digits_config(
        folds={"n_splits": 2, "seed": 0},
        train={"epochs": 6, "lr": 1e-3},
        model={"backbone": "resnet18", "pretrained": False},
        data={"image_size": 24},
    )
    cfg = _prepare(path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", str(path), "--folds", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
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
    assert epochs_before < 6
    capsys.readouterr()
    train_cv(cfg, folds=[0])  # only the killed fold: fold 1 has nothing to prove
    lines = capsys.readouterr().out.splitlines()
    resumed = pd.read_csv("runs/comp/exp/fold_0/oof.csv")
    said = [s for s in lines if "resuming after epoch" in s]
    assert said and said[0].startswith("fold 0: resuming after epoch")
    resumed_epoch = int(said[0].split("epoch ")[1].split()[0])
    assert resumed_epoch >= 1
    assert pd.read_csv(hist)["epoch"].tolist() == list(range(1, 7))  # trimmed and continued, no duplicates
    assert not list(Path("runs/comp/exp").rglob("*.tmp"))  # whatever the killed process was writing is gone
    os.makedirs(tmp_path / "clean", exist_ok=True)
    os.chdir(tmp_path / "clean")
    run_fold(cfg)
    train_cv(cfg, folds=[0])
    clean = pd.read_csv("runs/comp/exp/fold_0/oof.csv")
    pcols = [c for c in clean.columns if c.startswith("p_")]
    np.testing.assert_allclose(resumed[pcols].to_numpy(), clean[pcols].to_numpy(), atol=1e-5)


def test_early_stopping_on_patience(digits_config, capsys):
    """A learning rate too small to move the weights: no epoch after the first improves val_loss."""
    cfg = _prepare(digits_config(train={"epochs": 6, "patience": 2, "lr": 1e-12, "scheduler": "none"}))
    train_cv(cfg, folds=[0])
    out = capsys.readouterr().out
    assert "fold 0: early stop after 2 epochs without val_loss improvement" in out
    done = json.loads(Path("runs/comp/exp/fold_0/done.json").read_text())
    assert done["epochs_run"] == 3 and done["best_epoch"] == 1
    assert pd.read_csv("runs/comp/exp/fold_0/history.csv")["epoch"].tolist() == [1, 2, 3]


def test_resume_trims_history_written_after_the_last_checkpoint(digits_config, capsys):
    """Killed between the history row and the resume state of epoch 3: epoch 3 is redone, once."""
    cfg = _prepare(digits_config(train={"epochs": 4}))

    def stop_after_2(job, epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cv(cfg, folds=[0], on_epoch=stop_after_2)
    hist = Path("runs/comp/exp/fold_0/history.csv")
    df = pd.read_csv(hist)
    pd.concat([df, df.tail(1).assign(epoch=3)]).to_csv(hist, index=False)  # a row whose state was never saved
    assert not Path("runs/comp/exp/fold_0/lock").exists()  # the interrupted run released its lock
    train_cv(cfg, folds=[0])
    assert "fold 0: resuming after epoch 2 (best val_loss" in capsys.readouterr().out
    assert pd.read_csv(hist)["epoch"].tolist() == [1, 2, 3, 4]


def test_scalar_features_are_standardised_and_join_the_head(make_config, iceberg_dir):
    cfg = load_config(make_config(iceberg_dir, model={"backbone": "simple_cnn", "pretrained": False}))
    tr = read_table(cfg, "train")
    model, _ = build_model(cfg, 2, 2, 2, tr.image_size)
    model.fit_normalisation(tr.images, tr.features)
    angles = tr.features[:, 0]
    assert model.feat_mean[0].item() == pytest.approx(np.nanmean(angles), rel=1e-5)
    assert model.feat_std[0].item() == pytest.approx(np.nanstd(angles), rel=1e-4)
    nn = torch.nn
    nn.init.normal_(model.head[1].weight)  # a trained head: the features now change the output
    x = torch.from_numpy(tr.images[:2]).float()
    f = torch.from_numpy(tr.features[:2]).float()
    with torch.no_grad():
        a = model(x, f)
        b = model(x, f + torch.tensor([5.0, 0.0]))
        c = model(x, torch.tensor([[float("nan"), 1.0]] * 2))  # "na" angle: mean + missing flag, still finite
    assert not torch.allclose(a, b) and torch.isfinite(c).all()
    off = load_config(cfg.path, ["model.use_features=false"])
    m2, _ = build_model(off, 2, 2, 2, tr.image_size)
    assert m2.n_features == 0
    with torch.no_grad():
        assert m2(x, None).shape == (2, 2)


def test_a_fold_held_by_another_live_process_is_skipped(digits_config, capsys):
    import socket

    cfg = _prepare(digits_config(train={"epochs": 1}))
    d = Path("runs/comp/exp/fold_1")
    d.mkdir(parents=True)
    with lock_held_elsewhere(d / "lock", "fold 1"):  # a live process holds the fold
        assert train_cv(cfg) is None
    out = capsys.readouterr().out
    assert (
        "fold 1: skipping, " in out and "fold 1 is being worked on by" in out and "oof.csv waits for fold(s) [1]" in out
    )
    assert not (d / "done.json").exists() and Path("runs/comp/exp/fold_2/done.json").exists()
    (d / "lock").write_text(f"{socket.gethostname()} 999999999")  # its process is gone: taken over
    assert train_cv(cfg) is not None and not (d / "lock").exists()


def test_device_and_workers_do_not_change_the_run(digits_config, capsys):
    """train.device / num_workers / data.dir say where a fold runs, not what it computes: same run."""
    cfg = _prepare(digits_config(train={"epochs": 1}))
    train_cv(cfg, folds=[0])
    train_cv(load_config(cfg.path, ["train.device=cpu", "train.num_workers=1"]), folds=[0, 1, 2])
    out = capsys.readouterr().out
    assert "fold 0: done, skipping" in out and "another config" not in out


def test_regenerated_folds_retrain_finished_folds(digits_config, capsys):
    cfg = _prepare(digits_config(train={"epochs": 1}))
    train_cv(cfg)
    df = pd.read_csv("folds/comp.csv", dtype={"id": str})
    a, b = df.index[df["fold"] == 0][0], df.index[df["fold"] == 1][0]
    df.loc[[a, b], "fold"] = [1, 0]  # the same settings, other assignments (e.g. the data changed)
    df.to_csv("folds/comp.csv", index=False)
    oof = train_cv(cfg)
    assert "fold 0: finished under another config; kept in" in capsys.readouterr().out
    assert (oof.set_index("id").loc[df["id"], "fold"].to_numpy() == df["fold"].to_numpy()).all()


def test_mixup_turns_the_head_only_feature_cache_off(digits_config, capsys):
    cfg = _prepare(
        digits_config(
            model={"backbone": "resnet18", "pretrained": False, "finetune": "head"},
            data={"image_size": 16},
            train={"mixup_alpha": 0.4, "max_steps_per_epoch": 2, "epochs": 1},
        )
    )
    train_cv(cfg, folds=[0])
    assert "cached backbone features" not in capsys.readouterr().out


@pytest.mark.slow  # heavy: full tier (make test-all)
def test_exit_codes_of_real_processes(digits_config, tmp_path):
    """The installed entry point: 0 on success, 2 with one line on stderr (no traceback) on bad input."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    good = digits_config()
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, a)], capture_output=True, text=True, env=env
    )  # noqa: E731
    ok = run("fold", good)
    assert ok.returncode == 0 and "wrote folds/comp.csv" in ok.stdout
    for argv, needle in [
        (("fold", good, "train.lr=fast"), "train.lr"),
        (("fold", tmp_path / "nope.yaml"), "nope.yaml: config file not found"),
        (("train", good, "model.backbone=resnet181"), "close matches: resnet18"),
    ]:
        r = run(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and needle in r.stderr, r.stderr


def test_rerun_removes_only_dead_writers_temp_files(digits_config, capsys):
    """A killed run's temporary files go; a live writer's on a shared run folder, or another host's, stay."""
    import socket

    cfg = _prepare(digits_config(train={"epochs": 1}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dead_pid = socket.gethostname().replace(".", "_"), int(dead.stdout)
    run, job = Path("runs/comp/exp"), Path("runs/comp/exp/fold_0")
    job.mkdir(parents=True)
    left = {
        job / f".last.pt.{host}-{dead_pid}.abc123.tmp": False,  # the fold's lock is ours: every leftover goes
        job / ".best.safetensors.otherhost-12.abc123.tmp": False,
        run / f".oof.csv.{host}-{dead_pid}.zz9_xy.tmp": False,  # run folder: only a dead local writer's
        run / f".oof.csv.{host}-{os.getpid()}.zz9_xy.tmp": True,
        run / f".oof.csv.otherhost-{dead_pid}.zz9_xy.tmp": True,
    }
    for f in left:
        f.write_bytes(b"x" * 1000)
    train_cv(cfg, folds=[0])
    assert {f: f.exists() for f in left} == left
    assert "left by a killed run" in capsys.readouterr().out


def test_resume_state_of_an_older_optimizer_layout_starts_over(digits_config, capsys):
    """A last.pt from before biases were exempt from weight decay (other optimizer groups) restarts the fold."""
    cfg = _prepare(digits_config(train={"epochs": 2}))

    def stop_after_1(job, epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cv(cfg, folds=[0], on_epoch=stop_after_1)
    last = Path("runs/comp/exp/fold_0/last.pt")
    st = torch.load(last, weights_only=True)
    st["opt"]["param_groups"] = st["opt"]["param_groups"][:1]
    torch.save(st, last)
    capsys.readouterr()
    train_cv(cfg, folds=[0])
    out = capsys.readouterr().out
    assert "fold 0: resume state has another optimizer layout; starting over" in out and "fold 0 epoch 1/2" in out
    assert pd.read_csv("runs/comp/exp/fold_0/history.csv")["epoch"].tolist() == [1, 2]
