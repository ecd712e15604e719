"""Which backbone names exist, known without importing torch: ``load_config`` refuses a typo before any
stage touches a finished fold (a typo used to retrain, then fail).

timm's registry fills only as its model modules import torch (seconds per process), so its names, with
the pipeline's own (``simple_cnn``, ``bn_cnn``), are listed once per timm version into the cache and read
from there afterwards.
"""

from __future__ import annotations

import difflib
import json
from importlib.metadata import version

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, cache_dir

AUTO = "auto"


def known_backbones(*, fresh: bool = False) -> frozenset[str]:
    """Every name ``model.backbone`` may hold (without a pretrained tag such as ``.in1k``): the cached list,
    or (``fresh``, or no cache yet) timm's registry listed again."""
    path = cache_dir() / f"timm-models-{version('timm')}.json"
    if not fresh:
        try:
            names = json.loads(path.read_text())
            if isinstance(names, list) and names:
                return frozenset(names)
        except (OSError, ValueError):  # absent or damaged: list again
            pass
    import timm

    import pipeline.models.backbones  # noqa: F401 - registers simple_cnn and bn_cnn with timm

    names = sorted(timm.list_models())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, names)
    return frozenset(names)


def check_backbone(name: str, key: str) -> None:
    """One line for a name timm does not know; a name missing from the cache is looked up in timm's own
    registry before it is refused (a model registered since the cache was written)."""
    if name == AUTO:
        return
    base = name.split(".", 1)[0]
    if base in known_backbones():
        return
    names = known_backbones(fresh=True)
    if base in names:
        return
    close = difflib.get_close_matches(name, sorted(names), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
    raise PipelineError(f"{key}: timm does not know {name!r}{hint}")


def check_config(cfg) -> None:
    """The config's backbone names (``model.backbone``, ``adversarial.backbone``), each one line."""
    check_backbone(cfg.model.backbone, f"{cfg.path}: model.backbone")
    check_backbone(cfg.adversarial.backbone, f"{cfg.path}: adversarial.backbone")
