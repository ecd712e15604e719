"""The target kind of a competition: one owner per kind (``pipeline.tasks.base.Task``), one factory."""

from __future__ import annotations

from pipeline.config.registries import TASKS
from pipeline.tasks.base import Task


def build_task(n_classes: int, kind: str | None = None) -> Task:
    """The task of a run whose labels have ``n_classes`` classes: ``kind`` when given (a ``TASKS`` name),
    else ``binary`` for two classes and ``multiclass`` for more."""
    return TASKS.get(kind or ("binary" if n_classes == 2 else "multiclass"))
