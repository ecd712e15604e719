"""Statoil/C-CORE iceberg challenge: train.json / test.json with two 75x75 dB bands."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from pydantic import field_validator

from ..errors import PipelineError
from ..table import Table
from .base import Reader
from .options import DataOptions, ImageSpec

SIDE = 75
N_PIX = SIDE * SIDE
VALUE_RANGE = (-50.0, 50.0)  # dB


class StatoilOptions(DataOptions):
    @field_validator("image_size")
    @classmethod
    def _native_size(cls, v):
        if v not in (None, SIDE):
            raise ValueError(f"{v}; statoil_json images are {SIDE}x{SIDE} (set model.input_size to feed the model another size)")
        return v

    @field_validator("channels")
    @classmethod
    def _bands(cls, v):
        if v not in (None, 2, 3):
            raise ValueError(f"{v}; expected 2 (band_1, band_2) or 3 (band_1, band_2 and their mean, for RGB-shaped backbones)")
        return v

    def image_spec(self) -> ImageSpec:
        return ImageSpec(VALUE_RANGE, self.channels or 2, (SIDE, SIDE))


class StatoilJson(Reader):
    Options = StatoilOptions
    submission_columns = ("id", "is_iceberg")
    submission_kind = "probability"
    class_names = ["ship", "iceberg"]

    def _read(self, split: str) -> Table:
        d = self.cfg.data
        path = self.path(f"{split}.json")
        self.source = path
        try:
            with open(path) as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}: malformed or truncated JSON at line {e.lineno} column {e.colno} ({e.msg}); expected a JSON list of records") from None
        except UnicodeDecodeError:
            raise PipelineError(f"{path}: not a text JSON file; expected a JSON list of records") from None
        if not isinstance(records, list):
            raise PipelineError(f"{path}: top level is a {type(records).__name__}; expected a JSON list of records")
        n = len(records)
        images = np.empty((n, 2, SIDE, SIDE), np.float32)
        angles = np.empty(n, np.float64)
        labels = np.empty(n, np.int64) if split == "train" else None
        ids = []
        for i, rec in enumerate(records):
            where = f"{path}: record {i}"
            if not isinstance(rec, dict):
                raise PipelineError(f"{where}: is a {type(rec).__name__}; expected an object with id, band_1, band_2, inc_angle")
            rid = rec.get("id")
            if rid is None:
                raise PipelineError(f"{where}: missing 'id'")
            where = f"{path}: id {rid!r}"
            ids.append(str(rid))
            for b in (0, 1):
                key = f"band_{b + 1}"
                band = rec.get(key)
                if not isinstance(band, list):
                    raise PipelineError(f"{where}: missing or non-list '{key}'; expected {N_PIX} floats (75x75 dB)")
                if len(band) != N_PIX:
                    raise PipelineError(f"{where}: {key} has {len(band)} values; expected {N_PIX} (75x75)")
                try:
                    arr = np.asarray(band, dtype=np.float32)
                except (TypeError, ValueError):
                    raise PipelineError(f"{where}: {key} has non-numeric values; expected {N_PIX} floats") from None
                if not np.isfinite(arr).all():
                    raise PipelineError(f"{where}: {key} has NaN or inf pixels; expected finite dB values")
                images[i, b] = arr.reshape(SIDE, SIDE)
            angles[i] = _angle(rec.get("inc_angle", "na"), where)
            if labels is not None:
                if "is_iceberg" not in rec:
                    raise PipelineError(f"{where}: missing 'is_iceberg'; expected the label 0 or 1 in every train record")
                y = rec.get("is_iceberg")
                if y not in (0, 1) or isinstance(y, bool):
                    raise PipelineError(f"{where}: is_iceberg is {y!r}; expected 0 or 1")
                labels[i] = y
        if d.channels == 3:  # a third band, (band_1 + band_2) / 2, as iceberg kernels fed RGB models
            images = np.concatenate([images, images.mean(1, keepdims=True)], 1)
        missing = np.isnan(angles)
        features = np.stack([angles, missing.astype(np.float64)], 1).astype(np.float32)
        return Table(
            ids=np.asarray(ids, dtype=object),
            images=images,
            class_names=list(self.class_names),
            labels=labels,
            features=features,
            feature_names=["inc_angle", "inc_angle_missing"],
            meta=pd.DataFrame({"inc_angle": angles}),
            value_range=VALUE_RANGE,
        )


def _angle(value, where: str) -> float:
    """A float angle, or NaN for Kaggle's "na"."""
    if value == "na" or value is None:
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise PipelineError(f"{where}: inc_angle is {value!r}; expected a finite number or \"na\"")
        return float(value)
    if isinstance(value, str):
        try:
            v = float(value)
            if math.isfinite(v):
                return v
        except ValueError:
            pass
    raise PipelineError(f"{where}: inc_angle is {value!r}; expected a number or \"na\"")
