"""Registry of competition data formats: files on disk -> ``Table``.

Each format module registers a reader class with ``read(cfg, split)`` for split in
{"train", "test"} and ``submission_columns``; ``build_reader(cfg)`` is the one factory.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..table import Table

# name -> "module:Class", imported lazily so `pipeline --help` stays fast.
FORMATS = {
    "statoil_json": "statoil_json:StatoilJson",
    "pixel_csv": "pixel_csv:PixelCsv",
    "image_folder": "image_folder:ImageFolder",
}


def build_reader(cfg: "Config"):
    import importlib

    mod, cls = FORMATS[cfg.data.format].split(":")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)(cfg)


def read_table(cfg: "Config", split: str) -> "Table":
    return build_reader(cfg).read(split)
