"""What every format reader shares: checks at the boundary and the submission frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.options import DataOptions
from pipeline.core.errors import PipelineError
from pipeline.data.table import Table


class Reader:
    """Subclasses set ``submission_columns`` and implement ``_read(split) -> Table``; ``Options``
    is the model of their ``data:`` section (checked when the config loads)."""

    Options: type[DataOptions] = DataOptions

    submission_columns: tuple[str, str] = ("id", "label")
    # "probability" (binary: P(class 1)), "index" (class index) or "name" (class name)
    submission_kind: str = "name"

    def __init__(self, cfg):
        self.cfg = cfg
        self.dir = cfg.data_dir

    def path(self, name: str) -> Path:
        p = self.dir / name
        if not p.exists():
            raise PipelineError(f"{p}: file not found (data.dir is {self.cfg.data.dir})")
        return p

    def read(self, split: str) -> Table:
        if split not in ("train", "test"):
            raise ValueError(split)
        if "auto" in (
            self.cfg.data.image_size,
            self.cfg.data.channels,
        ):  # a caller skipped the plan: a bug, not bad input
            raise ValueError(
                "data.image_size/channels is auto: resolve the config with pipeline.plan.store.planned(cfg) first"
            )
        t = self._read(split)
        where = getattr(self, "source", None) or self.dir
        if len(t) == 0:
            raise PipelineError(f"{where}: the {split} set is empty; expected at least one row")
        ids = pd.Series(t.ids)
        blank = ids.map(_blank_id).to_numpy(bool)
        if blank.any():
            row = int(np.flatnonzero(blank)[0])
            raise PipelineError(
                f"{where}: row {row} has an empty id ({ids.iloc[row]!r}); expected a non-empty id in every row"
            )
        dup = ids[ids.duplicated()]
        if len(dup):
            raise PipelineError(f"{where}: duplicate id {dup.iloc[0]!r} ({len(dup)} duplicates); expected unique ids")
        if t.images.dtype.kind == "f":
            finite = np.isfinite(t.images.reshape(len(t), -1)).all(axis=1)
            if not finite.all():
                bad = int(np.flatnonzero(~finite)[0])
                raise PipelineError(f"{where}: id {t.ids[bad]!r} has NaN or inf pixels; expected finite numbers")
        if split == "train" and t.labels is None:
            raise PipelineError(f"{where}: training data has no labels")
        if split == "train":  # a sample submission that fits no target is refused before anything is written
            self.submission_spec(t.class_names)
        return t

    def native_size(self) -> int | None:
        """The side of the training images as the files hold them (the smaller side when not square,
        the most common one when the files differ), for ``data.image_size: auto``; None: read the
        training table at its own size to tell."""
        return None

    def _read(self, split: str) -> Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def submission_spec(self, class_names: list[str]):
        """The submission's columns, ids and encoding: the competition's sample file, else this format's."""
        from pipeline.data.sample import submission_spec

        return submission_spec(self, list(class_names))

    def submission_frame(self, ids, probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
        """Turn (N, K) class probabilities into the competition's submission columns (the task encodes them)."""
        from pipeline.tasks import build_task

        spec = self.submission_spec(class_names)
        return spec.frame(ids, np.asarray(probs), list(class_names), build_task(len(class_names)).encode)


def _blank_id(x) -> bool:
    """None, NaN or a text of only spaces: no row of a submission can be matched to it."""
    return x is None or (isinstance(x, float) and x != x) or (isinstance(x, str) and not x.strip())
