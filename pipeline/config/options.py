"""The ``data:`` section: keys every format shares, and the base each reader's ``Options`` extends.

The config validates ``data:`` against the options model of the reader registered under
``data.format`` (a union keyed on ``data.format``, read from the live ``FORMATS`` registry), so a
format's own rules (statoil_json's fixed 75x75 size, image_folder's 1 or 3 channels) fail when the
config loads, not while the files are read. A format with keys of its own adds fields::

    class Options(DataOptions):
        sheet: str = "train"
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class ImageSpec(NamedTuple):
    """What the config alone says about a format's images (None: known only from the files)."""

    value_range: tuple[float, float] | None
    channels: int | None
    size: tuple[int, int] | None


def _leaf_types(ann) -> set:
    """The plain types an annotation admits (``list[int] | None`` -> {int, NoneType})."""
    if get_origin(ann) is not None:  # X | None, list[X], tuple[X, Y], Literal[...]
        return set().union(*(_leaf_types(a) for a in get_args(ann) if a is not Ellipsis))
    return {ann} if isinstance(ann, type) or ann is Any else set()


def _has_bool(v) -> bool:
    return isinstance(v, bool) or isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v)


class Section(BaseModel):
    """The base of every section of the config schema, a format's ``Options`` included: unknown
    keys fail, numbers are finite (``nan``/``inf``, also written as text, fail), a boolean is not
    a number (pydantic would read ``true`` as 1) and a number is not a boolean (nor 1 as true)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v, info: ValidationInfo):
        leaves = _leaf_types(cls.model_fields[info.field_name].annotation) - {type(None)}
        if Any in leaves or v is None:
            return v
        if leaves & {int, float} and bool not in leaves and _has_bool(v):
            raise ValueError(f"got {v!r}; expected a number, not true/false")
        if leaves == {bool} and not isinstance(v, bool):
            raise ValueError(f"got {v!r}; expected true or false")
        return v


class DataOptions(Section):
    format: str = Field(
        description="the files' reader: statoil_json, pixel_csv or image_folder (pipeline/data/formats/)"
    )
    dir: str = Field(description="the competition's folder (a runtime key: another folder joins the same run)")
    image_size: Annotated[int, Field(gt=0, le=8192)] | Literal["auto"] | None = Field(
        None,
        description="resize images to this square size; None keeps the files' size; auto: planned from the "
        "files' size and the time budget (pipeline/plan/)",
    )
    channels: Annotated[int, Field(ge=1, le=4)] | Literal["auto"] | None = Field(
        None,
        description="image_folder: 1 (grey) or 3 (RGB), None or auto = from the files; statoil_json: 2 (the bands) "
        "or 3 (+ their mean)",
    )
    cache: bool = Field(True, description="keep decoded images as a memory-mapped cache (image_folder)")
    sample_submission: str | None = Field(
        "auto",
        description="the submission's columns and ids: auto = sample_submission.csv in data.dir when it exists; "
        "a file name under data.dir (or a path); null = the format's own columns (pipeline/data/sample.py)",
    )

    def image_spec(self) -> ImageSpec:
        """Pixel scale, channels and size as far as they follow from the config (augmentations are
        checked against them when the config loads); a format that knows more says so."""
        size = (self.image_size, self.image_size) if isinstance(self.image_size, int) else None
        return ImageSpec(None, self.channels if isinstance(self.channels, int) else None, size)
