"""pipeline.train.optim: timm-built optimizers over our parameter groups, the schedule registry, and a
newly registered optimizer end to end."""

import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.config.load import load_config
from pipeline.config.registries import OPTIMIZERS, SCHEDULERS
from pipeline.core.errors import PipelineError
from pipeline.data.folds import run_fold
from pipeline.train.hparams import headline
from pipeline.train.optim import OptimizerSpec, build_optimizer, build_scheduler


class Tiny(nn.Module):
    """A backbone (conv + batch norm) and a head (linear), named like pipeline.models.backbones.Net."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def _cfg(digits_config, backbone_lr_mult=0.1, **train):
    return load_config(digits_config(train=train, model={"backbone_lr_mult": backbone_lr_mult}))


def _group_of(opt) -> dict:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def test_weight_decay_only_on_conv_and_linear_weights(digits_config):
    cfg = _cfg(digits_config, optimizer="adamw", weight_decay=0.05, lr=0.01)
    model = Tiny()
    groups = _group_of(build_optimizer(cfg, model))
    decayed = {"backbone.0.weight", "head.weight"}
    for name, p in model.named_parameters():
        assert groups[id(p)]["weight_decay"] == (0.05 if name in decayed else 0.0), name
    assert len(groups) == sum(1 for _ in model.parameters())  # every parameter in exactly one group


def test_backbone_lr_multiplier_and_frozen_params_included(digits_config):
    cfg = _cfg(digits_config, optimizer="sgd", lr=0.01)
    model = Tiny()
    for p in model.backbone.parameters():  # finetune head: frozen now, unfrozen later without a rebuild
        p.requires_grad_(False)
    opt = build_optimizer(cfg, model)
    groups = _group_of(opt)
    for name, p in model.named_parameters():
        assert groups[id(p)]["lr"] == pytest.approx(0.001 if name.startswith("backbone.") else 0.01), name
    assert (
        opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["weight_decay"] == cfg.train.weight_decay
    )  # the head's


@pytest.mark.parametrize("pretrained, want", [(False, 3e-3), (True, 1e-3)])
def test_lr_auto_follows_pretrained(digits_config, pretrained, want):
    """train.lr: auto is 1e-3 fine-tuning pretrained weights and 3e-3 from scratch; the backbone
    multiplier still applies to it."""
    cfg = load_config(digits_config(train={"lr": "auto"}, model={"backbone_lr_mult": 0.5, "pretrained": pretrained}))
    model = Tiny()
    groups = _group_of(build_optimizer(cfg, model))
    for name, p in model.named_parameters():
        assert groups[id(p)]["lr"] == pytest.approx(want * (0.5 if name.startswith("backbone.") else 1.0)), name
    assert cfg.train.lr == "auto"  # resolved when the optimizer is built, hashed as written
    assert headline(cfg, (8, 8))["train.lr"] == want  # the TensorBoard hparams row gets the rate trained with


def test_optimizer_settings_kept_from_before_timm(digits_config):
    model = Tiny()
    sgd = build_optimizer(_cfg(digits_config, optimizer="sgd", momentum=0.9), model)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert sgd.defaults["fused"] is True  # fused kernels on CPU where torch has them
    plain = build_optimizer(_cfg(digits_config, optimizer="sgd", momentum=0.0), model)
    assert not plain.defaults["nesterov"] and plain.defaults["momentum"] == 0.0
    rms = build_optimizer(_cfg(digits_config, optimizer="rmsprop", momentum=0.5), model)
    assert type(rms) is torch.optim.RMSprop and rms.defaults["alpha"] == 0.99 and rms.defaults["momentum"] == 0.5
    for name in ("adam", "adamw"):
        assert build_optimizer(_cfg(digits_config, optimizer=name), model).defaults["fused"] is True


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_registered_optimizer_builds_and_steps(digits_config, name):
    model = Tiny()
    opt = build_optimizer(_cfg(digits_config, optimizer=name), model)
    before = model.head.weight.detach().clone()
    model(torch.randn(4, 1, 6, 6)).sum().backward()
    opt.step()
    assert not torch.equal(model.head.weight, before)


def test_adadelta_trains_a_tiny_model(digits_config):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(_cfg(digits_config, 1.0, optimizer="adadelta", lr=1.0, weight_decay=0.0), model)
    assert type(opt) is torch.optim.Adadelta
    x = torch.randn(48, 1, 6, 6)
    y = torch.bucketize(x.mean((1, 2, 3)), torch.tensor([-0.05, 0.05]))  # learnable: the image's mean brightness
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7  # 1.14 -> 0.63 (Adadelta starts with tiny steps)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_schedule_builds_and_resumes_exactly(digits_config, name):
    """A resumed fold loads the schedule's state_dict into a fresh one: the lr sequence goes on as uninterrupted."""
    cfg = _cfg(digits_config, scheduler=name, epochs=3, warmup_epochs=0.5, step_size=1)

    def fresh():
        opt = build_optimizer(cfg, Tiny())
        sched, per_step = build_scheduler(cfg, opt, steps_per_epoch=4)
        return opt, sched, per_step

    def step(opt, sched, per_step):
        opt.step()
        sched.step(1.0) if SCHEDULERS.get(name).on_metric else sched.step()
        return [g["lr"] for g in opt.param_groups]

    opt, sched, per_step = fresh()
    assert per_step == SCHEDULERS.get(name).per_step
    whole = [step(opt, sched, per_step) for _ in range(8)]
    opt, sched, _ = fresh()
    first = [step(opt, sched, per_step) for _ in range(3)]
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    opt, sched, _ = fresh()
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    assert first + [step(opt, sched, per_step) for _ in range(5)] == whole


def test_registered_optimizer_end_to_end(digits_config, request):
    path = digits_config(train={"optimizer": "nadamw", "epochs": 1, "max_steps_per_epoch": 3})
    with pytest.raises(PipelineError, match=r"train.optimizer: unknown optimizer 'nadamw'; did you mean"):
        load_config(path)
    built = []
    OPTIMIZERS.register(
        "nadamw", OptimizerSpec("nadamw", options=lambda t: built.append(t.optimizer) or {})
    )  # one line
    request.addfinalizer(lambda: OPTIMIZERS.unregister("nadamw"))
    cfg = load_config(path)
    run_fold(cfg)
    from pipeline.train.cv import train_cv

    assert train_cv(cfg, folds=[0]) is None  # one of three folds: no oof.csv yet
    assert built == ["nadamw"]
    hist = pd.read_csv("runs/comp/exp/fold_0/history.csv")
    assert hist["epoch"].tolist() == [1] and hist["train_loss"].notna().all()


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_with_every_scheduler(digits_config, opt_name, sched):
    """The whole product of the two registries builds and takes a step (one-cycle with Adadelta, which has no
    momentum to cycle, crashed before)."""
    cfg = _cfg(digits_config, optimizer=opt_name, scheduler=sched, lr=1.0 if opt_name == "adadelta" else 1e-3, epochs=2)
    model = Tiny()
    opt = build_optimizer(cfg, model)
    scheduler, per_step = build_scheduler(cfg, opt, 3)
    before = model.head.weight.detach().clone()
    model(torch.randn(4, 1, 6, 6)).sum().backward()
    opt.step()
    scheduler.step(1.0) if SCHEDULERS.get(sched).on_metric else scheduler.step()
    assert not torch.equal(model.head.weight, before)
