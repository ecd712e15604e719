"""Ensemble stage: blend experiments that share a folds file -> <paths.runs>/<competition>/<name>/ + a submission.

The ensemble YAML (validated; errors are one line naming the key)::

    competition: iceberg-demo
    config: iceberg-demo.yaml          # base competition config (data format, metric, test ids)
    members:                           # run directories or experiment configs (2 or more)
      - runs/iceberg-demo/iceberg-demo
      - competitions/iceberg-demo-b.yaml
    method: mean                       # mean | geometric | rank | weights | stack | hillclimb | gbm
    clip: [0.001, 0.999]               # optional; default the base config's predict.clip
    name: iceberg-blend                # optional; default the file's stem
    iterations: 50                     # hillclimb: most additions after the best single member
    gbm: {num_leaves: 7, learning_rate: 0.05, rounds: 500}   # gbm: LightGBM settings (GbmConfig)

Each member contributes its test predictions (``test_pred.csv``) and the OOF predictions made the
same way (``predict.json`` names them: ``oof.csv`` or ``oof_tta.csv``), both read through one rule:
calibrated as the member's evaluation kept (temperature and shrink, its ``calibration.json``), else raw.
Members must agree on ids, targets and folds. ``weights``, ``stack``, ``hillclimb`` and ``gbm`` are fitted
on OOF predictions with the folds themselves (for each fold: fit on the other folds, predict this one), so
their printed OOF scores are nested and honest; the test blend uses the fit on all OOF rows.

- ``hillclimb``: greedy forward ensemble selection with replacement on the competition's metric
  (Caruana et al. 2004, AutoGluon's weighted ensemble); prints the chosen members, their weights and,
  beside the nested score, the optimistic in-sample one (selected and scored on all rows).
- ``gbm``: LightGBM over the members' log-odds (log-probabilities for more classes) and the table's
  scalar features (``pipeline/ensemble/scalars.py``: the incidence angle and band statistics for Statoil, per
  channel mean and std otherwise), each fold's model early-stopped on an inner split of its own rows.

When every member kept its folds' own test predictions (``test_pred_fold<k>.csv``), the ensemble keeps
its own too: fold k's members' models blended by the method as fitted without fold k (``fold_blends``),
so an ensemble can be the source of a training run's pseudo-labels (``pseudo.from``) without a leak.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field, ValidationError, field_validator

from pipeline.config.load import _read_yaml, load_config
from pipeline.config.options import Section
from pipeline.config.schema import Config, apply_overrides
from pipeline.config.sections import registered
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.core.keys import known_keys
from pipeline.core.metrics import GREATER_IS_BETTER, logloss, score
from pipeline.ensemble.blenders import BLENDERS, NESTED, GbmConfig, build_blender
from pipeline.ensemble.members import Member, _resolve, check_members, load_member
from pipeline.predict.predictor import clip_probs, fmt_scores
from pipeline.runs.layout import RunDir
from pipeline.runs.predictions import pred_frame, probs_of, read_predictions, write_predictions
from pipeline.runs.records import stale_predictions

log = logging.getLogger(__name__)


class EnsembleConfig(Section):  # the config's rules: unknown keys, non-finite numbers, booleans as numbers fail
    competition: str
    config: str
    members: list[str] = Field(min_length=2)
    method: Annotated[str, registered(BLENDERS)] = "mean"
    clip: tuple[float, float] | None = None
    name: str | None = None
    stack_c: float = Field(1.0, gt=0, description="inverse regularisation strength of the stacking logistic regression")
    iterations: int = Field(50, ge=1, le=100_000, description="hillclimb: most additions after the best single member")
    gbm: GbmConfig = Field(default_factory=GbmConfig)

    @field_validator("competition", "name")
    @classmethod
    def _name(cls, v):
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"got {v!r}; expected a name of letters, digits, '.', '_' or '-'")
        return v

    @field_validator("clip")
    @classmethod
    def _clip(cls, v):
        if v is not None and not 0 <= v[0] < v[1] <= 1:
            raise ValueError(f"got {list(v)}; expected [lo, hi] with 0 <= lo < hi <= 1")
        return v


def _format_error(path: Path, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        section = loc.rpartition(".")[0]
        keys = [k for k in known_keys(EnsembleConfig) if k.rpartition(".")[0] == section]  # the keys beside it
        close = difflib.get_close_matches(loc, keys, n=3)
        return f"{path}: unknown key '{loc}'" + (
            f"; did you mean {', '.join(close)}?" if close else f"; expected {', '.join(keys)}"
        )
    if e["type"] == "missing":
        return f"{path}: missing required key '{loc}'"
    got, msg = e.get("input"), e["msg"].removeprefix("Value error, ")
    got_s = "" if isinstance(got, (dict, list)) or "got" in msg or repr(got) in msg else f" (got {got!r})"
    return f"{path}: {loc}: {msg}{got_s}"


def load_ensemble(path: str | Path, overrides: list[str] | None = None) -> tuple[EnsembleConfig, Config]:
    path = Path(path)
    d = _read_yaml(path)
    if overrides:
        d = apply_overrides(d, overrides)
    if "members" not in d and "data" in d:
        raise PipelineError(
            f"{path}: is a competition config, not an ensemble file; expected keys competition, config, members, method"
        )
    try:
        ens = EnsembleConfig(**d)
    except ValidationError as err:
        raise PipelineError(_format_error(path, err)) from None
    cpath = _resolve(ens.config, path.parent)
    if cpath is None:
        raise PipelineError(f"{path}: config: {ens.config} not found (looked in {Path.cwd()} and {path.parent})")
    from pipeline.plan.store import planned

    cfg = planned(load_config(cpath), create=False)
    if cfg.competition != ens.competition:
        raise PipelineError(
            f"{path}: competition is {ens.competition!r} but config {ens.config} is for {cfg.competition!r}"
        )
    if ens.name is None:
        ens.name = path.stem.replace(" ", "_")
    return ens, cfg


# ---- blenders: (oof (M,N,K), test (M,T,K), y, folds) -> (oof blend, test blend, weights) ----

# ---- the stage -----------------------------------------------------------------------------


def blend_inputs(ens: EnsembleConfig, cfg: Config, members: list[Member]) -> dict:
    """The keyword arguments every blender gets (each takes what it uses); for ``gbm`` the table's scalar
    features, in the members' row order (read here, so bad data fails before anything is written)."""
    kw = {
        "stack_c": ens.stack_c,
        "metric": cfg.metric,
        "iterations": ens.iterations,
        "gbm": ens.gbm,
        "member_names": [m.name for m in members],
    }
    if ens.method == "gbm" and ens.gbm.scalars:
        from pipeline.ensemble.scalars import scalars_for

        train, names = scalars_for(cfg, "train", members[0].oof["id"])
        test, _ = scalars_for(cfg, "test", members[0].test["id"])
        kw.update(scalars=(train, test), scalar_names=names)
    return kw


def fold_blends(
    ens: EnsembleConfig, members: list[Member], class_names: list[str], y: np.ndarray, folds: np.ndarray, kw: dict
) -> dict[int, np.ndarray] | None:
    """Fold k's test prediction of the ensemble, for each fold: the members' fold-k models' own test
    predictions (``test_pred_fold<k>.csv``), blended by the method fitted on the other folds' OOF rows. No
    input saw fold k's validation labels, so it may label fold k's pseudo rows (pipeline/train/pseudo.py). Raw
    probabilities throughout, the blender refitted on raw OOF: a member's calibration was fitted on every
    fold's OOF labels. ``kw``: ``blend_inputs``. None (and a line saying so) when a member keeps no per-fold
    test predictions."""
    ks = [int(k) for k in np.unique(folds)]
    for m in members:
        stale = stale_predictions(m.run)
        if stale:
            log.info(
                f"note: {stale}; this ensemble keeps no per-fold test predictions "
                f"(rerun `pipeline predict` for {m.name})"
            )
            return None
        missing = next((m.run.test_pred_fold(k) for k in ks if not m.run.test_pred_fold(k).is_file()), None)
        if missing is not None:
            log.info(
                f"note: member {m.name} has no {missing.name}; this ensemble keeps no per-fold test predictions "
                f"and cannot be a pseudo-label source (rerun that member's `pipeline predict`)"
            )
            return None
    ids, tids = members[0].oof["id"], members[0].test["id"]
    oof = np.stack([m.raw_probs(m.oof_path, "oof", ids, class_names) for m in members])
    test = np.stack([m.raw_probs(m.test_path, "test", tids, class_names) for m in members])
    try:  # optional files: a bad one costs the per-fold blends, not the blend
        fold_tests = {
            k: np.stack([m.raw_probs(m.run.test_pred_fold(k), "test", tids, class_names) for m in members]) for k in ks
        }
    except PipelineError as e:
        log.info(f"note: {e}; this ensemble keeps no per-fold test predictions and cannot be a pseudo-label source")
        return None
    details: dict = {}
    build_blender(ens.method)(oof, test, y, folds, details=details, fold_tests=fold_tests, **kw)
    return details["fold_test"]


def _report_blend(
    ens: EnsembleConfig,
    metric: str,
    names: list[str],
    weights,
    details: dict,
    s: float,
    ll: float,
    best_name: str,
    best: float,
) -> None:
    """The blend's lines: its (nested) OOF score beside the best member's, what it chose, and a warning
    when it does not beat that member."""
    nested = ens.method in NESTED
    how = " (fitted on the other folds: nested)" if nested else ""
    log.info(
        f"blend  {ens.name} ({ens.method}){how}: OOF {fmt_scores(metric, s, ll)}; "
        f"best member {best_name}: {metric} {best:.4f}"
    )
    if "in_sample_score" in details:
        log.info(
            f"in-sample {metric} {details['in_sample_score']:.4f} (selected and scored on all rows: optimistic), "
            f"nested {s:.4f}"
        )
    if ens.method == "hillclimb":
        log.info("chosen: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights) if w > 0))
    elif weights is not None:
        log.info("weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights)))
    if "best_iterations" in details:
        log.info(
            f"gbm: best rounds per fold {list(details['best_iterations'].values())}, "
            f"test model {details['test_rounds']} "
            f"rounds on {len(details['feature_names'])} features ({', '.join(details['feature_names'])})"
        )
    if not (s > best if GREATER_IS_BETTER[metric] else s < best):
        log.info(
            f"warning: the blend's OOF {metric} {s:.4f}{' (nested)' if nested else ''} is not better than the best "
            f"member's ({best_name}: {best:.4f})"
        )


def run_ensemble(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    ens: EnsembleConfig | None = None,
    cfg: Config | None = None,
) -> Path:
    """Blend the members, print member and blend OOF scores, write runs/<comp>/<name>/ and a submission.

    ``ens`` and ``cfg`` given (``pipeline zoo``): that blend, built in memory with its name set; ``path`` is
    then the file it came from, named in messages (members resolve against the cwd, then its folder)."""
    from pipeline.config.auto import resolve_clip

    path = Path(path)
    ens, cfg = (ens, cfg) if ens is not None and cfg is not None else load_ensemble(path, overrides)
    out = RunDir.named(cfg, ens.name)
    if out.snapshot("train").exists():
        raise PipelineError(
            f"{path}: name {ens.name!r} is a trained experiment in {out}; give the ensemble another name"
        )
    members = _load_members(ens, cfg, path)
    class_names = check_members(members, path)
    _warn_tta_mismatch(members)
    first = members[0]
    y, folds = first.oof["target"].to_numpy(int), first.oof["fold"].to_numpy(int)
    oof = np.stack([m.oof_probs(class_names) for m in members])
    test = np.stack([m.test_probs(class_names) for m in members])
    metric, better = cfg.metric, GREATER_IS_BETTER[cfg.metric]

    member_scores = _score_members(members, oof, y, metric)
    details: dict = {}
    kw = blend_inputs(ens, cfg, members)
    blend_oof, blend_test, weights = build_blender(ens.method)(oof, test, y, folds, details=details, **kw)
    clip = ens.clip if ens.clip is not None else resolve_clip(cfg)
    s, ll = score(metric, y, blend_oof), logloss(y, blend_oof)
    best_name = (max if better else min)(member_scores, key=lambda n: member_scores[n]["value"])
    names = [m.name for m in members]
    _report_blend(ens, metric, names, weights, details, s, ll, best_name, member_scores[best_name]["value"])
    ll_clip = None
    if clip is not None:
        ll_clip = logloss(y, clip_probs(blend_oof, clip))
        log.info(f"clipping to {list(clip)}: OOF logloss {ll:.4f} without, {ll_clip:.4f} with")

    fold_test = fold_blends(ens, members, class_names, y, folds, kw)

    info = {
        "experiments": names,
        "weights": weights,
        "method": ens.method,
        "metric": metric,
        "oof_score": s,
        "oof_nested": ens.method in NESTED,
        "oof_logloss": ll,
        "oof_logloss_clipped": ll_clip,
        "clip": list(clip) if clip else None,
        "best_member": {"name": best_name, "oof_score": member_scores[best_name]["value"]},
        "details": details,
        "member_scores": {n: {"oof_score": v["value"], "oof_logloss": v["ll"]} for n, v in member_scores.items()},
        "members": [str(m.run_dir) for m in members],
        "config_hashes": _config_hashes(members),
        "test_pred_folds": [out.test_pred_fold(k).name for k in fold_test] if fold_test else [],
        "ensemble_file": str(path),
    }
    blends = {"oof": blend_oof, "test": blend_test, "fold_test": fold_test or {}}
    return _write_blend(out, cfg, ens, path, first, class_names, blends, y=y, folds=folds, clip=clip, info=info)


def _load_members(ens: EnsembleConfig, cfg: Config, path: Path) -> list[Member]:
    """The members' run folders and prediction files, each experiment listed once."""
    runs_root = cfg.run_dir.parent.parent
    members = [load_member(e, i, path, ens.competition, runs_root) for i, e in enumerate(ens.members)]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PipelineError(f"{path}: members: experiment {dup!r} is listed twice")
    return members


def _warn_tta_mismatch(members: list[Member]) -> None:
    """Weights fitted on plain OOF then applied to TTA test predictions do not match: a warning per member."""
    for m in members:
        tta = m.info.get("tta") or ["identity"]
        if tta != ["identity"] and m.info.get("oof", "oof.csv") == "oof.csv":
            log.info(
                f"warning: member {m.name}'s test predictions use TTA {tta} but its OOF does not; "
                f"set predict.tta_oof=true and rerun its `pipeline predict` so the blend compares like with like"
            )


def _score_members(members: list[Member], oof: np.ndarray, y: np.ndarray, metric: str) -> dict:
    """Each member's OOF score and logloss, a line each: {name: {"value": .., "ll": ..}}."""
    member_scores = {}
    for m, p in zip(members, oof):
        member_scores[m.name] = {"value": score(metric, y, p), "ll": logloss(y, p)}
        log.info(f"member {m.name:<24} OOF {fmt_scores(metric, **member_scores[m.name])}")
    return member_scores


def _config_hashes(members: list[Member]) -> dict:
    return {m.name: {"train": m.run.snapshot_hash("train"), "predict": m.run.snapshot_hash("predict")} for m in members}


def _write_blend(
    out: RunDir,
    cfg: Config,
    ens: EnsembleConfig,
    path: Path,
    first: Member,
    class_names: list[str],
    blends: dict,
    *,
    y: np.ndarray,
    folds: np.ndarray,
    clip,
    info: dict,
) -> Path:
    """The blend's files and its submission; returns the submission's path. ``blends``: the OOF and test
    blends and fold k's own test blends (``fold_test``, maybe none).

    All or nothing: the blend's files are staged and checked, then the submission is written, then
    the files move into place, ensemble.json (what marks the folder an ensemble) last."""
    from pipeline.predict.submission import remove_submission, write_submission

    fold_test = blends["fold_test"]
    with out.staged("ensemble") as stage:
        write_predictions(
            stage.path(out.oof), pred_frame(first.oof["id"], blends["oof"], class_names, fold=folds, target=y), "oof"
        )
        test_path = stage.path(out.test_pred)
        write_predictions(test_path, pred_frame(first.test["id"], blends["test"], class_names), "test")
        for k, p in fold_test.items():  # fold k's own: a pseudo-label source's labels for fold k
            write_predictions(stage.path(out.test_pred_fold(k)), pred_frame(first.test["id"], p, class_names), "test")
        for k, p in out.test_pred_fold_files().items():
            if k not in fold_test:
                stage.remove(p)  # an earlier blend's
        blend = read_predictions(test_path, "test", class_names=class_names, hint=f"pipeline ensemble {path}")
        atomic_write_json(stage.path(out.ensemble_json), info)
        sub = write_submission(
            cfg, blend["id"].to_numpy(), clip_probs(probs_of(blend, class_names), clip), class_names, ens.name, info
        )
        stage.undo(lambda: remove_submission(sub))
    return sub
