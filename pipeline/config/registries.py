"""The names a config may use for each pluggable family, each pointing lazily at what implements it.

The config sits at the bottom of the stack, so it never imports the families it names: each built-in
entry is a ``"module:attr"`` path (``pipeline.core.registry``), imported when the entry is first
used to build something. ``load_config`` checks a name against these registries without any import;
a family's own ``build_*`` looks the entry up. A user adds an entry with ``REGISTRY.register(name, obj)``
(e.g. ``OPTIMIZERS.register("nadamw", OptimizerSpec("nadamw"))``), and the config accepts it from then on.

``CHECKS`` holds what the schema cannot check by name: the augmentation list (a dry run of albumentations)
and the search space, each run by ``load_config`` before any data is read (backbone names, which need timm
and so torch, are checked where training starts: pipeline/models/backbones.py check_config).
"""

from __future__ import annotations

from pipeline.core.registry import Registry

FORMATS = Registry(
    "format",
    lazy={
        "statoil_json": "pipeline.data.formats.statoil_json:StatoilJson",
        "pixel_csv": "pipeline.data.formats.pixel_csv:PixelCsv",
        "image_folder": "pipeline.data.formats.image_folder:ImageFolder",
    },
)

OPTIMIZERS = Registry(
    "optimizer",
    lazy={name: f"pipeline.train.optim:{name.upper()}" for name in ("sgd", "adam", "adamw", "rmsprop", "adadelta")},
)

SCHEDULERS = Registry(
    "scheduler",
    lazy={name: f"pipeline.train.optim:{name.upper()}" for name in ("cosine", "onecycle", "step", "plateau", "none")},
)

SAMPLERS = Registry(
    "sampler", lazy={name: f"pipeline.tune.samplers:{name.upper()}" for name in ("tpe", "random", "cmaes")}
)

PRUNERS = Registry(
    "pruner",
    lazy={
        name: f"pipeline.tune.samplers:{name.upper()}"
        for name in ("median", "halving", "hyperband", "wilcoxon", "none")
    },
)

# predict.tta names: each a builder (image size, model size) -> [TtaTransform] (pipeline/models/tta.py)
TTA = Registry(
    "TTA",
    lazy={
        name: f"pipeline.models.tta:{name}"
        for name in ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "dihedral", "fivecrop", "tencrop")
    },
)

# ``rotate<D>``, ``zoom<P>``: families of two views each, an amount in the family's range
TTA_FAMILIES = Registry("TTA family", lazy={"rotate": "pipeline.models.tta:ROTATE", "zoom": "pipeline.models.tta:ZOOM"})

# the target kinds (pipeline/tasks/): what a run's labels are and everything that follows from them
TASKS = Registry(
    "task",
    lazy={"binary": "pipeline.tasks.classification:BINARY", "multiclass": "pipeline.tasks.classification:MULTICLASS"},
)

CHECKS = Registry(
    "config check",
    lazy={"augment": "pipeline.data.augment:check_config", "tune.space": "pipeline.tune.space:check_config"},
)
