"""Competition tricks: each does what it says, and resume/determinism still hold with them on."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config.load import load_config
from pipeline.data.folds import run_fold
from pipeline.runs.layout import RunDir
from pipeline.train.cv import train_cv
from pipeline.train.job import FoldTrainer
from pipeline.train.trainer import mix_batch, mixed_loss

quiet = lambda *a: None  # noqa: E731
RUN = Path("runs/comp/exp")


def _prepare(path, overrides=()):
    from pipeline.plan.store import planned

    cfg = planned(load_config(path, list(overrides)))
    run_fold(cfg)
    return cfg


def test_mixup_is_a_convex_combination():
    x = torch.rand(8, 1, 6, 6)
    y = torch.arange(8)
    t = SimpleNamespace(mixup_alpha=0.4, cutmix_alpha=0.0, mix_prob=1.0)
    xm, y2, lam = mix_batch(x, y, t, np.random.default_rng(0))
    perm = y2  # labels are arange, so the partner labels are the permutation
    assert 0 < lam < 1
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])


def test_cutmix_pastes_a_box_and_lam_is_its_share():
    x = torch.zeros(4, 2, 10, 10)
    x += torch.arange(4).view(4, 1, 1, 1).float()  # image i is constant i
    y = torch.arange(4)
    t = SimpleNamespace(mixup_alpha=0.0, cutmix_alpha=1.0, mix_prob=1.0)
    for seed in range(5):
        xm, y2, lam = mix_batch(x, y, t, np.random.default_rng(seed))
        for i in range(4):
            pasted = (xm[i, 0] == y2[i].float()).float().mean().item() if y2[i] != i else 0.0
            assert pasted == pytest.approx(1 - lam, abs=1e-6) or y2[i] == i


def test_mix_prob_zero_is_identity():
    x, y = torch.rand(4, 1, 5, 5), torch.arange(4)
    t = SimpleNamespace(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0)
    xm, y2, lam = mix_batch(x, y, t, np.random.default_rng(0))
    assert lam == 1.0 and xm is x


@pytest.mark.parametrize("k", [2, 10])
@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixed_loss_is_soft_target_cross_entropy(k, mode):
    """The loop's loss on a mixed batch is the cross-entropy against the mixed one-hot targets,
    for binary (2 softmax classes) and multiclass alike."""
    g = torch.Generator().manual_seed(k)
    x, y = torch.rand(16, 2, 8, 8, generator=g), torch.randint(0, k, (16,), generator=g)
    t = SimpleNamespace(
        mixup_alpha=0.4 if mode == "mixup" else 0.0, cutmix_alpha=1.0 if mode == "cutmix" else 0.0, mix_prob=1.0
    )
    _, y2, lam = mix_batch(x, y, t, np.random.default_rng(3))
    assert 0 < lam < 1 and not torch.equal(y, y2)
    logits = torch.randn(16, k, generator=g)
    soft = lam * torch.nn.functional.one_hot(y, k) + (1 - lam) * torch.nn.functional.one_hot(y2, k)
    got = mixed_loss(torch.nn.CrossEntropyLoss(), logits, y, y2, lam)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, soft.float()))


def test_interrupted_run_with_tricks_resumes_identically(digits_config, tmp_path, capsys):
    """Mixup, CutMix, EMA, accumulation and an augmentation: stopped after epoch 2, resumed, equal to a clean run."""
    path = digits_config(
        train={
            "epochs": 4,
            "mixup_alpha": 0.4,
            "cutmix_alpha": 1.0,
            "mix_prob": 0.8,
            "ema_decay": 0.9,
            "accum_steps": 2,
        },
        augment=[{"name": "HorizontalFlip", "p": 0.5}],
    )
    cfg = _prepare(path)

    def stop_at_2(job, epoch, row):
        if job.fold == 1 and epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cv(cfg, on_epoch=stop_at_2)
    assert (RUN / "fold_1" / "last.pt").exists() and not (RUN / "fold_1" / "done.json").exists()
    capsys.readouterr()
    resumed = train_cv(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert "fold 1: resuming after epoch 2 (best val_loss" in "\n".join(lines)
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    import os

    os.chdir(clean_dir)
    run_fold(cfg)
    clean = train_cv(cfg)
    pd.testing.assert_frame_equal(resumed, clean, atol=1e-6, check_exact=False)


def _trainer(cfg, fold=0):
    from pipeline.data.folds import load_folds
    from pipeline.data.formats import read_table

    table = read_table(cfg, "train")
    return FoldTrainer(
        cfg=cfg,
        table=table,
        fold_of=load_folds(cfg, table),
        job=RunDir.of(cfg).job_dir(fold, 42),
        device=torch.device("cpu"),
        run_hash="h",
    )


def test_tricks_on_are_deterministic(digits_config, tmp_path):
    """Same config and seed with every trick on gives identical OOF predictions."""
    path = digits_config(
        train={
            "epochs": 2,
            "mixup_alpha": 0.4,
            "cutmix_alpha": 1.0,
            "mix_prob": 0.8,
            "ema_decay": 0.9,
            "accum_steps": 2,
            "balanced_sampling": True,
            "class_weights": "balanced",
            "seeds": [1, 2],
        },
        augment=[{"name": "HorizontalFlip", "p": 0.5}, {"name": "Affine", "rotate": [-10, 10], "p": 0.5}],
    )
    a = train_cv(_prepare(path))
    import os

    os.makedirs(tmp_path / "again")
    os.chdir(tmp_path / "again")
    b = train_cv(_prepare(path))
    pd.testing.assert_frame_equal(a, b)


def test_ema_weights_are_evaluated_and_checkpointed(digits_config):
    from pipeline.models.backbones import load_checkpoint
    from pipeline.models.inference import predict_logits
    from pipeline.tasks.classification import softmax

    cfg = _prepare(digits_config(train={"ema_decay": 0.5, "epochs": 1}))
    trainer = _trainer(cfg)
    trainer.run()
    saved, meta = load_checkpoint(RUN / "fold_0" / "best.safetensors")
    ema = trainer.ema.module.state_dict()
    raw = trainer.model.state_dict()
    k = "head.1.weight"
    assert torch.equal(saved.state_dict()[k], ema[k]) and not torch.equal(ema[k], raw[k])
    assert meta["ema"] is True
    # the fold's validation predictions (oof) come from the EMA weights, not the raw ones
    t, va = trainer.table, trainer.va_idx
    oof = pd.read_csv(RUN / "fold_0" / "oof.csv")[[f"p_{c}" for c in t.class_names]].to_numpy()
    for model, same in ((saved, True), (trainer.model, False)):
        p = softmax(predict_logits(model, t.images[va], None, 64, torch.device("cpu")))
        assert np.allclose(p, oof, atol=1e-6) == same


def test_ema_is_a_moving_average_with_the_configured_decay(digits_config):
    cfg = _prepare(digits_config(train={"ema_decay": 0.9, "epochs": 1, "max_steps_per_epoch": 1}))
    trainer = _trainer(cfg)
    trainer.build()
    init = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_epoch(1)  # exactly one optimizer step
    ema = dict(trainer.ema.module.named_parameters())
    moved = 0
    for n, p in trainer.model.named_parameters():
        changed = not torch.equal(p, init[n])
        # a conv bias right before BatchNorm has no gradient and, exempt from weight decay, stays put
        assert changed or (p.ndim == 1 and n.endswith(".bias")), n
        moved += changed
        torch.testing.assert_close(ema[n], 0.9 * init[n] + 0.1 * p.detach(), rtol=0, atol=1e-6)
    assert moved > len(init) // 2  # every weight matrix and the head moved


def test_gradient_accumulation_steps_the_optimizer_less_often(digits_config):
    cfg = _prepare(digits_config(train={"accum_steps": 3, "epochs": 1, "batch_size": 50, "patience": 0}))
    trainer = _trainer(cfg)
    trainer.build()
    trainer.train_epoch(1)
    batches = len(trainer.epoch_batches(1, np.random.default_rng(0)))  # 400 rows / 50 = 8 batches
    steps = int(next(iter(trainer.opt.state.values()))["step"])
    assert batches == 8 and steps == 3  # ceil(8 / 3)


def test_gradient_accumulation_keeps_the_schedule_length(digits_config):
    """Per-step schedules count optimizer steps: with accumulation the cosine still ends at 0."""
    cfg = _prepare(digits_config(train={"accum_steps": 3, "epochs": 2, "batch_size": 50, "scheduler": "cosine"}))
    trainer = _trainer(cfg)
    trainer.build()
    lrs = []
    for epoch in (1, 2):
        trainer.train_epoch(epoch)
        lrs.append(trainer.opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(cfg.train.lr * 0.5, rel=1e-6)  # half-way after one of two epochs
    assert lrs[1] == pytest.approx(0.0, abs=1e-12)


def test_gradient_accumulation_equals_one_larger_batch(digits_config, monkeypatch):
    """Two accumulated half batches give the same update as one full batch (dropout off, plain SGD)."""
    import pipeline.train.passes as tr

    monkeypatch.setattr(
        tr, "freeze_bn_stats", lambda model, every=False: model.eval()
    )  # no dropout: the two runs are comparable
    sgd = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "scheduler": "none", "lr": 0.05, "epochs": 1}

    def weights_after(batch_size, accum, steps):
        cfg = _prepare(
            digits_config(train={**sgd, "batch_size": batch_size, "accum_steps": accum, "max_steps_per_epoch": steps})
        )
        trainer = _trainer(cfg)
        trainer.build()
        trainer.train_epoch(1)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    big, accumulated, two_steps = weights_after(32, 1, 1), weights_after(16, 2, 2), weights_after(16, 1, 2)
    for n in big:
        torch.testing.assert_close(accumulated[n], big[n], rtol=0, atol=1e-6)
    assert any(not torch.allclose(two_steps[n], big[n], atol=1e-6) for n in big)  # the check can fail


def test_balanced_sampling_and_class_weights(digits_config, sk_digits_dir, tmp_path, make_config):
    # a skewed copy of the digits: class 0 keeps 10% of its rows
    df = pd.read_csv(sk_digits_dir / "train.csv")
    skew = pd.concat([df[df.label != 0], df[df.label == 0].iloc[:6]])
    d = tmp_path / "skew"
    d.mkdir()
    skew.to_csv(d / "train.csv", index=False)
    (d / "test.csv").write_text((sk_digits_dir / "test.csv").read_text())
    path = make_config(
        d,
        "pixel_csv",
        folds={"n_splits": 3},
        model={"backbone": "simple_cnn", "pretrained": False},
        train={"balanced_sampling": True, "class_weights": "balanced", "batch_size": 32},
    )
    cfg = _prepare(path)
    trainer = _trainer(cfg)
    trainer.build()
    idx = np.concatenate(trainer.epoch_batches(1, np.random.default_rng(0)))
    share0 = (trainer.table.labels[idx] == 0).mean()
    assert share0 > 0.05  # ~1/10 drawn although class 0 is ~1% of the rows
    w = trainer.loss_fn.weight.numpy()
    assert w[0] > 5 * w[1]


def test_several_seeds_are_averaged(digits_config):
    cfg = _prepare(digits_config(train={"seeds": [1, 2], "epochs": 1}))
    oof = train_cv(cfg)
    a = pd.read_csv(RUN / "fold_0_seed1" / "oof.csv", dtype={"id": str}).set_index("id")
    b = pd.read_csv(RUN / "fold_0_seed2" / "oof.csv", dtype={"id": str}).set_index("id")
    pcols = [c for c in a.columns if c.startswith("p_")]
    got = oof.set_index("id").loc[a.index, pcols].to_numpy()
    np.testing.assert_allclose(got, (a[pcols].to_numpy() + b[pcols].to_numpy()) / 2, atol=1e-7)
    assert not np.allclose(a[pcols], b[pcols])


def test_time_budget_stops_at_epoch_boundary_with_complete_oof(digits_config, capsys):
    cfg = _prepare(digits_config(train={"epochs": 50, "time_budget_s": 0.001}))
    oof = train_cv(cfg)
    out = capsys.readouterr().out
    assert out.count("time budget share spent after epoch 1") == 3
    assert len(oof) == 600 and oof["fold"].nunique() == 3


def test_time_budget_share_counts_the_refit_jobs(digits_config, monkeypatch):
    """What is left of the budget is split equally over the jobs left, refit models included: one rule
    (``budget.job_deadline``) for every executor."""
    import pipeline.train.cv as cv
    import pipeline.train.executors as executors
    from pipeline.train.budget import job_deadline, waves

    assert job_deadline(100.0, 1000.0, 3, now=1040.0) == pytest.approx(1040.0 + 60.0 / 3)
    assert job_deadline(100.0, 900.0, 2, now=1040.0) == pytest.approx(1040.0)  # spent: stop after the next epoch
    assert job_deadline(None, 1000.0, 3, now=1040.0) is None
    assert [waves(n, 2) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    cfg = load_config(digits_config(train={"time_budget_s": 100.0}))
    seen = []
    for module in (cv, executors):
        monkeypatch.setattr(module, "job_deadline", lambda b, t0, left, **_: seen.append(left) or None)
    train_cv(_prepare(cfg.path, ["train.epochs=1", "train.refit=true", "train.seeds=[1,2]"]))
    assert seen == [8, 7, 6, 5, 4, 3, 2, 1]  # 3 folds x 2 seeds, then 2 refits


def test_num_workers_do_not_change_results(digits_config, tmp_path):
    import os

    path = digits_config(train={"epochs": 1}, augment=[{"name": "HorizontalFlip", "p": 0.5}])
    a = train_cv(_prepare(path))
    os.makedirs(tmp_path / "w2")
    os.chdir(tmp_path / "w2")
    b = train_cv(_prepare(path, ["train.num_workers=2"]))
    pd.testing.assert_frame_equal(a, b)


def test_precision_auto_measures_once_and_is_reused(digits_config, monkeypatch, capsys):
    import pipeline.train.precision as prec

    cfg = _prepare(digits_config(train={"precision": "auto", "epochs": 1}))
    train_cv(cfg, folds=[0])
    assert "precision auto: fp32" in capsys.readouterr().out  # both were timed, on any CPU
    choice = json.loads((RUN / "precision.json").read_text())["precision"]
    assert choice in ("fp32", "bf16")
    assert json.loads((RUN / "fold_0" / "best.json").read_text())["precision"] == choice
    snapshot = (RUN / "config.train.yaml").read_text()  # the resolved config records the choice
    assert f"# train.precision: auto resolved to {choice}" in snapshot and f"precision: {choice}" in snapshot
    monkeypatch.setattr(prec, "measure", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured again")))
    train_cv(cfg, folds=[1])  # resuming the run reuses its choice
    (RUN / "precision.json").unlink()  # a new run on the same machine/model/shape reuses the cache
    train_cv(cfg, folds=[2])
    assert json.loads((RUN / "precision.json").read_text())["precision"] == choice
    # another model is another key: measured again, not the stale choice of this run
    other = _prepare(
        digits_config(train={"precision": "auto", "epochs": 1}, model={"drop_rate": 0.1}, data={"image_size": 12})
    )
    with pytest.raises(AssertionError, match="measured again"):
        train_cv(other, folds=[0])


def test_refit_on_all_rows_with_cv_epoch_count(digits_config, capsys):
    cfg = _prepare(digits_config(train={"epochs": 3, "refit": True}))
    train_cv(cfg)
    out = capsys.readouterr().out
    best = [json.loads((RUN / f"fold_{k}" / "done.json").read_text())["best_epoch"] for k in range(3)]
    n = int(np.median(best))
    assert f"refit on all 600 rows for {n} epochs" in out
    done = json.loads((RUN / "refit" / "done.json").read_text())
    assert done["epochs_run"] == n and (RUN / "refit" / "best.safetensors").exists()
    assert not (RUN / "refit" / "oof.csv").exists()
    train_cv(cfg)
    assert "refit: done, skipping" in capsys.readouterr().out


def test_thread_plan_is_fixed_by_the_job_list():
    from pipeline.train.executors import thread_plan

    assert thread_plan(4, 2, 2) == [1, 1, 1, 1]
    assert thread_plan(3, 2, 2) == [1, 1, 2]  # the last, lone fold gets both cores
    assert thread_plan(5, 2, 8) == [4, 4, 4, 4, 8]
    assert thread_plan(2, 4, 2) == [1, 1]


@pytest.mark.slow  # heavy: full tier (make test-all)
def test_fold_jobs_train_folds_in_parallel_processes_deterministically(digits_config, tmp_path, capfd):
    import os

    path = digits_config(train={"epochs": 2, "fold_jobs": 2}, augment=[{"name": "HorizontalFlip", "p": 0.5}])
    a = train_cv(_prepare(path))
    out = capfd.readouterr().out
    assert "fold_jobs 2: 3 fold(s) in 2 processes, threads per fold [1, 1, 2]" in out
    assert "fold 2 epoch 2/2" in out  # the workers' own progress lines
    assert len(a) == 600 and sorted(a["fold"].unique()) == [0, 1, 2]
    assert not list(RUN.rglob("lock")) and not list(RUN.rglob("last.pt"))
    os.makedirs(tmp_path / "again")
    os.chdir(tmp_path / "again")
    b = train_cv(_prepare(path))
    pd.testing.assert_frame_equal(a, b)
    # a bad input inside a worker is the same one-line error in the parent
    os.chdir(tmp_path / "again")
    (RUN / "fold_0" / "done.json").unlink()
    (RUN / "fold_1" / "done.json").unlink()
    (RUN / "fold_1").joinpath("last.pt").write_bytes(b"not a checkpoint")
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match=r"fold_1/last.pt: corrupt resume checkpoint"):
        train_cv(_prepare(path))
