"""Test-time augmentation: the transform sets the registry ``TTA`` names, and one factory, ``build_tta``.

Every transform maps an NCHW float batch to another batch the model accepts; a prediction
with TTA is the mean over the transforms (of probabilities or of logits). Flips and
rotations are elements of the dihedral group D4, each written once as (quarter turns, flip)
so that declaring ``[dihedral, hflip]`` does not count hflip twice. A set that is a group
(``dihedral``, ``[identity, hflip]``, ``[identity, rot90, rot180, rot270]``) makes the
averaged prediction exactly invariant under its elements.

Crops (``fivecrop``, ``tencrop``) cut the model's input size out of larger test images:
four corners and the centre, and for ``tencrop`` the same five of the mirrored image too.

Small affine views are families named with their amount: ``rotate<D>`` is two views turned by +D
and -D degrees (1 <= D <= 45), ``zoom<P>`` two views scaled by 1 - P/100 and 1 + P/100 (1 <= P <=
50), about the centre, borders reflected as the augmentation's default border. They average over
the small rotations and scales an ``Affine`` augmentation trained the model to ignore, which flips
cannot: a digit or a letter has no mirror symmetry, but the same digit turned by 6 degrees or drawn
7% larger is the same class (``predict.tta: auto`` derives them from the augment list,
pipeline/config/auto.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config.registries import TTA, TTA_FAMILIES
from pipeline.config.sections import tta_problem
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:  # torch is imported when a transform runs: the config checks names without it
    import torch

    from pipeline.tasks.base import Task


@dataclass(frozen=True)
class TtaTransform:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    key: tuple = ()  # identity of the transform, for de-duplication

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _d4(k: int, flip: bool) -> TtaTransform:
    """Horizontal flip (if ``flip``) then ``k`` quarter turns. vflip == (2, True)."""
    names = {
        (0, False): "identity",
        (0, True): "hflip",
        (1, False): "rot90",
        (2, False): "rot180",
        (3, False): "rot270",
        (2, True): "vflip",
        (1, True): "rot90+hflip",
        (3, True): "rot270+hflip",
    }

    def fn(x: torch.Tensor) -> torch.Tensor:
        import torch

        if flip:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, k, dims=(-2, -1)) if k else x

    return TtaTransform(names[(k, flip)], fn, ("d4", k, flip))


def _crop(top: int, left: int, h: int, w: int, flip: bool, name: str) -> TtaTransform:
    def fn(x: torch.Tensor) -> torch.Tensor:
        import torch

        x = x[..., top : top + h, left : left + w]
        return torch.flip(x, dims=(-1,)) if flip else x

    return TtaTransform(name, fn, ("crop", top, left, h, w, flip))


def _crops(image_size, model_size, flips: tuple[bool, ...], what: str) -> list[TtaTransform]:
    H, W = image_size
    if model_size is None:
        raise PipelineError(f"predict.tta: {what} needs the model's input size; the checkpoint records none")
    h, w = (model_size, model_size) if isinstance(model_size, int) else tuple(model_size)
    if h > H or w > W or (h, w) == (H, W):
        raise PipelineError(
            f"predict.tta: {what} cuts {h}x{w} crops (the model's input size) from the test images, "
            f"which are {H}x{W}; expected test images larger than the model's input "
            f"(set model.input_size smaller than the images, or drop {what})"
        )
    # Centre offset rounded like torchvision's center_crop.
    ct, cl = int(round((H - h) / 2)), int(round((W - w) / 2))
    spots = {"tl": (0, 0), "tr": (0, W - w), "bl": (H - h, 0), "br": (H - h, W - w), "c": (ct, cl)}
    # The flipped crops are the five crops of the mirrored image (as torchvision's TenCrop): a crop at
    # left offset ``left`` of the mirror is the mirror of the crop at W - w - left. With an odd W - w the centre
    # is not symmetric, and only this keeps ten-crop exactly invariant under a horizontal flip.
    return [
        _crop(t, W - w - left if f else left, h, w, f, f"crop_{s}{'+hflip' if f else ''}")
        for f in flips
        for s, (t, left) in spots.items()
    ]


def _affine(angle: float, scale: float, name: str) -> TtaTransform:
    """Turn by ``angle`` degrees and scale by ``scale`` about the centre (bilinear, reflected borders)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        h, w = x.shape[-2:]
        a = math.radians(angle)
        c, s = math.cos(a) / scale, math.sin(a) / scale
        # affine_grid works in [-1, 1] coordinates per axis: the aspect terms keep a turn a turn on a
        # non-square image. The grid maps each output pixel to where it samples the input.
        theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=torch.float32, device=x.device)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False).to(
            x.dtype
        )

    return TtaTransform(name, fn, ("affine", round(angle, 6), round(scale, 6)))


@dataclass(frozen=True)
class Family:
    """A TTA family: ``<name><N>`` is two views of amount N, ``lo <= N <= hi`` (``TTA_FAMILIES``)."""

    lo: int
    hi: int
    views: Callable[[int], list[TtaTransform]]


ROTATE = Family(1, 45, lambda d: [_affine(d, 1.0, f"rotate+{d}"), _affine(-d, 1.0, f"rotate-{d}")])
ZOOM = Family(1, 50, lambda p: [_affine(0.0, 1 - p / 100, f"zoom-{p}"), _affine(0.0, 1 + p / 100, f"zoom+{p}")])
_FAMILY_NAME = re.compile(r"([a-z]+)(\d+)")


def _family(name) -> tuple[str, int] | None:
    """(family, amount) for a name like ``rotate6``, or None."""
    m = _FAMILY_NAME.fullmatch(str(name))
    return (m.group(1), int(m.group(2))) if m and m.group(1) in TTA_FAMILIES else None


def _needs_square(name, image_size):
    if image_size[0] != image_size[1]:
        raise PipelineError(
            f"predict.tta: {name} rotates by 90 degrees, which needs square images; "
            f"the test images are {image_size[0]}x{image_size[1]}"
        )


# The built-in entries of TTA (pipeline/config/registries.py): builder(image_size, model_size) -> transforms.
# A new entry is one registration:
# ``TTA.register("mine", lambda s, m: [TtaTransform("mine", fn, ("custom", "mine"))])``.


def identity(image_size, model_size):
    return [_d4(0, False)]


def hflip(image_size, model_size):
    return [_d4(0, True)]


def vflip(image_size, model_size):
    return [_d4(2, True)]


def rot180(image_size, model_size):
    return [_d4(2, False)]


def rot90(image_size, model_size):
    _needs_square("rot90", image_size)
    return [_d4(1, False)]


def rot270(image_size, model_size):
    _needs_square("rot270", image_size)
    return [_d4(3, False)]


def dihedral(image_size, model_size):
    _needs_square("dihedral", image_size)
    return [_d4(k, f) for f in (False, True) for k in range(4)]


def fivecrop(image_size, model_size):
    return _crops(image_size, model_size, (False,), "fivecrop")


def tencrop(image_size, model_size):
    return _crops(image_size, model_size, (False, True), "tencrop")


def build_tta(
    names: list[str], image_size: tuple[int, int], model_size: int | tuple[int, int] | None = None
) -> list[TtaTransform]:
    """The transforms named in ``predict.tta``, each once, in declaration order.

    ``image_size`` is the test images' (H, W); ``model_size`` the model's input size (crops only).
    """
    problem = tta_problem(names)
    if problem:
        raise PipelineError(f"predict.tta: {problem}")
    out, seen = [], set()
    for name in names:
        fam = _family(name)
        made = TTA_FAMILIES.get(fam[0]).views(fam[1]) if fam else TTA.get(name)(tuple(image_size), model_size)
        for t in made:
            if t.key not in seen:
                seen.add(t.key)
                out.append(t)
    return out


def model_input_size(meta: dict) -> tuple[int, int]:
    """The size a checkpoint's model was fed: model.input_size if set, else the training images' size."""
    s = (meta.get("model") or {}).get("input_size")
    return (int(s), int(s)) if s else (int(meta["img_size"][0]), int(meta["img_size"][1]))


def predict_tta_parts(
    model,
    images,
    features,
    transforms: list[TtaTransform],
    average: str = "prob",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    precision: str = "fp32",
    task: Task | None = None,
) -> dict:
    """Each transform's own (N, K) prediction by its key: the task's predictions (``average="prob"``) or
    logits (``"logit"``), so that several TTA subsets can be averaged from one pass per view. ``task``: the
    run's target kind (pipeline/tasks/), whose activation turns logits into predictions; by default the
    classification task of the model's head."""
    import torch

    from pipeline.models.inference import predict_logits
    from pipeline.tasks import build_task

    device = torch.device(device)
    if getattr(model, "batches_views", False):  # an exported graph: every view of a batch in one call
        views = _predict_views_together(model, images, features, transforms, batch_size, device)
    else:
        views = {
            t.key: predict_logits(model, images, features, batch_size, device, channels_last, precision, transform=t)
            for t in transforms
        }
    out = {}
    for key, logits in views.items():
        out[key] = (task or build_task(logits.shape[1])).activate(logits) if average == "prob" else logits
    return out


def _predict_views_together(model, images, features, transforms, batch_size: int, device) -> dict:
    """Each view's (N, K) logits, the views of one image batch stacked into one model call (views of the
    same shape; a batch of ``batch_size`` images per call in all)."""
    import torch

    from pipeline.models.inference import features_tensor, to_tensor

    per_call = max(1, batch_size // max(1, len(transforms)))
    out: dict = {t.key: [] for t in transforms}
    with torch.no_grad():
        for s in range(0, len(images), per_call):
            idx = np.arange(s, min(s + per_call, len(images)))
            x = to_tensor(images[idx], device)
            f = features_tensor(features, idx, device)
            views = [(t.key, t(x)) for t in transforms]
            shapes: dict = {}
            for key, v in views:
                shapes.setdefault(tuple(v.shape), []).append((key, v))
            for group in shapes.values():
                stacked = torch.cat([v for _, v in group])
                feats = None if f is None else f.repeat(len(group), 1)
                logits = model(stacked, feats).float().cpu().numpy()
                for k, (key, _) in enumerate(group):
                    out[key].append(logits[k * len(idx) : (k + 1) * len(idx)])
    return {key: np.concatenate(parts).astype(np.float64) for key, parts in out.items()}


def predict_tta(
    model,
    images,
    features,
    transforms: list[TtaTransform],
    average: str = "prob",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    precision: str = "fp32",
    task: Task | None = None,
) -> np.ndarray:
    """(N, K) mean over the transforms: of the task's predictions (``average="prob"``) or of logits (``"logit"``)."""
    parts = predict_tta_parts(
        model, images, features, transforms, average, batch_size, device, channels_last, precision, task
    )
    return sum(parts.values()) / len(parts)
