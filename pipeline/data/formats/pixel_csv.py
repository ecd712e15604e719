"""Digit-recognizer style CSVs: train.csv (label,pixel0..) and test.csv (pixel0..)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from pydantic import field_validator

from pipeline.config.options import DataOptions, ImageSpec
from pipeline.core.errors import PipelineError
from pipeline.data.formats.base import Reader
from pipeline.data.table import Table

VALUE_RANGE = (0.0, 255.0)  # uint8 grey levels


class PixelCsvOptions(DataOptions):
    @field_validator("channels")
    @classmethod
    def _grey(cls, v):
        if v not in (None, 1, "auto"):
            raise ValueError(f"{v}; pixel_csv images are grey (1 channel); expected 1, null or auto")
        return v

    def image_spec(self) -> ImageSpec:
        return super().image_spec()._replace(value_range=VALUE_RANGE, channels=1)


class PixelCsv(Reader):
    Options = PixelCsvOptions
    submission_columns = ("ImageId", "Label")
    submission_kind = "name"

    def _read(self, split: str) -> Table:
        path = self.path(f"{split}.csv")
        self.source = path
        try:
            df = pd.read_csv(path, low_memory=False)  # one dtype per column, however corrupt a row
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise PipelineError(
                f"{path}: cannot parse CSV ({str(e).splitlines()[0]}); expected a header and one row per image"
            ) from None
        labels_raw = None
        if split == "train":
            if "label" not in df.columns:
                raise PipelineError(f"{path}: missing column 'label'; expected columns label,pixel0..pixelN")
            labels_raw = df.pop("label")
        pix = [c for c in df.columns if str(c).startswith("pixel")]
        if len(pix) != len(df.columns):
            other = [c for c in df.columns if c not in pix]
            raise PipelineError(
                f"{path}: unexpected column {other[0]!r}; "
                f"expected only {'label, ' if split == 'train' else ''}pixel0..pixelN"
            )
        side = math.isqrt(len(pix))
        if side * side != len(pix) or side == 0:
            raise PipelineError(
                f"{path}: {len(pix)} pixel columns is not a square image; expected side*side columns (784 for 28x28)"
            )
        expect = [f"pixel{i}" for i in range(len(pix))]
        if pix != expect:
            bad = next(a for a, b in zip(pix, expect) if a != b)
            raise PipelineError(f"{path}: column {bad!r} out of order; expected pixel0..pixel{len(pix) - 1}")
        self._check_side(path, split, side)
        if len(df) == 0:  # a header-only file reads back with object columns
            raise PipelineError(f"{path}: the {split} set is empty; expected at least one row")
        values = df.to_numpy()
        if values.dtype.kind not in "iuf":
            row = int(np.flatnonzero(df.apply(pd.to_numeric, errors="coerce").isna().any(axis=1))[0])
            raise PipelineError(f"{path}: row {row + 1} has a non-numeric pixel; expected integers 0..255")
        bad = ~np.isfinite(values).all(1) | (values < 0).any(1) | (values > 255).any(1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise PipelineError(
                f"{path}: row {row + 1} has a pixel that is missing or outside 0..255; expected integers 0..255"
            )
        fraction = (values != np.round(values)).any(1)  # 12.0 is an integer, 12.7 is not (never truncated)
        if fraction.any():
            row = int(np.flatnonzero(fraction)[0])
            col = int(np.flatnonzero(values[row] != np.round(values[row]))[0])
            raise PipelineError(
                f"{path}: row {row + 1} has pixel{col} = {values[row, col]!r}, not an integer; expected integers 0..255"
            )
        images = values.astype(np.uint8).reshape(-1, 1, side, side)
        size = self.cfg.data.image_size
        if size and size != side:
            images = _resize(images, size)
        # Kaggle's ImageId is the row number from 1; train rows get the same scheme.
        ids = np.asarray([str(i + 1) for i in range(len(df))], dtype=object)
        labels, class_names = None, self._class_names(labels_raw, path) if labels_raw is not None else None
        if labels_raw is not None:
            labels = np.searchsorted(np.asarray(class_names, dtype=np.int64), labels_raw.to_numpy()).astype(np.int64)
        else:
            class_names = self._train_class_names()
        return Table(ids=ids, images=images, class_names=class_names, labels=labels, value_range=VALUE_RANGE)

    def _class_names(self, labels: pd.Series, path) -> list[str]:
        # a true/false column is not a class number, nor inf or 1e300 (no int64 holds them)
        num = (
            pd.to_numeric(labels, errors="coerce").astype(np.float64)
            if labels.dtype != bool
            else pd.Series(np.nan, index=labels.index)
        )
        bad = num.isna() | ~np.isfinite(num) | (num != num.round()) | (num.abs() >= 2.0**63)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            v = labels.iloc[row]
            raise PipelineError(
                f"{path}: row {row + 1} has label {v.item() if hasattr(v, 'item') else v!r}; expected an integer class"
            )
        return [str(v) for v in sorted(num.astype(np.int64).unique())]

    def _train_class_names(self) -> list[str]:
        path = self.path("train.csv")
        try:
            labels = pd.read_csv(path, usecols=["label"])["label"]
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
            raise PipelineError(
                f"{path}: cannot read its label column ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                f"expected columns label,pixel0..pixelN"
            ) from None
        return self._class_names(labels, path)

    def _check_side(self, path, split, side):
        other = "test" if split == "train" else "train"
        p = self.dir / f"{other}.csv"
        if p.exists():
            try:
                cols = pd.read_csv(p, nrows=0).columns
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
                raise PipelineError(
                    f"{p}: cannot parse CSV ({str(e).splitlines()[0]}); expected a header and one row per image"
                ) from None
            n = sum(str(c).startswith("pixel") for c in cols)
            if n != side * side:
                raise PipelineError(
                    f"{path}: images are {side}x{side} but {p.name} has {n} pixel columns; "
                    "expected train and test of the same size"
                )


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(images).float()
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()
