"""Training augmentation: albumentations transforms declared in the config, one factory ``build_augment``.

The config's ``augment:`` is a list of ``{name: <Transform>, **params}``. Only transforms in
``AUGMENTS`` are allowed; the list is validated when it is built (unknown names, unknown or
bad parameters, transforms that cannot handle the images' channel count or size), each
problem as one ``PipelineError`` line naming ``augment[i]``. ``validate_augment`` runs the same
checks when the config loads, as far as the data format alone fixes the images. ``preview_grid``
draws the augmentation as a PNG grid.

The ``Augmenter`` built (``pipeline.data.augmenter``: how and why it remaps the images into [0, 1],
and how it is seeded) runs the Compose on the images' value range ``(lo, hi)`` mapped into [0, 1]. So here:

* relative parameters (``brightness_limit``, ``GaussNoise.std_range``, ...) are
  fractions of ``hi - lo``; e.g. for SAR (-50, 50) dB, ``std_range: [0.01, 0.03]`` = 1-3 dB;
* ``fill`` / ``drop_value`` are taken in the images' own units (``fill: -25`` means -25 dB);
  left out, albumentations' 0 becomes ``lo``;
* ``border_mode`` defaults to reflect-101 (no frame, background texture continues) for every
  transform that has one; ``border_mode: constant`` (or any cv2 name/int) opts out.
  ``border_mode`` and ``interpolation`` accept names (reflect, constant, linear, ...).
"""

from __future__ import annotations

import difflib
import inspect
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.registry import Registry
from pipeline.data.augmenter import Augmenter, _albumentations

# name -> channel counts it supports (None = any). Add a line to allow a new transform;
# the build-time dry run catches the ones that fail on the images anyway.
AUGMENTS = Registry(
    "transform",
    entries={
        # geometric, size-preserving
        "HorizontalFlip": None,
        "VerticalFlip": None,
        "Transpose": None,
        "RandomRotate90": None,
        "D4": None,
        "Rotate": None,
        "SafeRotate": None,
        "Affine": None,
        "ShiftScaleRotate": None,
        "Perspective": None,
        "ElasticTransform": None,
        "GridDistortion": None,
        "OpticalDistortion": None,
        # crops and pads (a size change must be applied always, p: 1, so a batch has one size)
        "RandomResizedCrop": None,
        "RandomSizedCrop": None,
        "RandomCrop": None,
        "CenterCrop": None,
        "PadIfNeeded": None,
        "CropAndPad": None,
        "Resize": None,
        # intensity
        "RandomBrightnessContrast": None,
        "RandomGamma": None,
        "GaussNoise": None,
        "MultiplicativeNoise": None,
        "GaussianBlur": None,
        "Blur": None,
        "MedianBlur": None,
        "MotionBlur": None,
        "Defocus": None,
        "Sharpen": None,
        "UnsharpMask": None,
        "Downscale": None,
        # stroke width: grey-level dilation or erosion (a bolder or finer pen, a blotchier scan)
        "Morphological": None,
        # dropout
        "CoarseDropout": None,
        "GridDropout": None,
        "XYMasking": None,
        "Erasing": None,
        "PixelDropout": None,
        "ChannelDropout": (2, 3, 4),
        "ChannelShuffle": (2, 3, 4),
        # colour: albumentations 2.0.8 raises on 2-channel images for these (measured)
        "ColorJitter": (1, 3),
        "HueSaturationValue": (3,),
        "CLAHE": (1, 3),
        "RGBShift": (3,),
        "ToGray": (3,),
    },
)

VALUE_PARAMS = ("fill", "drop_value")  # given in the images' units, mapped into [0, 1]
_SIZE_DEFAULTS = {"RandomResizedCrop": ("size",), "RandomSizedCrop": ("size",), "Resize": ("height", "width")}
_BORDERS = {"constant": 0, "replicate": 1, "reflect": 2, "wrap": 3, "reflect_101": 4, "reflect101": 4}
_INTERP = {"nearest": 0, "linear": 1, "cubic": 2, "area": 3, "lanczos": 4}
_DEFAULT_BORDER = 4  # cv2.BORDER_REFLECT_101


# ---------------------------------------------------------------------------- building
def build_augment(
    spec: list[dict] | None,
    value_range: tuple[float, float],
    channels: int,
    image_size: tuple[int, int],
    seed: int | None = None,
    where: str = "augment",
) -> Augmenter:
    """Validate ``spec`` and build its Augmenter; every problem is one PipelineError line."""
    spec, transforms, p_of, (lo, hi), image_size = _build_all(spec, value_range, channels, image_size, where)
    out_size = _dry_run(transforms, p_of, spec, where, channels, image_size)
    return Augmenter(transforms, (lo, hi), channels, image_size, out_size, seed, spec=[dict(e) for e in spec])


def validate_augment(
    spec: list[dict] | None,
    value_range: tuple[float, float] | None = None,
    channels: int | None = None,
    image_size: tuple[int, int] | None = None,
    where: str = "augment",
) -> None:
    """``build_augment``'s checks with what is known before the images are read (the config's
    check): names and parameters always; channel support when ``channels`` is known; the dry run
    when the channels and the size are. Unknown ``value_range``: fills are checked for type only."""
    if channels is not None and image_size is not None and value_range is not None:
        build_augment(spec, value_range, channels, image_size, where=where)
        return
    # placeholders stand for what the files will say; a transform's construction does not depend on them
    _build_all(spec, value_range or (0.0, 1.0), channels, image_size or (64, 64), where)


def _build_all(spec, value_range, channels: int | None, image_size, where: str):
    """Every entry built (not yet run): (spec, transforms, their p, (lo, hi), (H, W))."""
    spec = [] if spec is None else spec
    if not isinstance(spec, (list, tuple)):
        raise PipelineError(f"{where}: expected a list of {{name: Transform, ...}} entries, got {type(spec).__name__}")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise PipelineError(f"{where}: value_range {value_range!r} is empty; expected (lo, hi) with lo < hi")
    image_size = (
        (int(image_size[0]), int(image_size[1])) if not isinstance(image_size, int) else (image_size, image_size)
    )
    transforms, p_of = [], []
    for i, entry in enumerate(spec):
        t, p = _build_one(entry, f"{where}[{i}]", lo, hi, channels, image_size)
        transforms.append(t)
        p_of.append(p)
    return spec, transforms, p_of, (lo, hi), image_size


def _build_one(entry: Any, key: str, lo: float, hi: float, channels: int | None, image_size: tuple[int, int]):
    if not isinstance(entry, dict):
        raise PipelineError(f"{key}: expected a mapping like {{name: HorizontalFlip, p: 0.5}}, got {entry!r}")
    if "name" not in entry:
        raise PipelineError(
            f"{key}: missing 'name'; expected the transform's name, e.g. {{name: HorizontalFlip, p: 0.5}}"
        )
    name = entry["name"]
    if not isinstance(name, str) or name not in AUGMENTS:
        raise PipelineError(f"{key}.name: {AUGMENTS.unknown(name)}")
    where = f"{key} ({name})"
    allowed = AUGMENTS.get(name)
    if allowed is not None and channels is not None and channels not in allowed:
        need = " or ".join(map(str, allowed))
        raise PipelineError(f"{where}: works on {need}-channel images only; these images have {channels}")
    cls = getattr(_albumentations(), name)
    accepted = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "strict", "always_apply")]
    params = {k: v for k, v in entry.items() if k != "name"}
    for k in params:
        if k not in accepted:
            close = difflib.get_close_matches(k, accepted, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"expected one of {', '.join(accepted)}"
            raise PipelineError(f"{where}: unknown parameter {k!r}; {hint}")
    sig = inspect.signature(cls.__init__).parameters
    for k, v in params.items():  # pydantic in albumentations reads true as 1.0: a typo that silently wins
        default = sig[k].default
        if isinstance(v, bool) and isinstance(default, (int, float, tuple)) and not isinstance(default, bool):
            raise PipelineError(f"{where}: {k}: got {v!r}; expected a number like {default!r}, not true/false")
    params = _translate(params, where, accepted, name, lo, hi, image_size)
    try:
        with warnings.catch_warnings():
            # "ShiftScaleRotate is a special case of Affine": it is allowed here on purpose
            warnings.filterwarnings("ignore", message=".*special case of Affine.*")
            t = cls(**params)
    except Exception as e:  # pydantic ValidationError (a ValueError), TypeError, ValueError
        raise PipelineError(f"{where}: {_one_line(e, params)}") from None
    return t, float(getattr(t, "p", 1.0))


def _translate(
    params: dict, where: str, accepted: list[str], name: str, lo: float, hi: float, image_size: tuple[int, int]
) -> dict:
    """Config values -> albumentations values: names for cv2 flags, fills in image units, defaults."""
    out = dict(params)
    for k, table in (("border_mode", _BORDERS), ("interpolation", _INTERP), ("mask_interpolation", _INTERP)):
        v = out.get(k)
        if isinstance(v, str):
            if v.lower() not in table:
                raise PipelineError(f"{where}: {k}: unknown {v!r}; expected one of {', '.join(table)}")
            out[k] = table[v.lower()]
    if "border_mode" in accepted and "border_mode" not in out:
        out["border_mode"] = _DEFAULT_BORDER
    for k in VALUE_PARAMS:
        if k in out and k in accepted:
            out[k] = _to_unit(out[k], lo, hi, f"{where}: {k}")
    if isinstance(out.get("size"), int) and "size" in accepted:
        out["size"] = (out["size"], out["size"])
    if name == "MedianBlur":  # OpenCV's float medianBlur has kernels 3 and 5 only; 7 fails mid-epoch
        out.setdefault("blur_limit", (3, 5))
        bl = out["blur_limit"]
        if isinstance(bl, (int, float, list, tuple)) and max(bl if isinstance(bl, (list, tuple)) else [bl]) > 5:
            raise PipelineError(
                f"{where}: blur_limit: got {bl!r}; expected kernel sizes of at most 5 "
                "(OpenCV's median blur of float images)"
            )
    for k in _SIZE_DEFAULTS.get(name, ()):
        if k not in out:
            out[k] = {"size": image_size, "height": image_size[0], "width": image_size[1]}[k]
    return out


def _to_unit(v, lo: float, hi: float, where: str):
    if isinstance(v, bool) or isinstance(v, str) or v is None:
        return v  # e.g. CoarseDropout's fill: random / inpaint_telea, left to albumentations
    if isinstance(v, (int, float)):
        return (float(v) - lo) / (hi - lo)
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return tuple((float(x) - lo) / (hi - lo) for x in v)
    raise PipelineError(
        f"{where}: got {v!r}; expected a number (or one per channel) in the images' units, between {lo:g} and {hi:g}"
    )


def _one_line(e: Exception, params: dict | None = None) -> str:
    """pydantic's multi-line report (albumentations re-raises it as ValueError from it) -> one line."""
    errors = getattr(e, "errors", None) or getattr(e.__cause__, "errors", None)
    errs = []
    if callable(errors):
        try:
            errs = errors()
        except Exception:
            errs = []
    if not errs:
        text = str(e).strip().splitlines()
        return text[0] if text else type(e).__name__
    key = errs[0]["loc"][0] if errs[0]["loc"] else None
    msgs = [x["msg"].removeprefix("Value error, ") for x in errs if (x["loc"][0] if x["loc"] else None) == key]
    if key is None:
        return msgs[0]
    got = (params or {}).get(key, errs[0].get("input"))
    if len(msgs) > 1:  # one message per alternative of a union type
        alts = dict.fromkeys(m.removeprefix("Input should be ").split(", unable")[0] for m in msgs)
        return f"{key}: got {got!r}; expected {' or '.join(alts)}"
    return f"{key}: {msgs[0]}" + ("" if "got" in msgs[0] else f" (got {got!r})")


def _dry_run(
    transforms: list, p_of: list[float], spec: list, where: str, channels: int, image_size: tuple[int, int]
) -> tuple[int, int]:
    """Apply every transform once (forced) to a dummy image: a transform that fails on these
    images fails now, with its key, not deep in the training loop. A transform that changes
    the size must have p: 1, or one batch would mix sizes. Returns the output (H, W)."""
    rng = np.random.default_rng(0)
    img = rng.uniform(0.2, 0.8, size=(*image_size, channels)).astype(np.float32)
    for i, (t, p) in enumerate(zip(transforms, p_of)):
        key = f"{where}[{i}] ({spec[i]['name']})"
        before = img.shape
        t.set_random_state(np.random.default_rng(i), random.Random(i))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = t(image=img, force_apply=True)["image"]
        except Exception as e:
            raise PipelineError(
                f"{key}: fails on {channels}-channel {before[0]}x{before[1]} images: {_one_line(e)}"
            ) from None
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[2] != channels:
            raise PipelineError(
                f"{key}: turns {channels}-channel images into {img.shape[2]}-channel ones; "
                "expected the channel count kept"
            )
        if img.shape[:2] != before[:2] and p < 1:
            raise PipelineError(
                f"{key}: changes the image size {before[0]}x{before[1]} -> {img.shape[0]}x{img.shape[1]} "
                f"with p={p:g}, so a batch would mix sizes; expected p: 1 (or a size-keeping transform)"
            )
    return int(img.shape[0]), int(img.shape[1])


# ---------------------------------------------------------------------------- preview
def preview_grid(
    images: np.ndarray,
    augmenter: Augmenter,
    out_png: str | Path,
    n: int = 8,
    per_image: int = 4,
    value_range: tuple[float, float] | None = None,
    channel: int = 0,
) -> Path:
    """PNG grid: one row per image, the original first, then ``per_image`` augmented draws.

    3-channel images are shown as RGB scaled by value_range; others as greyscale of
    ``channel`` (band_1 for SAR), each row on its original's 0.5-99.5 percentile scale so
    brightness changes stay visible and dB images are not washed out.
    """
    from matplotlib.figure import Figure

    from pipeline.core.io import atomic_path

    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise PipelineError(f"augment preview: expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    lo, hi = value_range if value_range is not None else augmenter.value_range
    rows = images[: max(1, min(n, len(images)))]
    cols = 1 + per_image
    fig = Figure(figsize=(1.6 * cols, 1.6 * len(rows)), dpi=100)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    rgb = images.shape[1] == 3
    for r, img in enumerate(rows):
        orig = img.astype(np.float32)
        band = orig[min(channel, orig.shape[0] - 1)]
        vmin, vmax = np.percentile(band, [0.5, 99.5])
        if not vmax > vmin:
            vmin, vmax = lo, hi
        panels = [orig] + [augmenter(img) for _ in range(per_image)]
        for c, x in enumerate(panels):
            ax = axes[r][c]
            if rgb:
                ax.imshow(np.clip((x.transpose(1, 2, 0) - lo) / (hi - lo), 0, 1))
            else:
                ax.imshow(x[min(channel, x.shape[0] - 1)], cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def check_config(cfg) -> None:
    """``load_config``'s check of the augmentation list (pipeline/config/registries.py ``CHECKS``): names
    and parameters, and a dry run where the data format alone fixes the images' channels and size."""
    if cfg.augment and cfg.augment != "auto":  # auto: families the plan races (pipeline/plan/recipes.py)
        validate_augment(cfg.augment, *cfg.data.image_spec(), where=f"{cfg.path}: augment")
