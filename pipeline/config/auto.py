"""The ``auto`` defaults that keep predictions calibrated, each resolved from the config alone.

Every rule reads only keys that are in the config (``augment``, ``metric``) or facts of the data
the run already records (the number of classes), so a resolved value is the same on every rerun,
resumed fold and machine, and the stage hashes (which hash ``auto`` as written) stay stable.

  predict.tta: auto        the D4 elements the augmentation trains the model to be invariant to:
                           HorizontalFlip -> hflip; VerticalFlip -> vflip; both -> hflip, vflip,
                           rot180 (a group); RandomRotate90 with either flip, Transpose, D4 or
                           SquareSymmetry -> dihedral; RandomRotate90 alone -> rot90, rot180, rot270;
                           no such transform (e.g. digits: Affine only) -> identity, since a flip
                           that training never showed need not preserve the label (a mirrored 7).
                           Always with identity, and only transforms whose p > 0. Then the small
                           affine views within what an Affine / ShiftScaleRotate / Rotate /
                           SafeRotate trains with: rotate<D> at half its rotation range (the
                           smaller side of it, when that range spans both signs) and zoom<P> at half
                           its scale range, each when at least AFFINE_TTA_MIN (e.g. Affine rotate
                           [-12, 12], scale [0.85, 1.15] -> rotate6, zoom7). Half, not all: views
                           well inside what training showed, where the model is still sure. The
                           evaluate stage keeps these views only when they lower the raw OOF
                           log-loss (an interpolated view can blur a small image or a model from
                           scratch more than averaging helps); predict uses what it kept.
  predict.tta_oof: true    the OOF goes through the same TTA, so the temperature evaluate fits is
                           fitted on the kind of prediction it scales (identity TTA: oof.csv itself).
  predict.clip: auto       [0.001, 0.999] for a log-loss metric (multi-class: clip, then renormalise),
                           none otherwise: one over-confident mistake cannot cost more than -log(0.001).
  train.label_smoothing: auto   the run's task decides (pipeline/tasks/): 0.1 for a log-loss metric with
                           more than 2 classes, else 0.0: a soft target keeps a multi-class model off
                           saturated probabilities; for 2 classes temperature scaling alone does that job.
  train.epochs, train.seeds: auto   without a budget, 20 epochs and one seed (``without_plan``); with a
                           budget, and for every ``auto`` read from the data (image size, channels,
                           backbone), the run's plan decides (pipeline/plan/).
  train.lr: auto           1e-3 when the backbone starts from pretrained weights (fine-tuning), 3e-3
                           from scratch: a config whose ``model.backbone: auto`` may get either (the
                           plan picks bn_cnn under 48 px). On the 29 px folder demo at 120 s, bn_cnn
                           from scratch reached OOF log-loss 0.14 at 3e-3 and 0.21 at 1e-3 (README).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.config.schema import Config

AUTO = "auto"
DEFAULT_EPOCHS = 20  # train.epochs: auto without a budget (the schema's old default)
# the keys whose ``auto`` the run's plan resolves (pipeline/plan/)
PLAN_KEYS = (
    ("data", "image_size"),
    ("data", "channels"),
    ("model", "backbone"),
    ("model", "pretrained"),
    ("model", "finetune"),
    ("model", "input_norm"),
    ("train", "epochs"),
    ("train", "seeds"),
)

AUTO_CLIP = (1e-3, 1 - 1e-3)
AFFINE_TTA_MIN = 3  # degrees or percent: smaller views differ from the identity by less than a pixel's interpolation
AUTO_LR = {True: 1e-3, False: 3e-3}  # model.pretrained -> train.lr: auto
LOG_LOSS_METRICS = ("logloss",)  # metrics scored on the probabilities themselves

# augment names -> the D4 elements they make label-preserving (names as in albumentations)
_FLIPS = {
    "HorizontalFlip": "h",
    "VerticalFlip": "v",
    "RandomRotate90": "r",
    "Transpose": "hvr",
    "D4": "hvr",
    "SquareSymmetry": "hvr",
}


def is_logloss(metric: str) -> bool:
    return metric in LOG_LOSS_METRICS


def _on(a: dict) -> bool:
    p = a.get("p", 1.0)
    return not (isinstance(p, (int, float)) and p <= 0)


def _half_span(v, around: float, default=None) -> float:
    """Half the smaller side of a range around ``around`` (a number n stands for around +- n); 0 when the
    range does not reach both sides or is not numbers (e.g. Affine's per-axis dict)."""
    v = default if v is None else v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return abs(float(v)) / 2
    if (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    ):
        lo, hi = sorted(float(x) for x in v)
        return min(around - lo, hi - around) / 2 if lo < around < hi else 0.0
    return 0.0


def affine_tta(augment: list[dict]) -> list[str]:
    """The ``rotate<D>`` / ``zoom<P>`` views the augment list's affine transforms make safe (rule above)."""
    turn = zoom = 0.0
    for a in augment:
        if not _on(a):
            continue
        name = a.get("name")
        if name == "Affine":
            turn = max(turn, _half_span(a.get("rotate"), 0.0))
            zoom = max(zoom, 100 * _half_span(a.get("scale"), 1.0))
        elif name == "ShiftScaleRotate":  # limits are +- values; scale_limit is relative to 1
            turn = max(turn, _half_span(a.get("rotate_limit"), 0.0, 45))
            zoom = max(zoom, 100 * _half_span(a.get("scale_limit"), 0.0, 0.1))
        elif name in ("Rotate", "SafeRotate"):
            turn = max(turn, _half_span(a.get("limit"), 0.0, 90))
    turn, zoom = round(turn, 6), round(zoom, 6)  # 100 * (1.1 - 1) / 2 is 4.999...: 5
    return ([f"rotate{min(int(turn), 45)}"] if turn >= AFFINE_TTA_MIN else []) + (
        [f"zoom{min(int(zoom), 50)}"] if zoom >= AFFINE_TTA_MIN else []
    )


def d4_tta(augment: list[dict]) -> list[str]:
    """The flips and quarter turns of ``predict.tta: auto`` (rule above), identity first or ``dihedral``."""
    have = set()
    for a in augment:
        if a.get("name") in _FLIPS and _on(a):
            have |= set(_FLIPS[a["name"]])
    if "r" in have and have & {"h", "v"}:
        return ["dihedral"]
    if "r" in have:
        return ["identity", "rot90", "rot180", "rot270"]
    if have == {"h", "v"}:
        return ["identity", "hflip", "vflip", "rot180"]
    return ["identity"] + (["hflip"] if "h" in have else []) + (["vflip"] if "v" in have else [])


def auto_tta(augment: list[dict]) -> list[str]:
    """The TTA names ``predict.tta: auto`` stands for, given a config's ``augment`` list (rule above)."""
    return d4_tta(augment) + affine_tta(augment)


def tta_auto(cfg: Config) -> bool:
    """``predict.tta: auto`` as written, or as the run's plan filled it in (fitted to the budget)."""
    return cfg.predict.tta == "auto" or "predict.tta" in ((cfg.plan or {}).get("values") or {})


def resolve_tta(cfg: Config) -> list[str]:
    """``predict.tta`` as names: the list given, or the augment rule's for ``auto``."""
    return auto_tta(cfg.augment) if cfg.predict.tta == "auto" else list(cfg.predict.tta)


def tta_is_on(cfg: Config) -> bool:
    return resolve_tta(cfg) != ["identity"]


def uses_tta_oof(cfg: Config) -> bool:
    """Whether the run's OOF for calibration, blends and scores is ``oof_tta.csv`` (else ``oof.csv``)."""
    return cfg.predict.tta_oof and tta_is_on(cfg)


def resolve_clip(cfg: Config) -> tuple[float, float] | None:
    """``predict.clip``: the pair given, None, or for ``auto`` AUTO_CLIP under a log-loss metric."""
    if cfg.predict.clip == "auto":
        return AUTO_CLIP if is_logloss(cfg.metric) else None
    return tuple(cfg.predict.clip) if cfg.predict.clip is not None else None


def resolve_label_smoothing(cfg: Config, task) -> float:
    """``train.label_smoothing``: the number given, or for ``auto`` the run's task's rule
    (``pipeline.tasks``: 0.1 for a multi-class log-loss, else 0)."""
    v = cfg.train.label_smoothing
    return task.auto_label_smoothing(cfg.metric) if v == "auto" else float(v)


def resolve_lr(cfg: Config) -> float:
    """``train.lr``: the number given, or for ``auto`` AUTO_LR by ``model.pretrained`` (as the plan set it)."""
    v = cfg.train.lr
    return AUTO_LR[bool(cfg.model.pretrained)] if v == "auto" else float(v)


def has_auto(cfg: Config) -> bool:
    return cfg.augment == AUTO or any(getattr(getattr(cfg, s), k) == AUTO for s, k in PLAN_KEYS)


def needs_planner(cfg: Config) -> bool:
    """A budget, or an ``auto`` only the data decides (image size, channels, backbone, augmentation, input
    norm): the run's plan resolves it."""
    return (
        bool(cfg.train.time_budget_s)
        or cfg.augment == AUTO
        or any(getattr(getattr(cfg, s), k) == AUTO for s, k in PLAN_KEYS if s != "train")
    )


def plan_hash(cfg: Config) -> str:
    """What a plan is valid for: the training config as written (``auto`` and the budget included), and the
    race's settings when they are not the defaults."""
    from pipeline.config.schema import STAGE_SECTIONS

    race = ("race",) if "race" in cfg.to_dict() else ()
    return cfg.hash(*STAGE_SECTIONS["train"], *race)


def without_plan(cfg: Config) -> Config:
    """The config a run trains with when it needs no planner: ``cfg`` itself, or with ``train.epochs: auto``
    at ``DEFAULT_EPOCHS`` and ``train.seeds: auto`` at one seed (nothing to measure or keep). A config that
    needs the planner and has no plan yet is one line: the stages below the planner receive a planned config."""
    from pipeline.config.schema import with_values

    if cfg.plan is not None or not has_auto(cfg) and not cfg.train.time_budget_s:
        return cfg
    if needs_planner(cfg):
        raise PipelineError(
            f"{cfg.path}: the time budget or the auto values read from the data are resolved by the run's "
            f"plan; run `pipeline train {cfg.path}` (or pass pipeline.plan.store.planned(cfg) to the library)"
        )
    values = {
        k: v for k, v in (("train.epochs", DEFAULT_EPOCHS), ("train.seeds", None)) if getattr(cfg.train, k[6:]) == AUTO
    }
    resolved = with_values(cfg, values)
    plan = {
        "config_hash": plan_hash(cfg),
        "budget_s": None,
        "values": values,
        "why": [],
        "folds": cfg.folds.n_splits * cfg.folds.repeats,
        "seeds": resolved.train.seed_list,
        "expected_train_s": None,
    }
    return resolved.model_copy(update={"plan": plan})
