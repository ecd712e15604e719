"""The ``data:`` section: keys every format shares, and the base each reader's ``Options`` extends.

The config validates ``data:`` against the options model of the reader registered under
``data.format`` (a union keyed on ``data.format``, read from the live ``FORMATS`` registry), so a
format's own rules (statoil_json's fixed 75x75 size, image_folder's 1 or 3 channels) fail when the
config loads, not while the files are read. A format with keys of its own adds fields::

    class Options(DataOptions):
        sheet: str = "train"
"""
from __future__ import annotations

from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field


class ImageSpec(NamedTuple):
    """What the config alone says about a format's images (None: known only from the files)."""

    value_range: tuple[float, float] | None
    channels: int | None
    size: tuple[int, int] | None


class DataOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    format: str
    dir: str
    image_size: int | None = Field(None, gt=0, description="resize images to this square size; None keeps the files' size")
    channels: int | None = Field(None, ge=1, le=4, description="image_folder: 1 (grey) or 3 (RGB), None = from the files; statoil_json: 2 (the bands) or 3 (+ their mean)")
    cache: bool = True

    def image_spec(self) -> ImageSpec:
        """Pixel scale, channels and size as far as they follow from the config (augmentations are
        checked against them when the config loads); a format that knows more says so."""
        size = (self.image_size, self.image_size) if self.image_size else None
        return ImageSpec(None, self.channels, size)
