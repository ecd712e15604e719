"""Statoil/C-CORE iceberg challenge: train.json / test.json with two 75x75 dB bands."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from pydantic import field_validator

from pipeline.config.options import DataOptions, ImageSpec
from pipeline.core.errors import PipelineError
from pipeline.data.formats.base import Reader
from pipeline.data.table import Table

SIDE = 75
N_PIX = SIDE * SIDE
VALUE_RANGE = (-50.0, 50.0)  # dB


class StatoilOptions(DataOptions):
    @field_validator("image_size")
    @classmethod
    def _native_size(cls, v):
        if v not in (None, SIDE, "auto"):
            raise ValueError(
                f"{v}; statoil_json images are {SIDE}x{SIDE} (set model.input_size to feed the model another size)"
            )
        return v

    @field_validator("channels")
    @classmethod
    def _bands(cls, v):
        if v not in (None, 2, 3, "auto"):
            raise ValueError(
                f"{v}; expected 2 (band_1, band_2) or 3 (band_1, band_2 and their mean, for RGB-shaped backbones)"
            )
        return v

    def image_spec(self) -> ImageSpec:
        return ImageSpec(VALUE_RANGE, self.channels if isinstance(self.channels, int) else 2, (SIDE, SIDE))


class StatoilJson(Reader):
    def native_size(self) -> int:
        return SIDE

    Options = StatoilOptions
    submission_columns = ("id", "is_iceberg")
    submission_kind = "probability"
    class_names = ["ship", "iceberg"]

    def _read(self, split: str) -> Table:
        d = self.cfg.data
        path = self.path(f"{split}.json")
        self.source = path
        records = _load_records(path)
        n = len(records)
        images = np.empty((n, 2, SIDE, SIDE), np.float32)
        angles = np.empty(n, np.float64)
        labels = np.empty(n, np.int64) if split == "train" else None
        ids = []
        for i, rec in enumerate(records):
            where = f"{path}: record {i}"
            if not isinstance(rec, dict):
                raise PipelineError(
                    f"{where}: is a {type(rec).__name__}; expected an object with id, band_1, band_2, inc_angle"
                )
            rid = _record_id(rec, where)
            where = f"{path}: id {rid!r}"
            ids.append(rid)
            for b in (0, 1):
                images[i, b] = _band(rec, f"band_{b + 1}", where)
            angles[i] = _angle(rec.get("inc_angle", "na"), where)
            if labels is not None:
                if "is_iceberg" not in rec:
                    raise PipelineError(
                        f"{where}: missing 'is_iceberg'; expected the label 0 or 1 in every train record"
                    )
                y = rec.get("is_iceberg")
                if y not in (0, 1) or isinstance(y, bool):
                    raise PipelineError(f"{where}: is_iceberg is {_show(y)}; expected 0 or 1")
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


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """json.load keeps the last of a key given twice; a record with two ``band_1`` is an error."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def _load_records(path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise PipelineError(
            f"{path}: malformed or truncated JSON at line {e.lineno} column {e.colno} ({e.msg}); "
            "expected a JSON list of records"
        ) from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not a text JSON file; expected a JSON list of records") from None
    except _DuplicateKey as e:
        raise PipelineError(f"{path}: a record gives key {e.args[0]!r} twice; expected each key once") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting too deep
        raise PipelineError(
            f"{path}: not readable as JSON ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
            "expected a JSON list of records"
        ) from None
    if not isinstance(records, list):
        raise PipelineError(f"{path}: top level is a {type(records).__name__}; expected a JSON list of records")
    return records


def _record_id(rec: dict, where: str) -> str:
    """The record's id: a non-blank string (it is written back into the submission as is)."""
    if "id" not in rec or rec["id"] is None:
        raise PipelineError(f"{where}: missing 'id'")
    rid = rec["id"]
    if not isinstance(rid, str):
        raise PipelineError(f'{where}: id is {_show(rid)} ({type(rid).__name__}); expected a string like "dfd5f913"')
    if not rid.strip():
        raise PipelineError(f"{where}: id {rid!r} is blank; expected a non-empty string")
    if not rid.isprintable():
        raise PipelineError(f"{where}: id {rid!r} holds a control character; expected printable text")
    return rid


_NUMBER = (int, float)


def _show(v) -> str:
    """A value as a message shows it: its repr, cut short (a 400-digit number, a whole list)."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _band(rec: dict, key: str, where: str) -> np.ndarray:
    """One 75x75 band: a flat list of 5,625 plain numbers (no booleans, texts or nested lists)."""
    band = rec.get(key)
    if not isinstance(band, list):
        raise PipelineError(f"{where}: missing or non-list '{key}'; expected {N_PIX} floats (75x75 dB)")
    if len(band) != N_PIX:
        raise PipelineError(f"{where}: {key} has {len(band)} values; expected {N_PIX} (75x75)")
    kinds = set(map(type, band))  # C speed; a bool is not an int here, nor a list a number
    if not kinds <= {float, int}:
        odd = next(v for v in band if type(v) not in (float, int))
        raise PipelineError(f"{where}: {key} has non-numeric values (e.g. {_show(odd)}); expected {N_PIX} floats")
    try:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
            arr = np.asarray(band, dtype=np.float32)
    except OverflowError:  # an integer beyond float range
        arr = np.full(N_PIX, np.inf, np.float32)
    if not np.isfinite(arr).all():
        raise PipelineError(f"{where}: {key} has NaN or inf pixels; expected finite dB values")
    return arr.reshape(SIDE, SIDE)


def _angle(value, where: str) -> float:
    """The incidence angle in degrees (0..90), or NaN for Kaggle's "na" (or null)."""
    if value == "na" or value is None:
        return math.nan
    if isinstance(value, _NUMBER) and not isinstance(value, bool):
        try:
            v = float(value)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v):
            raise PipelineError(f'{where}: inc_angle is {_show(value)}; expected a finite number or "na"')
        if not 0 <= v <= 90:
            raise PipelineError(f'{where}: inc_angle is {_show(value)}; expected degrees between 0 and 90, or "na"')
        return v
    raise PipelineError(f'{where}: inc_angle is {_show(value)}; expected a number or "na"')
