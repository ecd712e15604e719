"""Which backbone names exist: checked before training touches a finished fold (a typo used to unfinish a
finished fold, then fail). timm's registry fills only as its model modules import torch, so the check runs
where training imports them anyway (``pipeline.train.cv.train_cv``), not when a config loads."""

from __future__ import annotations

import difflib

from pipeline.core.errors import PipelineError

AUTO = "auto"


def check_backbone(name: str, key: str) -> None:
    """One line for a name timm does not know (a pretrained tag such as ``.in1k`` is allowed)."""
    if name == AUTO:
        return
    import timm

    import pipeline.models.backbones  # noqa: F401 - registers simple_cnn and bn_cnn with timm

    if timm.is_model(name.split(".", 1)[0]):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
    raise PipelineError(f"{key}: timm does not know {name!r}{hint}")


def check_config(cfg) -> None:
    """The config's backbone names (``model.backbone``, ``adversarial.backbone``), each one line."""
    check_backbone(cfg.model.backbone, f"{cfg.path}: model.backbone")
    check_backbone(cfg.adversarial.backbone, f"{cfg.path}: adversarial.backbone")
