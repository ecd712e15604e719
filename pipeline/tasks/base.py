"""What a target kind owns; the one place that knows how one kind differs from another.

Every stage asks the run's task (``pipeline.tasks.build_task``) instead of branching on the number of
classes: the model's head width, the loss, the activation that turns logits into predictions, the
prediction columns, the metrics and calibrations that apply, the space TTA views and ensemble members
are averaged in, the report's curves, the second stage's features, and how a prediction becomes a
submission value. The kinds are the entries of ``TASKS`` (pipeline/config/registries.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch


class Task:
    """A target kind. Subclasses fill in every method; the attributes say what applies to the kind."""

    name: ClassVar[str] = ""
    # the spaces ``predict.average`` may name: where TTA views and ensemble members are averaged
    averages: ClassVar[tuple[str, ...]] = ()
    # the calibrations evaluate may fit and keep (pipeline/tasks/calibration.py)
    calibrations: ClassVar[tuple[str, ...]] = ()
    # the submission values ``encode`` makes (pipeline/data/sample.py reads which one a sample asks for)
    encodings: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # ---- the model and its training -------------------------------------------------------------

    def head_width(self, n_classes: int) -> int:
        raise NotImplementedError

    def loss(self, *, weight: torch.Tensor | None, label_smoothing: float) -> torch.nn.Module:
        """The training loss over a batch's (logits, integer targets)."""
        raise NotImplementedError

    def row_loss(
        self, logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None, label_smoothing: float
    ) -> torch.Tensor:
        """Each row's loss against a target of the same shape as the logits (soft labels, pseudo-labels)."""
        raise NotImplementedError

    def auto_label_smoothing(self, metric: str) -> float:
        """``train.label_smoothing: auto`` for this kind and the competition's metric."""
        raise NotImplementedError

    # ---- predictions ----------------------------------------------------------------------------

    def activate(self, logits: np.ndarray) -> np.ndarray:
        """Logits -> the predictions the files hold."""
        raise NotImplementedError

    def columns(self, class_names: list[str]) -> list[str]:
        """The prediction columns of oof.csv and test_pred.csv, after id (and fold, target)."""
        return [f"p_{c}" for c in class_names]

    def encode(self, probs: np.ndarray, class_names: list[str], how: str) -> np.ndarray:
        """A submission column's values: ``probability`` (of the positive class), ``index`` or ``name``."""
        raise NotImplementedError
