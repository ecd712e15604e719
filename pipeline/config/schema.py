"""The config: ``Config`` (the sections of ``pipeline.config.sections`` composed, ``data:`` validated by its
format's options model), the run hash and the keys it leaves out, and which sections each stage depends on.

A config is data; ``pipeline.config.load.load_config`` reads one, and every problem is one line
naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SerializeAsAny, field_validator

from pipeline.config.options import DataOptions, Section
from pipeline.config.registries import FORMATS
from pipeline.config.sections import (
    AdversarialConfig,
    EvaluateConfig,
    FoldsConfig,
    ModelConfig,
    PathsConfig,
    PredictConfig,
    PseudoConfig,
    RaceConfig,
    TrainConfig,
    TuneConfig,
    registered,
)
from pipeline.core.keys import apply_overrides
from pipeline.core.metrics import METRICS


class _UnknownFormat(DataOptions):
    """What a ``data:`` section of an unregistered format is validated against: its format fails."""

    @field_validator("format")
    @classmethod
    def _unknown(cls, v: str) -> str:
        raise ValueError(FORMATS.unknown(v))


class Config(Section):
    competition: str = Field(
        description="the competition's name: runs/<competition>/, folds/<competition>.csv, the submission files' "
        "prefix and `pipeline submit`'s default Kaggle slug"
    )
    metric: Annotated[str, registered(METRICS)] = Field(
        "logloss", description="a name in pipeline.core.metrics.METRICS"
    )
    data: SerializeAsAny[DataOptions]
    folds: FoldsConfig = Field(default_factory=FoldsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: list[dict[str, Any]] | Literal["auto"] = Field(
        default_factory=list,
        description="albumentations transforms; auto: the run's plan races families of them (pipeline/plan/recipes.py)",
    )
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    pseudo: PseudoConfig | None = None
    race: RaceConfig = Field(default_factory=RaceConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)

    # Not part of the YAML: where it came from, and the plan its ``auto`` values were resolved by
    # (pipeline/plan/; None until then).
    path: str = ""
    name: str = ""
    plan: dict | None = None

    @field_validator("data", mode="wrap")
    @classmethod
    def _data_by_format(cls, v, handler):
        """A union keyed on data.format: each registered format's reader brings its options model."""
        if isinstance(v, dict) and isinstance(v.get("format"), str):
            model = FORMATS.get(v["format"]).Options if v["format"] in FORMATS else _UnknownFormat
            return model.model_validate(v)
        return handler(v)

    @field_validator("competition")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"got {v!r}; expected a name of letters, digits, '.', '_' or '-'")
        return v

    # ---- derived paths (relative to the current directory) ----
    @property
    def folds_path(self) -> Path:
        if self.folds.file:  # an explicit file wins over paths.folds
            return Path(self.folds.file)
        return Path(self.paths.folds).expanduser() / f"{self.competition}.csv"

    @property
    def run_dir(self) -> Path:
        """The run folder; its layout is pipeline/runs/layout.py's (``RunDir``)."""
        return Path(self.paths.runs).expanduser() / self.competition / self.name

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir).expanduser()

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json")
        d.pop("path"), d.pop("name"), d.pop("plan")
        if d.get("pseudo") is None:  # absent, so configs without it keep their hashes
            d.pop("pseudo", None)
        if d.get("race") == RaceConfig().model_dump(mode="json"):  # the default: configs from before it keep theirs
            d.pop("race", None)
        return d

    def hash(self, *sections: str) -> str:
        """Short hash of the resolved config, or of some of its sections. Keys that say where or on
        what a run happens, not what it computes (``RUNTIME_KEYS``), are left out, so
        ``pipeline train CFG --folds 3 train.device=cuda:1`` joins the same run."""
        d = self.to_dict()
        if (
            d["model"].get("input_norm") == "dataset"
        ):  # model.input_norm's default: configs from before it keep their hashes
            d["model"].pop("input_norm")
        if d["predict"].get("engine") == "torch":  # likewise predict.engine's
            d["predict"].pop("engine")
        for key in RUNTIME_KEYS:
            section, _, name = key.partition(".")
            if name:
                d.get(section, {}).pop(name, None)
            else:  # a whole section
                d.pop(section, None)
        if sections:  # a section, or one key of a section ("predict.tta")
            d = {k: (d[k.partition(".")[0]][k.partition(".")[2]] if "." in k else d[k]) for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def with_values(cfg: Config, values: dict) -> Config:
    """``cfg`` with ``section.key`` values replaced, validated again (its path, name and plan kept). Only the
    keys the config set and the ones replaced count as set (``model_fields_set``): a rule that keeps what a
    user wrote (``model.pretrained``) still tells it from a default."""
    d = cfg.model_dump(mode="json", exclude_unset=True, by_alias=True)
    for k in ("path", "name", "plan"):
        d.pop(k, None)
    d = apply_overrides(d, values)
    return Config.model_validate({**d, "path": cfg.path, "name": cfg.name, "plan": cfg.plan})


# Where the data is read from, which device and how many loader workers or fold processes compute
# a run do not change what it computes (ids are checked against the folds file; loader workers are
# seeded per batch; a fold's thread count is fixed by its place in the job list); nor which executor
# runs the jobs and on which cluster; nor where the outputs go (``paths``, a whole section).
# ``train.deterministic`` changes nothing on CPU and on CUDA only which kernels compute the same sums
# (last digits, as another device does), so it is a runtime key like ``train.device``: flipping it to
# speed up the remaining folds does not retrain the others.
# Nor does the sample submission, which decides only the columns each predict writes anew.
# Nor does torchrun's world size, which is no config key at all: train.batch_size is the global batch
# however many ranks share it (pipeline/train/distributed.py).
RUNTIME_KEYS = (
    "data.dir",
    "data.cache",
    "data.sample_submission",
    "train.device",
    "train.num_workers",
    "train.fold_jobs",
    "train.deterministic",
    "train.executor",
    "train.ray_address",
    "train.ray_num_cpus",
    "train.ray_num_gpus",
    "train.ray_max_retries",
    "paths",
)

# Sections each stage's outputs depend on (stage staleness and snapshots).
STAGE_SECTIONS = {
    "fold": ("competition", "data", "folds"),
    "train": ("competition", "data", "folds", "model", "train", "augment"),
    # evaluate makes and calibrates the TTA OOF (oof_tta.csv): the keys that decide it, not predict.clip
    "evaluate": (
        "competition",
        "data",
        "folds",
        "model",
        "train",
        "augment",
        "metric",
        "evaluate",
        "predict.tta",
        "predict.tta_oof",
        "predict.average",
    ),
    "predict": ("competition", "data", "folds", "model", "train", "augment", "metric", "evaluate", "predict"),
}


def stage_sections(cfg: Config, stage: str) -> tuple[str, ...]:
    """``STAGE_SECTIONS[stage]``, plus ``adversarial`` where that stage uses it (``folds.adversarial``,
    ``evaluate.adversarial``): otherwise a changed ``adversarial.top_k`` would mark the folds stale and
    retrain every model. ``pseudo`` joins the training stages only when it is set (other configs keep their hashes)."""
    sections = STAGE_SECTIONS.get(stage, ())
    if (stage == "fold" and cfg.folds.adversarial) or (stage == "evaluate" and cfg.evaluate.adversarial):
        sections = sections + ("adversarial",)
    if cfg.pseudo is not None and "train" in sections:
        sections = sections + ("pseudo",)
    return sections
