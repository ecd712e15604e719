"""The in-memory table every data format produces and every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Table:
    """One split of a competition.

    ids:        (N,) str, unique
    images:     (N, C, H, W) compact dtype (uint8 for photos/digits, float16/32 for SAR),
                converted to float per batch; may be a numpy memmap
    features:   (N, F) float32 scalar features (NaN never: missing values are imputed
                and flagged by the reader), or None
    labels:     (N,) int64 class indices, or None for a test split
    class_names: label names in class-index order
    meta:       per-row raw columns (e.g. the raw ``inc_angle`` with NaN) for grouping
    value_range: (lo, hi) of the pixel scale, used to normalise and to map augmentations
    sample_weights: (N,) float32 loss weight per row, or None (1 each); set for pseudo-labelled rows
    soft_targets: (N, K) float32 training target per row, or None (one-hot of labels)
    """

    ids: np.ndarray
    images: np.ndarray
    class_names: list[str]
    labels: np.ndarray | None = None
    features: np.ndarray | None = None
    feature_names: list[str] = field(default_factory=list)
    meta: pd.DataFrame | None = None
    value_range: tuple[float, float] = (0.0, 255.0)
    sample_weights: np.ndarray | None = None
    soft_targets: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.ids)
        assert self.images.ndim == 4 and len(self.images) == n, (self.images.shape, n)
        if self.labels is not None:
            assert len(self.labels) == n
        if self.sample_weights is not None:
            assert self.sample_weights.shape == (n,)
        if self.soft_targets is not None:
            assert self.soft_targets.shape == (n, len(self.class_names))
        if self.features is not None:
            assert self.features.shape == (n, len(self.feature_names))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
