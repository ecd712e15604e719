"""The config's sections: one pydantic model per YAML section (``folds``, ``model``, ``train``, ``evaluate``,
``adversarial``, ``predict``, ``tune``, ``pseudo``, ``paths``) with every key's type, range and default, and the
validators they share (registered names, ``auto``-or-value keys, TTA names, the seed range).

``pipeline.config.schema.Config`` composes them into one config.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config.options import Section
from pipeline.config.registries import OPTIMIZERS, PRUNERS, SAMPLERS, SCHEDULERS, TTA, TTA_FAMILIES
from pipeline.core.registry import Registry

# Seeds go to numpy, scikit-learn and torch generators, which take 0 .. 2**32-1.
SEED_MAX = 2**32 - 1


# ---- names of registered things, checked against the registries (no family is imported) -----


def registered(registry: Registry):
    """A validator: the value is a name in ``registry`` (one registered later is accepted too)."""
    return AfterValidator(registry.check)


def tta_problem(names: list[str]) -> str | None:
    """What is wrong with ``predict.tta`` before any image is seen, or None: each name is in ``TTA`` or
    is a family name with an amount in the family's range (``rotate6``)."""
    if not names:
        return f"empty list; expected at least one of {', '.join(TTA)} (identity = no TTA)"
    for name in names:
        m = re.fullmatch(r"([a-z]+)(\d+)", str(name))
        if m and m.group(1) in TTA_FAMILIES:
            family = TTA_FAMILIES.get(m.group(1))
            if not family.lo <= int(m.group(2)) <= family.hi:
                return f"{name!r}: {m.group(1)}<N> takes N from {family.lo} to {family.hi}"
        elif name not in TTA:
            known = list(TTA) + [f"{f}<N>" for f in TTA_FAMILIES]
            close = difflib.get_close_matches(str(name), list(TTA) + list(TTA_FAMILIES), n=3)
            return f"unknown TTA {name!r}; " + (
                f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
            )
    return None


def _tta_names(names: list[str]) -> list[str]:
    problem = tta_problem(names)
    if problem:
        raise ValueError(problem)
    return names


def auto_or(*fields: str, expected: str):
    """A validator for keys that take ``auto`` or a value: one message naming both, instead of
    pydantic's error per member of the union. A value of the right shape keeps its own message
    (``[spin]``: unknown TTA 'spin')."""

    def wrap(cls, v, handler):
        try:
            return handler(v)
        except ValidationError as e:
            own = [x for x in e.errors() if "literal" not in str(x["loc"][:1]).lower()]
            if own and own[0]["type"] == "value_error":  # a registry's or a check's own line
                raise ValueError(own[0]["msg"].removeprefix("Value error, ")) from None
            if own and not own[0]["type"].endswith(("_type", "_parsing")) and own[0]["type"] != "missing":
                raise ValueError(
                    f"{own[0]['msg']}; expected auto or {expected}"
                ) from None  # e.g. not finite, too large
            raise ValueError(f"got {v!r}; expected auto or {expected}") from None

    return field_validator(*fields, mode="wrap")(wrap)


class FoldsConfig(Section):
    n_splits: int = Field(5, ge=2)
    seed: int = Field(42, ge=0, le=SEED_MAX, description="repeat r splits with seed + r")
    repeats: int = Field(1, ge=1, le=1000)
    group: str | None = Field(None, description="column whose equal values share a fold (StratifiedGroupKFold)")
    file: str | None = Field(None, description="default <paths.folds>/<competition>.csv")
    adversarial: bool = Field(
        False,
        description="stratify by label x quantile bin of the adversarial p(test) "
        "(pipeline/data/shift.py), so every fold validates its share of test-like rows",
    )
    adversarial_bins: int = Field(
        5, ge=2, le=100, description="quantile bins of p(test) per class for folds.adversarial"
    )

    @model_validator(mode="after")
    def _last_seed(self):
        if self.seed + self.repeats - 1 > SEED_MAX:
            raise ValueError(
                f"seed {self.seed} + repeats {self.repeats} - 1 exceeds {SEED_MAX}; expected a smaller folds.seed"
            )
        return self


class ModelConfig(Section):
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = Field(None, description="checkpoint file tried first for pretrained weights")
    drop_rate: float = Field(0.2, ge=0, lt=1)
    use_features: bool = True
    input_size: int | None = Field(None, gt=0, le=8192, description="resize batches to this size before the model")
    input_norm: Literal["dataset", "image", "auto"] = Field(
        "dataset",
        description="dataset: each channel by the training images' mean and std; image: each image first by "
        "its own mean and std (over all its channels), so a test set scanned brighter, darker or "
        "at another contrast than train reaches the model as train did; auto: the run's plan races both",
    )
    finetune: Literal["full", "partial", "head", "gradual"] = Field(
        "full",
        description="gradual: the head alone for the first epoch, then the last unfreeze_stages, then all "
        "after unfreeze_after (default a third of the epochs)",
    )
    unfreeze_stages: int = Field(2, ge=0)
    unfreeze_after: int | None = Field(None, ge=1, description="epoch after which everything is unfrozen")
    backbone_lr_mult: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _weights_need_pretrained(self):
        if self.weights and not self.pretrained:  # else the file would be ignored silently
            raise ValueError(
                f"weights is {self.weights!r} but pretrained is false; "
                "set model.pretrained=true to load it, or drop model.weights"
            )
        return self


class TrainConfig(Section):
    epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="auto: planned from train.time_budget_s (pipeline/plan/); 20 without a budget"
    )
    batch_size: int = Field(32, ge=1)
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        1e-3, description="auto: 1e-3 fine-tuning pretrained weights, 3e-3 from scratch (pipeline/config/auto.py)"
    )
    _lr = auto_or("lr", expected="a number > 0")
    patience: int = Field(5, ge=0, description="epochs without val log-loss improvement before stopping; 0 = never")
    device: str = "auto"
    seed: int = Field(42, ge=0, le=SEED_MAX)
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] | Literal["auto"] | None = Field(
        None,
        description="one model per fold and seed; None or [] = [seed]; auto: seed and seeds derived from it, "
        "as many as the budget gives every job enough epochs for (pipeline/plan/)",
    )
    optimizer: Annotated[str, registered(OPTIMIZERS)] = Field(
        "adamw", description="a name in OPTIMIZERS (pipeline/config/registries.py)"
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: Annotated[str, registered(SCHEDULERS)] = Field(
        "cosine", description="a name in SCHEDULERS (pipeline/config/registries.py)"
    )
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] | Literal["auto"] = Field(
        "auto", description="auto: 0.1 for a log-loss metric with > 2 classes, else 0 (pipeline/config/auto.py)"
    )
    _label_smoothing = auto_or("label_smoothing", expected="a number >= 0 and < 1")
    grad_clip: float | None = Field(None, gt=0)
    num_workers: int = Field(0, ge=0, le=1024)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="auto: on CUDA bf16 where native else fp16, elsewhere fp32 or bf16 timed once per machine; "
        "fp16 (CUDA only) scales the loss with torch.amp.GradScaler (pipeline/core/device.py)",
    )
    deterministic: bool = Field(
        True,
        description="CUDA: deterministic cuDNN kernels and torch.use_deterministic_algorithms "
        "(warn_only); false: cudnn.benchmark picks the fastest. No effect on CPU",
    )
    channels_last: bool = True
    accum_steps: int = Field(1, ge=1)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    class_weights: Literal["none", "balanced"] = "none"
    balanced_sampling: bool = False
    refit: bool = False
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="seconds of training (refit included) the run is planned to "
        "spend; also `--budget 15m` (pipeline/plan/)",
    )
    max_steps_per_epoch: int | None = Field(None, ge=1)
    fold_jobs: int = Field(
        1,
        ge=1,
        le=1024,
        description="CPU: folds trained at once, each in its own process with "
        "cores/fold_jobs threads (pipeline/train/executors.py)",
    )
    sync_bn: bool = Field(
        False,
        description="under torchrun on CUDA: BatchNorm statistics over the global batch "
        "(SyncBatchNorm) instead of each rank's share (pipeline/train/distributed.py)",
    )
    freeze_bn: bool = Field(
        False,
        description="BatchNorm uses and keeps its running statistics while training (its "
        "weights still learn): a pretrained backbone's statistics survive small "
        "batches, and a torchrun run computes what one process does",
    )
    # Where the fold x seed jobs run (runtime keys, out of the run hash). auto is the rule from before
    # the key existed: processes when fold_jobs > 1, else local.
    executor: Literal["auto", "local", "processes", "ray"] = Field(
        "auto",
        description="local: one job after another in this process; processes: train.fold_jobs spawned processes "
        "on CPU; ray: jobs and refits as Ray tasks (pip install -e .[ray]); auto: processes when "
        "train.fold_jobs > 1, else local",
    )
    ray_address: str = Field(
        "auto",
        min_length=1,
        description="auto: $RAY_ADDRESS or the cluster `ray start` runs on this "
        "machine, else a Ray started for this run; or host:port",
    )
    ray_num_cpus: int = Field(1, ge=1, le=1024, description="CPUs a Ray job requests, and its torch thread count")
    ray_num_gpus: float = Field(0, ge=0, le=64, description="GPUs a Ray job requests (0.5: two jobs share one)")
    ray_max_retries: int = Field(
        3, ge=0, le=100, description="reruns of a Ray job whose worker or node died; it resumes from last.pt"
    )

    @property
    def seed_list(self) -> list[int] | None:
        """The seeds a run trains each fold with: ``seeds``, or ``[seed]`` when unset; None while ``auto``."""
        seeds = self.seeds or [self.seed]
        return None if seeds == "auto" else list(seeds)

    @model_validator(mode="after")
    def _processes_need_width(self):
        if self.executor == "processes" and self.fold_jobs < 2:  # else "processes" would quietly train in this one
            raise ValueError(
                "executor is processes but fold_jobs is 1; set train.fold_jobs=2 or more, or train.executor=local"
            )
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | str | None) -> list[int] | str | None:
        if isinstance(v, list) and len(set(v)) != len(v):  # two jobs would share one fold_<k>_seed<s> folder
            raise ValueError(f"got {v!r}; expected distinct seeds")
        return v

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, v: str) -> str:
        if not re.fullmatch(r"auto|(ray://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):\d{1,5}", v):
            raise ValueError(
                f"got {v!r}; expected auto, host:port (the head's `ray start --head --port`) or ray://host:port"
            )
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):  # as pipeline.core.device.DEVICE_RE (no torch import here)
            raise ValueError(f"got {v!r}; expected auto, cpu, cuda, cuda:N or mps")
        return v


class EvaluateConfig(Section):
    eps: float = Field(1e-15, gt=0, lt=0.5)
    calibrate: bool = True
    n_bins: int = Field(10, ge=2, le=10_000)
    gradcam_samples: int = Field(4, ge=0)
    adversarial: bool = Field(
        True,
        description="train-vs-test classifier, test-like rows, duplicates and the "
        "adversarial validation score in metrics.json and report.html",
    )


class AdversarialConfig(Section):
    """Adversarial validation (``pipeline adversarial``, ``evaluate.adversarial``, ``folds.adversarial``)."""

    embedding: Literal["stats", "auto", "backbone"] = Field(
        "stats",
        description="image statistics always; plus the backbone's embedding when its weights are offline (auto) or "
        "required (backbone); stats by default: the backbone costs minutes on CPU (lite0: ~3 min for 5,000 images)",
    )
    backbone: str = Field(
        "tf_efficientnet_lite0", description="pretrained timm model whose pooled features embed the images"
    )
    image_size: int = Field(64, ge=16, le=1024, description="images are resized to this side for the backbone")
    n_splits: int = Field(5, ge=2, le=50)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    top_k: int = Field(20, ge=1, le=10_000, description="most test-like train rows reported")
    near_threshold: float = Field(
        0.995,
        gt=0,
        le=1,
        description="cosine similarity of mean-centred thumbnails at which a pair is a near duplicate",
    )
    max_pairs: int = Field(50, ge=1, le=100_000, description="duplicate pairs listed per kind (all are counted)")


class PredictConfig(Section):
    average: Literal["prob", "logit"] = "prob"
    tta: Annotated[list[str], AfterValidator(_tta_names)] | Literal["auto"] = Field(
        "auto",
        description="names in pipeline.models.tta.TTA, rotate<D>, zoom<P>; auto: the flips, quarter turns and "
        "small affine views the augment list trains with (pipeline/config/auto.py)",
    )
    tta_oof: bool = Field(
        True, description="OOF through the same TTA (evaluate writes oof_tta.csv and calibrates on it)"
    )
    clip: tuple[float, float] | Literal["auto"] | None = Field(
        "auto", description="auto: [0.001, 0.999] for a log-loss metric, else none (pipeline/config/auto.py)"
    )
    engine: Literal["torch", "onnx"] = Field(
        "torch",
        description="what runs the fold models: torch, or onnxruntime on the graphs `pipeline export CONFIG --onnx` "
        "wrote (each checked against torch on its fold's OOF images)",
    )
    _auto = auto_or("tta", expected="a list of TTA names like [identity, hflip]")
    _auto_clip = auto_or("clip", expected="null or [lo, hi] like [0.001, 0.999]")


class TuneConfig(Section):
    """``pipeline tune``: Optuna search; ``space`` syntax in ``pipeline/tune/space.py``."""

    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sampler: Annotated[str, registered(SAMPLERS)] = Field(
        "tpe", description="a name in SAMPLERS (pipeline/config/registries.py)"
    )
    pruner: Annotated[str, registered(PRUNERS)] = Field(
        "median", description="median/halving/hyperband: epoch values of the first tuned fold; wilcoxon: fold values"
    )
    folds: list[int] | None = Field(None, description="folds the objective averages; None = all")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    n_trials: int = Field(20, ge=1, description="trials per process when --n-trials and --timeout are not given")
    n_startup_trials: int = Field(
        5, ge=0, description="random trials before TPE/CMA-ES model the space and before epoch pruners prune"
    )
    p_threshold: float = Field(0.1, gt=0, lt=1, description="WilcoxonPruner: prune when p < this")
    heartbeat_s: int = Field(60, ge=1, le=86_400, description="a running trial records a heartbeat this often")
    grace_s: int | None = Field(
        None,
        ge=1,
        le=30 * 86_400,
        description="a RUNNING trial silent this long is failed and retried; None = 2 x heartbeat_s",
    )
    max_retry: int = Field(3, ge=0, description="times a trial whose worker died is retried")
    plots: bool = True

    @field_validator("folds")
    @classmethod
    def _folds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"got {v!r}; expected distinct fold numbers like [0, 1], or null for all folds")
        return v


class PseudoConfig(Section):
    """Pseudo-labels (pipeline/train/pseudo.py): confident test rows of a source run join every fold's training part."""

    model_config = ConfigDict(serialize_by_alias=True)  # snapshots say ``from:`` as the user wrote it

    source: str = Field(
        alias="from",
        description="the source: an experiment config, or an experiment's or ensemble's run "
        "folder (runs/<competition>/<name>); its test_pred_fold<k>.csv label fold k's pseudo rows",
    )
    threshold: float = Field(
        0.95, gt=0, le=1, description="a test row joins when the source's max probability is at least this"
    )
    weight: float = Field(0.5, gt=0, description="loss weight of a pseudo row (a real row's is 1)")
    max_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="at most this share of a fold's training part is pseudo rows; the most confident are kept",
    )
    soft: bool = Field(False, description="train on the source's probabilities instead of its argmax")


class RaceConfig(Section):
    """The recipe race (pipeline/plan/race.py): with a budget and ``auto`` in the recipe's keys (backbone, image
    size, augment, input norm), a share of the budget trains a few candidate recipes on one held-out split with
    short schedules, by successive halving; the winner trains on every fold with the rest."""

    share: float = Field(
        0.2, ge=0, le=0.5, description="of the budget the race may spend; 0: no race, the prior decides"
    )
    candidates: int | Literal["auto"] = Field(
        "auto", description="recipes entering the race; auto: 3 for budgets under 3 min, up to 6 for larger ones"
    )
    eta: int = Field(2, ge=2, le=4, description="successive halving keeps 1/eta of the candidates each round")
    holdout: float = Field(0.2, gt=0.05, lt=0.5, description="share of the training rows the race validates on")

    @field_validator("candidates")
    @classmethod
    def _at_least_three(cls, v):
        if v != "auto" and not 3 <= v <= 12:
            raise ValueError(f"got {v!r}; expected auto or 3 to 12 candidates")
        return v


class PathsConfig(Section):
    """Roots of the generated folders, relative to the current directory (``~`` expands)."""

    runs: str = "runs"
    folds: str = "folds"
    submissions: str = "submissions"
