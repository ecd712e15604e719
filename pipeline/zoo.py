"""Zoo stage: many models on one folds file, each its own experiment, then (optionally) their blend.

``pipeline zoo ZOO.yaml [section.key=value ...] [--ensemble METHOD]``; in Python ``run_zoo(path, overrides)``.

The zoo YAML (validated; every problem is one line naming the key, before anything is written)::

    base: iceberg-demo.yaml             # a competition config (relative to this file, else the cwd)
    members:                            # member name -> its own section.key overrides (or nothing)
      lite0_s1: {model.backbone: tf_efficientnet_lite0, train.seed: 1}
      lite0_s2: {model.backbone: tf_efficientnet_lite0, train.seed: 2}
      cnn: {model.backbone: simple_cnn, model.pretrained: false}
    ensemble:                           # optional: blend the members (pipeline/ensemble/blend.py's keys)
      method: hillclimb                 # any blender of ensemble.BLENDERS; --ensemble METHOD wins
      clip: [0.001, 0.999]

Command-line overrides apply to the base; a member's own overrides win over them. Member ``m`` of
``ZOO.yaml`` is the experiment ``<zoo stem>-m`` (``runs/<competition>/<zoo stem>-m/``): a member is
named by its key, so reordering the file changes no name, hash or result; members train in the
order of their names. Members share the competition's data, folds file and metric, so their keys
``competition``, ``metric``, ``data.*``, ``folds.*`` and ``paths.*`` are refused (set them in the base
or on the command line). Each member runs the stages of ``pipeline run`` (``pipeline.stages.run_all``: fold,
train through the executor its config names, evaluate, predict), so a finished member is skipped
and a half-trained one resumes at its first unfinished fold. Then the members' table (CV mean and
std from metrics.json, training seconds and img/s from the folds' history.csv) and, with
``--ensemble`` or an ``ensemble:`` section, the blend of all members into ``runs/<competition>/<zoo stem>/``
and a submission (``ensemble.run_ensemble``).
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from pipeline.config.load import _read_yaml, load_config
from pipeline.config.options import Section
from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.keys import known_keys, parse_override
from pipeline.runs.layout import RunDir

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# what every member shares with the base: the training rows, the folds file, the score (and where runs go)
SHARED = ("competition", "metric", "data", "folds", "paths")
FILLED = ("competition", "config", "members")  # ensemble keys the zoo fills in itself


class ZooFile(Section):
    base: str = Field(description="competition config the members start from")
    members: dict[str, dict[str, Any] | None] = Field(description="member name -> section.key overrides")
    ensemble: dict[str, Any] | None = Field(
        None, description="pipeline/ensemble/blend.py keys for the blend of the members"
    )

    @field_validator("members", mode="before")
    @classmethod
    def _members(cls, v):
        if isinstance(v, dict) and not v:
            raise ValueError("no members; expected a mapping of member name -> {section.key: value}")
        if isinstance(v, dict):
            for name, over in v.items():
                if not isinstance(name, str) or not NAME.fullmatch(name):
                    raise ValueError(f"member name {name!r}; expected a name of letters, digits, '.', '_' or '-'")
                if over is not None and not isinstance(over, dict):
                    raise ValueError(
                        f"member {name}: got {over!r}; expected a mapping of section.key: value (or nothing)"
                    )
        return v


@dataclass
class Zoo:
    """A validated zoo: the base config (command-line overrides applied) and one config per member."""

    path: Path
    base: Config
    members: dict[str, Config]  # by member name, sorted
    ensemble: dict | None  # the blend's settings (None: no blend)
    overrides: dict[str, dict] = field(default_factory=dict)  # member -> its own overrides, for the log

    @property
    def name(self) -> str:
        return self.path.stem


def experiment_name(zoo_path: str | Path, member: str) -> str:
    """The experiment (run folder) name of ``member``: ``<zoo stem>-<member>``."""
    return f"{Path(zoo_path).stem}-{member}"


def _format_error(path: Path, err: ValidationError, prefix: str = "", fields=()) -> str:
    errors = err.errors()  # an unknown key first: a typo'd ``member:`` also leaves ``members`` missing
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = prefix + ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        known = [prefix + f for f in fields]
        close = difflib.get_close_matches(loc, known, n=3)
        return f"{path}: unknown key '{loc}'; " + (
            f"did you mean {', '.join(close)}?" if close else f"expected {', '.join(known)}"
        )
    if e["type"] == "missing":
        return f"{path}: missing required key '{loc}'"
    return f"{path}: {loc}: {e['msg'].removeprefix('Value error, ')}"


def _resolve_base(path: Path, base: str) -> Path:
    for cand in (path.parent / base, Path(base).expanduser()):  # like extends: beside the zoo file first
        if cand.is_file():
            return cand
    raise PipelineError(f"{path}: base: {base} not found (looked in {path.parent} and {Path.cwd()})")


def _member_overrides(path: Path, name: str, over: dict, known: list[str]) -> dict:
    """A member's overrides, checked: dotted keys of the config schema, none of the shared ones."""
    where = f"{path}: members.{name}"
    out = {}
    for key in sorted(over, key=str):  # sorted: a whole section (train) goes in before its keys (train.lr)
        if not isinstance(key, str) or not all(p.strip() for p in key.split(".")):
            raise PipelineError(f"{where}: key {key!r} is not a config key; expected section.key like model.backbone")
        if key.split(".")[0] in SHARED:
            raise PipelineError(
                f"{where}: {key}: members share the base's competition, metric, data, folds and paths; "
                f"set it in the base or on the command line"
            )
        if key not in known and not any(key.startswith(k + ".") for k in known):
            close = difflib.get_close_matches(key, known, n=3)
            raise PipelineError(
                f"{where}: unknown config key '{key}'" + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        out[key] = over[key]
    return out


def load_zoo(path: str | Path, overrides: list[str] | None = None, ensemble: str | None = None) -> Zoo:
    """Read and check the zoo file, the base and every member's config (nothing is written)."""
    path = Path(path)
    if not NAME.fullmatch(path.stem):
        raise PipelineError(f"{path}: the file's stem names the experiments; expected letters, digits, '.', '_' or '-'")
    try:
        z = ZooFile(**_read_yaml(path))
    except ValidationError as err:
        raise PipelineError(_format_error(path, err, fields=ZooFile.model_fields)) from None
    base_path = _resolve_base(path, z.base)
    cli = list(overrides or [])
    base = load_config(base_path, cli)  # a problem of the base or the command line names them
    cli_keys = {".".join(k.strip() for k in keys): v for keys, v in map(parse_override, cli)}
    known = known_keys(Config)
    members, own = {}, {}
    for name in sorted(z.members):
        own[name] = _member_overrides(path, name, z.members[name] or {}, known)
        try:
            cfg = load_config(base_path, {**cli_keys, **own[name]})  # the member's own keys win
        except PipelineError as e:  # the base's name is in the message; the culprit is the member's key
            raise PipelineError(f"{path}: members.{name}: {str(e).removeprefix(f'{base_path}: ')}") from None
        members[name] = cfg.model_copy(update={"name": experiment_name(path, name)})
    settings = _ensemble_settings(path, z, base, ensemble)
    return Zoo(path=path, base=base, members=members, ensemble=settings, overrides=own)


def _ensemble_settings(path: Path, z: ZooFile, base: Config, method: str | None) -> dict | None:
    """The blend's EnsembleConfig keys, checked now (not after an hour of training); None: no blend."""
    from pipeline.ensemble.blend import EnsembleConfig

    if method is None and z.ensemble is None:
        return None
    settings = dict(z.ensemble or {})
    for key in FILLED:
        if key in settings:
            raise PipelineError(f"{path}: ensemble.{key}: the zoo sets it (its base and members); remove it")
    if method is not None:
        settings["method"] = method
    settings.setdefault("name", path.stem)
    if len(z.members) < 2:
        raise PipelineError(f"{path}: ensemble: a blend needs at least 2 members; members has {len(z.members)}")
    try:
        EnsembleConfig(competition=base.competition, config=base.path, members=list(z.members), **settings)
    except ValidationError as err:
        msg = _format_error(path, err, "ensemble.", _fields(EnsembleConfig, FILLED))
        if method is not None and msg.startswith(f"{path}: ensemble.method:"):
            msg = f"command line: --ensemble {method}: " + msg.removeprefix(f"{path}: ensemble.method: ")
        raise PipelineError(msg) from None
    return settings


def _fields(model, leave_out=()) -> list[str]:
    """A schema's keys for hints, one level of nested sections expanded (``gbm.num_leaves``)."""
    from pydantic import BaseModel

    out = []
    for name, f in model.model_fields.items():
        if name in leave_out:
            continue
        sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
        out += [f"{name}.{g}" for g in sub.model_fields] if sub is not None else [name]
    return out


# ---- the stage ----------------------------------------------------------------------------------


def run_zoo(path: str | Path, overrides: list[str] | None = None, ensemble: str | None = None) -> list[dict]:
    """Train (or skip) every member, print the members' table, blend them when asked; returns the table's rows."""
    from pipeline.stages import run_all

    zoo = load_zoo(path, overrides, ensemble)
    log.info(
        f"zoo {zoo.name}: {len(zoo.members)} members on {zoo.base.folds_path} (base {zoo.base.path}): "
        + ", ".join(zoo.members)
    )
    rows = []
    for name, cfg in zoo.members.items():
        shown = " ".join(f"{k}={v}" for k, v in zoo.overrides[name].items()) or "the base as it is"
        log.info(f"[zoo] member {name} -> {cfg.run_dir} ({shown})")
        times = run_all(cfg)
        rows.append(member_row(name, cfg, sum(times.values()), trained=times.get("train", 0) > 0))
    log.info(members_table(rows, zoo.base.metric))
    if zoo.ensemble is not None:
        blend(zoo)
    return rows


def member_row(name: str, cfg: Config, seconds: float, trained: bool) -> dict:
    """A member's line of the table: CV mean and std, training seconds and img/s over its folds."""
    from pipeline.evaluate.experiments import cv_score

    run = RunDir.of(cfg)
    mean, std, _ = cv_score(run.path, cfg.metric)
    train_s, img_s = history_speed(run)
    return {
        "member": name,
        "experiment": cfg.name,
        "backbone": cfg.model.backbone,
        "cv_mean": mean,
        "cv_std": std,
        "train_s": train_s,
        "img_s": img_s,
        "this_run_s": seconds,
        "trained": trained,
    }


def history_speed(run: RunDir) -> tuple[float, float]:
    """(seconds of training summed over the fold jobs' epochs, mean train img/s) from history.csv; NaN if unknown."""
    import pandas as pd

    secs, speeds = 0.0, []
    for _, h in run.histories():
        try:
            df = pd.read_csv(h, usecols=["seconds", "train_img_s"])
        except (ValueError, OSError, pd.errors.ParserError):
            continue  # a history of another layout: the table shows what it can
        secs += float(df["seconds"].sum())
        speeds += df["train_img_s"].dropna().tolist()
    return (secs if speeds else math.nan), (sum(speeds) / len(speeds) if speeds else math.nan)


def members_table(rows: list[dict], metric: str) -> str:
    """The members side by side (best CV mean marked '*')."""
    from pipeline.core.metrics import GREATER_IS_BETTER

    fmt = lambda v, spec: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)  # noqa: E731
    scores = [r["cv_mean"] for r in rows if math.isfinite(r["cv_mean"])]
    best = (max if GREATER_IS_BETTER[metric] else min)(scores) if scores else None
    head = ["member", "experiment", "backbone", f"cv {metric}", "cv std", "train s", "img/s", "this run"]
    body = [
        [
            r["member"] + ("*" if best is not None and r["cv_mean"] == best and len(rows) > 1 else ""),
            r["experiment"],
            r["backbone"],
            fmt(r["cv_mean"], ".4f"),
            fmt(r["cv_std"], ".4f"),
            fmt(r["train_s"], ".1f"),
            fmt(r["img_s"], ".1f"),
            f"{r['this_run_s']:.1f}s" if r["trained"] else "up to date",
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join(
        ["zoo members (CV: mean and std of the per-fold scores; train s: summed over folds)", line(head)]
        + [line(b) for b in body]
    )


def blend(zoo: Zoo) -> Path:
    """Blend every member with ``ensemble.run_ensemble`` into ``runs/<competition>/<name>/``; the submission's path."""
    from pipeline.ensemble.blend import EnsembleConfig, run_ensemble

    members = [str(RunDir.of(cfg).path) for cfg in zoo.members.values()]
    ens = EnsembleConfig(competition=zoo.base.competition, config=zoo.base.path, members=members, **zoo.ensemble)
    log.info(f"[zoo] blending {len(members)} members ({ens.method}) -> {RunDir.named(zoo.base, ens.name).path}")
    return run_ensemble(zoo.path, ens=ens, cfg=zoo.base)
