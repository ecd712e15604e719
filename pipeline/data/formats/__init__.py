"""Competition data formats: files on disk -> ``Table``.

Each format is an entry of the registry ``FORMATS`` (pipeline/config/registries.py): a reader class
(a ``base.Reader``) with ``read(split)`` for split in {"train", "test"}, ``submission_columns`` and
``Options``, the pydantic model its ``data:`` section is validated against when the config loads
(``pipeline.config.options.DataOptions`` plus the format's own keys and rules). ``build_reader(cfg)``
is the one factory. A new format is a class and one line::

    FORMATS.register("my_csv", MyCsv)          # or FORMATS.register_lazy("my_csv", "my_pkg.formats:MyCsv")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config.registries import FORMATS

if TYPE_CHECKING:
    from pipeline.config.options import DataOptions
    from pipeline.config.schema import Config
    from pipeline.data.table import Table


def options_model(name: str) -> type[DataOptions]:
    """The model a ``data:`` section of format ``name`` is validated against."""
    return FORMATS.get(name).Options


def build_reader(cfg: Config):
    return FORMATS.get(cfg.data.format)(cfg)


def read_table(cfg: Config, split: str) -> Table:
    return build_reader(cfg).read(split)
