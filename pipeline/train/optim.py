"""Optimizers and learning-rate schedules: the entries of the registries ``OPTIMIZERS`` and
``SCHEDULERS`` (pipeline/config/registries.py), one ``build_*`` each.

Optimizers come from timm's factory (``timm.optim.create_optimizer_v2``), fed our parameter
groups: the head at ``train.lr`` (``auto``: pipeline/config/auto.py) and the ``backbone.*`` parameters at ``train.lr x
model.backbone_lr_mult`` (discriminative LR), each split into decayed weights and undecayed biases
and norm weights (1-d parameters, and the backbone's ``no_weight_decay()`` names), as timm's own
grouping does. Frozen parameters are included (timm's grouping skips them) so gradual unfreezing
needs no rebuild. Adding an optimizer timm knows is one line::

    OPTIMIZERS.register("nadamw", OptimizerSpec("nadamw"))        # timm's name, or
    OPTIMIZERS.register("lamb", OptimizerSpec("lamb", options=lambda t: {"betas": (0.9, 0.99)}))

Schedules are built here by hand (timm has no one-cycle, and a resumed fold replays exactly from
the LambdaLR / OneCycleLR ``state_dict``). torch and timm are imported only when something is
built, so ``load_config`` checks the names against these registries without them.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config.registries import OPTIMIZERS, SCHEDULERS


def _no_options(t) -> dict:
    return {}


@dataclass(frozen=True)
class OptimizerSpec:
    timm_name: str  # a name timm.optim.create_optimizer_v2 knows (timm.optim.list_optimizers())
    options: Callable[[Any], dict] = _no_options  # train config section -> extra keyword arguments
    # torch has a fused kernel for it on CPU and CUDA: one kernel per step instead of ~6 ops per
    # tensor, ~5% faster steps for tf_efficientnet_lite0 on 2 CPU cores; deterministic
    fused: bool = False


# the built-in entries of OPTIMIZERS (pipeline/config/registries.py)
SGD = OptimizerSpec("sgd", lambda t: {"momentum": t.momentum, "nesterov": t.momentum > 0}, fused=True)
ADAM = OptimizerSpec("adam", fused=True)
ADAMW = OptimizerSpec("adamw", fused=True)
RMSPROP = OptimizerSpec("rmsprop", lambda t: {"momentum": t.momentum, "alpha": 0.99})  # torch's alpha (timm's is 0.9)
ADADELTA = OptimizerSpec("adadelta")


def param_groups(model, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
    """Head then backbone groups, decayed weights before undecayed ones; empty groups left out."""
    backbone = getattr(model, "backbone", None)
    no_decay = [f"backbone.{n}" for n in getattr(backbone, "no_weight_decay", lambda: ())()]
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        part = "backbone" if name.startswith("backbone.") else "head"
        decay = not (p.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, pat) for pat in no_decay))
        groups.setdefault((part, decay), []).append(p)
    return [
        {
            "params": groups[key],
            "lr": lr * (backbone_lr_mult if key[0] == "backbone" else 1.0),
            "weight_decay": weight_decay if key[1] else 0.0,
        }
        for key in (("head", True), ("head", False), ("backbone", True), ("backbone", False))
        if key in groups
    ]


def build_optimizer(cfg, model):
    """The configured optimizer over ``param_groups`` (``param_groups[0]`` is the head's lr)."""
    from timm.optim import create_optimizer_v2

    from pipeline.config.auto import resolve_lr

    t, lr = cfg.train, resolve_lr(cfg)
    spec = OPTIMIZERS.get(t.optimizer)
    groups = param_groups(model, lr, t.weight_decay, cfg.model.backbone_lr_mult)
    fused = {"fused": True} if spec.fused and next(model.parameters()).device.type in ("cpu", "cuda") else {}
    return create_optimizer_v2(
        model,
        opt=spec.timm_name,
        lr=lr,
        weight_decay=t.weight_decay,
        param_group_fn=lambda m: groups,
        **spec.options(t),
        **fused,
    )


# ---- schedules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerSpec:
    build: Callable[[Any, Any, int], Any]  # (train config section, optimizer, optimizer steps per epoch)
    per_step: bool  # stepped after every optimizer step, else once per epoch
    on_metric: bool = False  # stepped with the epoch's validation loss (ReduceLROnPlateau)


def _cosine(t, opt, steps_per_epoch: int):
    import torch

    total, warm = t.epochs * steps_per_epoch, int(t.warmup_epochs * steps_per_epoch)

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _onecycle(t, opt, steps_per_epoch: int):
    import torch

    total, warm = max(t.epochs * steps_per_epoch, 4), int(t.warmup_epochs * steps_per_epoch)
    # warm-up share of the run; at least 2 steps each way (OneCycleLR divides by both phases)
    pct = min(max(warm / total if warm else 0.3, 2 / total), 1 - 2 / total)
    # it cycles momentum (or Adam's beta1) against the learning rate; an optimizer with neither (Adadelta) keeps its own
    cycle = all("momentum" in g or "betas" in g for g in opt.param_groups)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, pct_start=pct, cycle_momentum=cycle
    )


def _step(t, opt, steps_per_epoch: int):
    import torch

    return torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.gamma)


def _plateau(t, opt, steps_per_epoch: int):
    import torch

    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=t.gamma, patience=max(1, t.patience // 2))


def _constant(t, opt, steps_per_epoch: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


# the built-in entries of SCHEDULERS (pipeline/config/registries.py)
COSINE = SchedulerSpec(_cosine, per_step=True)
ONECYCLE = SchedulerSpec(_onecycle, per_step=True)
STEP = SchedulerSpec(_step, per_step=False)
PLATEAU = SchedulerSpec(_plateau, per_step=False, on_metric=True)
NONE = SchedulerSpec(_constant, per_step=True)


def build_scheduler(cfg, opt, steps_per_epoch: int):
    """Returns (scheduler, per_step). Cosine and one-cycle step per batch, the others per epoch."""
    spec = SCHEDULERS.get(cfg.train.scheduler)
    return spec.build(cfg.train, opt, steps_per_epoch), spec.per_step
