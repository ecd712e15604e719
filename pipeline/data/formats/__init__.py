"""Registry of competition data formats: files on disk -> ``Table``.

Each format registers a reader class (a ``base.Reader``) with ``read(split)`` for split in
{"train", "test"}, ``submission_columns`` and ``Options``, the pydantic model its ``data:``
section is validated against when the config loads (``options.DataOptions`` plus the format's own
keys and rules). ``build_reader(cfg)`` is the one factory. A new format is a class and one line::

    register_format("my_csv", MyCsv)          # or "module:Class" under pipeline/formats/
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config.schema import Config
    from pipeline.data.table import Table
    from pipeline.config.options import DataOptions

# name -> reader class, or "module:Class" imported when first used so `pipeline --help` stays fast.
FORMATS: dict[str, str | type] = {
    "statoil_json": "statoil_json:StatoilJson",
    "pixel_csv": "pixel_csv:PixelCsv",
    "image_folder": "image_folder:ImageFolder",
}


def register_format(name: str, reader: str | type) -> None:
    """Add (or replace) a format; ``data.format: <name>`` is accepted from then on."""
    FORMATS[name] = reader


def reader_class(name: str) -> type:
    entry = FORMATS[name]
    if isinstance(entry, str):
        mod, cls = entry.split(":")
        entry = FORMATS[name] = getattr(importlib.import_module(f"{__name__}.{mod}"), cls)
    return entry


def options_model(name: str) -> type["DataOptions"]:
    """The model a ``data:`` section of format ``name`` is validated against."""
    return reader_class(name).Options


def build_reader(cfg: "Config"):
    return reader_class(cfg.data.format)(cfg)


def read_table(cfg: "Config", split: str) -> "Table":
    return build_reader(cfg).read(split)
