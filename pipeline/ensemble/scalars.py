"""Per-image scalar features for a second stage over the members' predictions (``method: gbm``).

One owner, so a benchmark or a notebook computes the same columns the ensemble fits on:

- statoil_json (SAR, two dB bands): the table's own ``inc_angle`` (NaN when Kaggle wrote "na", left
  as NaN: LightGBM routes missing values itself) and ``inc_angle_missing``, per band min, max, mean
  and std, and ``band_mean_diff`` (band_1 mean - band_2 mean). The iceberg winners' table features:
  the missing angle marks a ship-heavy acquisition batch, and the band contrast separates ice from
  metal.
- every other format (pixel_csv, image_folder, ...): the table's own scalar features if it has any,
  then per channel mean and std, in the pixels' own scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.config.schema import Config
    from pipeline.data.table import Table

SAR_FORMATS = ("statoil_json",)
CHUNK = 1024  # rows per float32 copy: a memmapped folder table is never converted whole


def _channel_stats(images: np.ndarray, stats: tuple[str, ...]) -> np.ndarray:
    """(N, C, H, W) -> (N, C, len(stats)) in float64."""
    fns = {"min": np.min, "max": np.max, "mean": np.mean, "std": np.std}
    out = []
    for s in range(0, len(images), CHUNK):
        flat = np.asarray(images[s : s + CHUNK], dtype=np.float64).reshape(
            min(CHUNK, len(images) - s), images.shape[1], -1
        )
        out.append(np.stack([fns[name](flat, axis=2) for name in stats], -1))
    return np.concatenate(out)


def table_scalars(table: Table, fmt: str) -> tuple[np.ndarray, list[str]]:
    """(N, F) float64 scalar features of ``table`` read by format ``fmt``, and their names."""
    parts, names = [], []
    if table.features is not None:
        parts.append(np.asarray(table.features, dtype=np.float64))
        names += list(table.feature_names)
    if fmt in SAR_FORMATS:
        stats = ("min", "max", "mean", "std")
        bands = _channel_stats(table.images[:, :2], stats)  # a third channel is the bands' mean: derived, left out
        for b in range(bands.shape[1]):
            parts.append(bands[:, b])
            names += [f"band_{b + 1}_{s}" for s in stats]
        parts.append((bands[:, 0, 2] - bands[:, 1, 2])[:, None])
        names.append("band_mean_diff")
    else:
        stats = ("mean", "std")
        ch = _channel_stats(table.images, stats)
        for c in range(ch.shape[1]):
            parts.append(ch[:, c])
            names += [f"c{c}_{s}" for s in stats]
    return np.concatenate(parts, 1), names


def scalars_for(cfg: Config, split: str, ids) -> tuple[np.ndarray, list[str]]:
    """The split's scalar features (``table_scalars``) in the row order of ``ids`` (e.g. an OOF file's);
    an id the data does not hold is one line naming it."""
    import pandas as pd

    from pipeline.data.formats import read_table

    table = read_table(cfg, split)
    x, names = table_scalars(table, cfg.data.format)
    pos = pd.Index(table.ids.astype(str)).get_indexer(pd.Index(np.asarray(ids).astype(str)))
    if (pos < 0).any():
        missing = [str(i) for i in np.asarray(ids)[pos < 0]]
        raise PipelineError(
            f"{cfg.data.dir}: the {split} data has no row for id {missing[0]!r} ({len(missing)} ids missing) "
            f"that the predictions name; expected predictions of this data"
        )
    return x[pos], names
