"""The prior: which recipes enter the race, and in what order.

A recipe is the part of a config the race may choose: the backbone and how it is trained (fine-tuned,
gradually, frozen with a trained head, or a small CNN from scratch), the image size, a family of
augmentations and the input normalisation. The rules of earlier versions (a pretrained backbone from
48 px up, no flips for grey images, ...) are no longer the decision: they order the candidates, and
only the axes the config leaves ``auto`` vary. The race (``pipeline.plan.race``) measures them on the
competition's own rows.

The portfolio is the prior's first choice on every axis, then one axis changed at a time, in the order
the prior ranks the alternatives, until there are as many candidates as the budget races
(``n_candidates``). Each candidate's name says what it is, e.g. ``lite0-128-d4+affine``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config.auto import AUTO
from pipeline.config.schema import Config
from pipeline.plan.facts import (
    MIN_PRETRAINED_SIDE,
    PRETRAINED,
    SCRATCH,
    SIZES,
    SMALL_DATA,
    Facts,
    _weights_offline,
    fixed_size,
    given_size,
)

# Families of augmentation the race chooses among. Flips and quarter turns are exact symmetries only for some
# data (an aerial scene, a SAR chip: all eight; a photo: the mirror; a digit: none): the race measures which.
_HFLIP = [{"name": "HorizontalFlip", "p": 0.5}]
_D4 = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}, {"name": "RandomRotate90", "p": 0.5}]
_AFFINE = [{"name": "Affine", "translate_percent": [-0.08, 0.08], "scale": [0.9, 1.1], "rotate": [-10, 10], "p": 0.5}]
_WIDE = [
    {"name": "Affine", "translate_percent": [-0.1, 0.1], "scale": [0.75, 1.25], "rotate": [-20, 20], "p": 0.9},
    {"name": "RandomBrightnessContrast", "brightness_limit": 0.25, "contrast_limit": 0.4, "p": 0.6},
    {"name": "GaussNoise", "std_range": [0.02, 0.08], "p": 0.3},
    {"name": "GaussianBlur", "blur_limit": [3, 5], "p": 0.2},
]
AUG_FAMILIES: dict[str, list[dict]] = {
    "none": [],
    "hflip": _HFLIP,
    "d4": _D4,
    "affine": _AFFINE,
    "hflip+affine": _HFLIP + _AFFINE,
    "d4+affine": _D4 + _AFFINE,
    "wide": _WIDE,
    "hflip+wide": _HFLIP + _WIDE,
    "d4+wide": _D4 + _WIDE,
}
# the prior's order of the families, by the kind of images
AUG_ORDER = {
    "photo": ["hflip+affine", "d4+affine", "hflip+wide", "none", "hflip"],
    "sar": ["d4+affine", "d4", "d4+wide", "affine", "none"],
    "grey": ["affine", "d4+affine", "hflip+affine", "wide", "none"],
}
SCRATCH_MAX_SIDE = 64  # the small CNN from scratch learns from few pixels; larger inputs only cost time
PRETRAINED_MAX_SIDE = 224  # ImageNet's own scale: larger rarely pays on a CPU budget
RACE_CANDIDATES = ((180, 3), (600, 4), (1200, 5))  # budget under s -> candidates; 6 beyond


@dataclass(frozen=True)
class Recipe:
    """One candidate: the config values it sets, and its place in the prior's order."""

    backbone: str
    pretrained: bool
    finetune: str
    size: int
    augment: str
    input_norm: str
    rank: int = 0

    @property
    def name(self) -> str:
        short = {PRETRAINED: "lite0", "tf_efficientnet_lite1": "lite1", "tf_efficientnet_lite2": "lite2"}
        net = short.get(self.backbone, self.backbone) + ("-frozen" if self.finetune == "head" else "")
        norm = "" if self.input_norm == "dataset" else "-imgnorm"
        return f"{net}-{self.size}-{self.augment}{norm}"

    def config_values(self, cfg: Config) -> dict:
        """``section.key`` values for the keys the config leaves ``auto``."""
        out = {}
        if cfg.model.backbone == AUTO:
            out.update(
                {"model.backbone": self.backbone, "model.pretrained": self.pretrained, "model.finetune": self.finetune}
            )
        if cfg.data.image_size == AUTO and not fixed_size(cfg):
            out["data.image_size"] = self.size
        if cfg.augment == AUTO:
            out["augment"] = AUG_FAMILIES[self.augment]
        if cfg.model.input_norm == AUTO:
            out["model.input_norm"] = self.input_norm
        return out


def image_kind(facts: Facts) -> str:
    """``photo`` (3 channels), ``sar`` (2 channels or float pixels, e.g. dB bands) or ``grey``."""
    if facts.channels == 3:
        return "photo"
    return "sar" if facts.channels == 2 or facts.dtype.startswith("float") else "grey"


def n_candidates(cfg: Config, budget: float) -> int:
    if cfg.race.candidates != AUTO:
        return int(cfg.race.candidates)
    return next((n for limit, n in RACE_CANDIDATES if budget < limit), 6)


def backbones(cfg: Config, facts: Facts, n_train: int) -> list[tuple[str, bool, str]]:
    """(backbone, pretrained, finetune) in the prior's order; the config's own when it is not ``auto``."""
    if cfg.model.backbone != AUTO:
        return [(cfg.model.backbone, cfg.model.pretrained, cfg.model.finetune)]
    if facts.native < MIN_PRETRAINED_SIDE or not _weights_offline(PRETRAINED):
        return [(SCRATCH, False, "full")]
    tune = "gradual" if n_train < SMALL_DATA else "full"
    # no frozen backbone with a trained head: at the race's equal images it won every round one (a linear head
    # converges in an epoch) and then lost to the fine-tune (shift-folder 300 s 0.671 test accuracy, flowers
    # 300 s 0.717); ``model.finetune: head`` in a config still trains it
    out = [(PRETRAINED, True, tune), (SCRATCH, False, "full")]
    if _weights_offline("tf_efficientnet_lite1"):
        out.append(("tf_efficientnet_lite1", True, tune))
    given = cfg.model.model_fields_set  # model.pretrained / finetune written in the config stay the config's
    if "pretrained" in given:
        out = [n for n in out if n[1] == cfg.model.pretrained] or [(SCRATCH, False, "full")]
    if "finetune" in given:
        out = list(dict.fromkeys((b, p, cfg.model.finetune if p else f) for b, p, f in out))
    return out


def sizes_for(cfg: Config, facts: Facts, backbone: str, pretrained: bool, largest: int) -> list[int]:
    """Image sizes for one backbone, largest first: the largest the budget affords (``largest``, from the speed
    model) and the standard size about two thirds of it; never above the files' size."""
    if fixed_size(cfg):
        return [given_size(cfg, facts)]
    cap = min(facts.native, largest, SCRATCH_MAX_SIDE if not pretrained else PRETRAINED_MAX_SIDE)
    floor = MIN_PRETRAINED_SIDE if pretrained else 8
    fits = [s for s in (facts.native, *SIZES) if s <= cap and s >= min(floor, facts.native)]
    if not fits:
        return [max(min(facts.native, cap), min(floor, facts.native))]
    first = fits[0]
    second = next((s for s in fits[1:] if s <= math.ceil(first * 0.7)), None)
    return [first] + ([second] if second else [])


def portfolio(cfg: Config, facts: Facts, *, n: int, largest_size) -> list[Recipe]:
    """The race's candidates: the prior's first choice on every axis the config leaves ``auto``, then one axis
    changed at a time in the prior's order (augmentation first, then backbone, size and input norm) until
    there are ``n``. ``largest_size(backbone, pretrained, finetune)``: the largest side the budget affords."""
    n_train = facts.n_rows - math.ceil(facts.n_rows * cfg.race.holdout)
    nets = backbones(cfg, facts, n_train)
    # a network no size of which affords its minimum epochs goes last (a 90 s budget on 3,000 photos: the frozen
    # features before the fine-tune); the prior's order otherwise
    nets = [n for n in nets if largest_size(*n) > 0] + [n for n in nets if largest_size(*n) <= 0]
    augs = AUG_ORDER[image_kind(facts)] if cfg.augment == AUTO else ["config"]
    norms = (
        (["dataset", "image"] if facts.channels == 1 else ["dataset"])
        if cfg.model.input_norm == AUTO
        else [cfg.model.input_norm]
    )
    base_net = nets[0]
    base_sizes = sizes_for(cfg, facts, base_net[0], base_net[1], largest_size(*base_net))
    base = {"net": base_net, "size": base_sizes[0], "aug": augs[0], "norm": norms[0]}
    variations = [("aug", a) for a in augs[1:]] + [("net", net) for net in nets[1:]]
    variations += [("size", s) for s in base_sizes[1:]] + [("norm", v) for v in norms[1:]]
    out = [_recipe(cfg, facts, base, largest_size, 0)]
    for rank, (axis, value) in enumerate(_interleave(variations), 1):
        if len(out) >= n:
            break
        choice = {**base, axis: value}
        if axis == "net":  # another backbone at its own largest affordable size
            choice["size"] = sizes_for(cfg, facts, value[0], value[1], largest_size(*value))[0]
        r = _recipe(cfg, facts, choice, largest_size, rank)
        if all(r.name != o.name for o in out):
            out.append(r)
    return out


def _interleave(variations: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Alternate the axes: the best alternative of each axis before the second best of any."""
    by_axis: dict[str, list] = {}
    for axis, value in variations:
        by_axis.setdefault(axis, []).append((axis, value))
    out = []
    while any(by_axis.values()):
        for axis in ("aug", "net", "size", "norm"):
            if by_axis.get(axis):
                out.append(by_axis[axis].pop(0))
    return out


def _recipe(cfg: Config, facts: Facts, choice: dict, largest_size, rank: int) -> Recipe:
    backbone, pretrained, finetune = choice["net"]
    aug = choice["aug"]
    if finetune == "head" and cfg.augment == AUTO:
        aug = "none"  # frozen features are computed once per image only without augmentation
    return Recipe(
        backbone=backbone,
        pretrained=pretrained,
        finetune=finetune,
        size=choice["size"],
        augment=aug,
        input_norm=choice["norm"],
        rank=rank,
    )


def prior_values(cfg: Config, facts: Facts) -> dict:
    """Without a race: the prior's first choice for ``augment`` and ``model.input_norm`` when they are ``auto``
    (the backbone and size follow their own rules, ``pipeline.plan.facts`` and the search)."""
    out = {}
    if cfg.augment == AUTO:
        out["augment"] = AUG_FAMILIES[AUG_ORDER[image_kind(facts)][0]]
    if cfg.model.input_norm == AUTO:
        out["model.input_norm"] = "dataset"
    return out
