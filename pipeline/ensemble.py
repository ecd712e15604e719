"""Ensemble stage: blend experiments that share a folds file -> <paths.runs>/<competition>/<name>/ + a submission.

The ensemble YAML (validated; errors are one line naming the key)::

    competition: iceberg-demo
    config: iceberg-demo.yaml          # base competition config (data format, metric, test ids)
    members:                           # run directories or experiment configs (2 or more)
      - runs/iceberg-demo/iceberg-demo
      - competitions/iceberg-demo-b.yaml
    method: mean                       # mean | geometric | rank | weights | stack
    clip: [0.001, 0.999]               # optional; default the base config's predict.clip
    name: iceberg-blend                # optional; default the file's stem

Each member contributes its test predictions (``test_pred.csv``) and the OOF predictions made the
same way (``predict.json`` names them: ``oof.csv`` or ``oof_tta.csv``), both read through one rule:
calibrated as the member's evaluation kept (temperature and shrink, its ``calibration.json``), else raw.
Members must agree on ids, targets and folds. ``weights`` and ``stack`` are fitted on OOF predictions
with the folds themselves (for each fold: fit on the other folds, predict this one), so their printed
OOF scores are honest; the test blend uses the fit on all OOF rows.
"""
from __future__ import annotations

import logging
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError, field_validator

from .config import Config, _read_yaml, apply_overrides, load_config
from .errors import PipelineError
from .formats.options import Section
from .io import atomic_write_json
from .metrics import GREATER_IS_BETTER, logloss, score
from .predict import clip_probs, fmt_scores
from .predictions import pcols, pred_frame, probs_of, read_classes, read_predictions, write_predictions
from .runs import RunDir

log = logging.getLogger(__name__)

EPS = 1e-15


class EnsembleConfig(Section):  # the config's rules: unknown keys, non-finite numbers, booleans as numbers fail

    competition: str
    config: str
    members: list[str] = Field(min_length=2)
    method: Literal["mean", "geometric", "rank", "weights", "stack"] = "mean"
    clip: tuple[float, float] | None = None
    name: str | None = None
    stack_c: float = Field(1.0, gt=0, description="inverse regularisation strength of the stacking logistic regression")

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
        close = difflib.get_close_matches(loc, list(EnsembleConfig.model_fields), n=3)
        return f"{path}: unknown key '{loc}'" + (f"; did you mean {', '.join(close)}?" if close else
                                                f"; expected {', '.join(EnsembleConfig.model_fields)}")
    if e["type"] == "missing":
        return f"{path}: missing required key '{loc}'"
    got = e.get("input")
    got_s = "" if isinstance(got, (dict, list)) or "got" in e["msg"] else f" (got {got!r})"
    return f"{path}: {loc}: {e['msg'].removeprefix('Value error, ')}{got_s}"


def _resolve(p: str, base: Path) -> Path | None:
    """A path as written (relative to the cwd), else relative to the ensemble file."""
    for cand in (Path(p).expanduser(), base / p):
        if cand.exists():
            return cand
    return None


@dataclass
class Member:
    """An experiment in the blend: its run folder, predict.json and (once read) its predictions."""

    name: str
    run: RunDir
    info: dict
    oof_path: Path
    test_path: Path
    oof: pd.DataFrame | None = None
    test: pd.DataFrame | None = None

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def read(self, class_names: list[str]) -> None:
        """OOF and test predictions through the one rule: both calibrated as the member kept."""
        hint = f"pipeline predict <config of {self.name}>"
        self.oof = read_predictions(self.oof_path, "oof", class_names=class_names, scaled=True, hint=hint)
        self.test = read_predictions(self.test_path, "test", class_names=class_names, scaled=True, hint=hint)

    def oof_probs(self, class_names) -> np.ndarray:
        return probs_of(self.oof, class_names)

    def test_probs(self, class_names) -> np.ndarray:
        return probs_of(self.test, class_names)


def load_ensemble(path: str | Path, overrides: list[str] | None = None) -> tuple[EnsembleConfig, Config]:
    path = Path(path)
    d = _read_yaml(path)
    if overrides:
        d = apply_overrides(d, overrides)
    if "members" not in d and "data" in d:
        raise PipelineError(f"{path}: is a competition config, not an ensemble file; expected keys competition, config, members, method")
    try:
        ens = EnsembleConfig(**d)
    except ValidationError as err:
        raise PipelineError(_format_error(path, err)) from None
    cpath = _resolve(ens.config, path.parent)
    if cpath is None:
        raise PipelineError(f"{path}: config: {ens.config} not found (looked in {Path.cwd()} and {path.parent})")
    from .plan import planned

    cfg = planned(load_config(cpath), create=False)
    if cfg.competition != ens.competition:
        raise PipelineError(f"{path}: competition is {ens.competition!r} but config {ens.config} is for {cfg.competition!r}")
    if ens.name is None:
        ens.name = path.stem.replace(" ", "_")
    return ens, cfg


def load_member(entry: str, i: int, path: Path, competition: str, runs_root: Path) -> Member:
    """Find member ``i``'s run folder (``entry``: a run folder or an experiment config) and its prediction files."""
    where = f"{path}: members[{i}]"
    found = _resolve(entry, path.parent)
    if found is None:
        raise PipelineError(f"{where}: {entry} not found; expected a run directory ({runs_root}/<competition>/<experiment>) or an experiment config")
    if found.is_dir():
        run = RunDir(path=found)
        if found.parent.parent.name == runs_root.name and found.parent.name != competition:
            raise PipelineError(f"{where}: {entry} is a run of {found.parent.name!r}; expected a run of {competition!r}")
    elif found.suffix in (".yaml", ".yml"):
        mcfg = load_config(found, check_data=False)
        if mcfg.competition != competition:
            raise PipelineError(f"{where}: {entry} is an experiment of {mcfg.competition!r}; expected {competition!r}")
        run = RunDir.of(mcfg)
    else:
        raise PipelineError(f"{where}: {entry} is neither a run directory nor a YAML config")
    info = run.read_predict_info()
    oof_path, test_path = run.oof_file(info.get("oof", "oof.csv")), run.test_pred
    for f in (test_path, oof_path):
        if not f.is_file():
            raise PipelineError(f"{where}: {f} not found; run `pipeline predict` for that experiment first")
    return Member(run.name, run, info, oof_path, test_path)


def check_members(members: list[Member], path: Path) -> list[str]:
    """Same classes, ids, targets and folds; reads every member and aligns it to the first one's row
    order. Returns the class names."""
    first = members[0]
    class_names = read_classes(first.oof_path, "oof")
    for m in members:  # from the headers: a member of other classes is named before its rows are checked
        mc, tc = read_classes(m.oof_path, "oof"), read_classes(m.test_path, "test")
        if mc != class_names or tc != class_names:
            raise PipelineError(f"{path}: member {m.name} predicts classes {pcols(mc or tc)}; expected {pcols(class_names)} like {first.name}")
    for m in members:
        m.read(class_names)
    ids, tids = pd.Index(first.oof["id"]), pd.Index(first.test["id"])
    for m in members[1:]:
        if set(m.oof["id"]) != set(ids) or len(m.oof) != len(ids):
            raise PipelineError(f"{path}: member {m.name} has OOF predictions for other training ids than {first.name}; "
                                f"expected experiments of the same training data")
        if set(m.test["id"]) != set(tids) or len(m.test) != len(tids):
            raise PipelineError(f"{path}: member {m.name} predicts other test ids than {first.name}; rerun its `pipeline predict`")
        m.oof = m.oof.set_index("id").reindex(ids).reset_index()
        m.test = m.test.set_index("id").reindex(tids).reset_index()
        diff = m.oof["fold"].to_numpy() != first.oof["fold"].to_numpy()
        if diff.any():
            j = int(np.flatnonzero(diff)[0])
            raise PipelineError(f"{path}: members {first.name} and {m.name} were trained on different folds "
                                f"({int(diff.sum())} rows differ, e.g. id {ids[j]!r}: fold {first.oof['fold'][j]} vs {m.oof['fold'][j]}); "
                                f"expected experiments that share one folds file")
        if (m.oof["target"].to_numpy() != first.oof["target"].to_numpy()).any():
            raise PipelineError(f"{path}: members {first.name} and {m.name} disagree on training labels; expected the same training data")
    return class_names


# ---- blenders: (oof (M,N,K), test (M,T,K), y, folds) -> (oof blend, test blend, weights) ----

def _normalise(p: np.ndarray) -> np.ndarray:
    return p / p.sum(-1, keepdims=True)


def blend_mean(oof, test, y=None, folds=None, **_):
    m = oof.shape[0]
    return oof.mean(0), test.mean(0), [1 / m] * m


def blend_geometric(oof, test, y=None, folds=None, **_):
    g = lambda p: _normalise(np.exp(np.log(np.clip(p, EPS, 1)).mean(0)))  # noqa: E731
    m = oof.shape[0]
    return g(oof), g(test), [1 / m] * m


def rank_average(p: np.ndarray) -> np.ndarray:
    """Per class: average the members' ranks, then give the rows the arithmetic-mean blend's values in
    that order (so log-loss stays meaningful); rows renormalised."""
    from scipy.stats import rankdata

    m, n, k = p.shape
    mean = p.mean(0)
    out = np.empty((n, k))
    for c in range(k):
        r = np.mean([rankdata(p[i, :, c]) for i in range(m)], 0)
        pos = rankdata(r) - 1  # 0-based position of each row in the rank-average order (ties: midpoint)
        out[:, c] = np.interp(pos, np.arange(n), np.sort(mean[:, c]))
    return _normalise(out)


def blend_rank(oof, test, y=None, folds=None, **_):
    m = oof.shape[0]
    return rank_average(oof), rank_average(test), [1 / m] * m


def optimise_weights(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to one that minimise the log-loss of sum_m w_m p_m (SLSQP)."""
    from scipy.optimize import minimize

    m = p.shape[0]
    rows = np.arange(len(y))

    def loss(w):
        q = np.tensordot(w, p, 1)
        return -np.mean(np.log(np.clip(q[rows, y] / q.sum(1), EPS, 1)))

    res = minimize(loss, np.full(m, 1 / m), method="SLSQP", bounds=[(0, 1)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(res.x, 0, None)
    return w / w.sum()


def blend_weights(oof, test, y, folds, **_):
    out = np.empty(oof.shape[1:])
    for k in np.unique(folds):  # honest OOF: weights fitted on the other folds
        tr, va = folds != k, folds == k
        out[va] = np.tensordot(optimise_weights(oof[:, tr], y[tr]), oof[:, va], 1)
    w = optimise_weights(oof, y)
    return out, np.tensordot(w, test, 1), w.tolist()


def stack_features(p: np.ndarray) -> np.ndarray:
    """Members' log-odds (binary) or log-probabilities (multi-class), side by side: (N, M*K')."""
    lp = np.log(np.clip(p, 1e-6, 1))
    if p.shape[2] == 2:
        lp = lp[:, :, 1:] - lp[:, :, :1]
    return np.concatenate(list(lp), axis=1)


def _lr_proba(x_tr, y_tr, x, k, c):
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=c, max_iter=2000).fit(x_tr, y_tr)
    out = np.full((len(x), k), EPS)
    out[:, lr.classes_] = lr.predict_proba(x)
    return _normalise(out)


def blend_stack(oof, test, y, folds, stack_c: float = 1.0, **_):
    """Logistic regression on the members' OOF predictions; its own OOF from the same folds."""
    k = oof.shape[2]
    x, xt = stack_features(oof), stack_features(test)
    out = np.empty((len(y), k))
    for f in np.unique(folds):
        tr, va = folds != f, folds == f
        out[va] = _lr_proba(x[tr], y[tr], x[va], k, stack_c)
    return out, _lr_proba(x, y, xt, k, stack_c), None


BLENDERS: dict[str, Callable] = {"mean": blend_mean, "geometric": blend_geometric, "rank": blend_rank,
                                 "weights": blend_weights, "stack": blend_stack}


def build_blender(method: str) -> Callable:
    if method not in BLENDERS:
        raise PipelineError(f"method: unknown blender {method!r}; known: {', '.join(BLENDERS)}")
    return BLENDERS[method]


# ---- the stage -----------------------------------------------------------------------------

def run_ensemble(path: str | Path, overrides: list[str] | None = None) -> Path:
    """Blend the members, print member and blend OOF scores, write runs/<comp>/<name>/ and a submission."""
    from .submission import remove_submission, write_submission

    path = Path(path)
    ens, cfg = load_ensemble(path, overrides)
    out = RunDir.named(cfg, ens.name)
    if out.snapshot("train").exists():
        raise PipelineError(f"{path}: name {ens.name!r} is a trained experiment in {out}; give the ensemble another name")
    runs_root = cfg.run_dir.parent.parent
    members = [load_member(e, i, path, ens.competition, runs_root) for i, e in enumerate(ens.members)]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PipelineError(f"{path}: members: experiment {dup!r} is listed twice")
    class_names = check_members(members, path)
    for m in members:  # weights fitted on plain OOF then applied to TTA test predictions do not match
        tta = m.info.get("tta") or ["identity"]
        if tta != ["identity"] and m.info.get("oof", "oof.csv") == "oof.csv":
            log.info(f"warning: member {m.name}'s test predictions use TTA {tta} but its OOF does not; "
                 f"set predict.tta_oof=true and rerun its `pipeline predict` so the blend compares like with like")
    first = members[0]
    y, folds = first.oof["target"].to_numpy(int), first.oof["fold"].to_numpy(int)
    oof = np.stack([m.oof_probs(class_names) for m in members])
    test = np.stack([m.test_probs(class_names) for m in members])
    metric, better = cfg.metric, GREATER_IS_BETTER[cfg.metric]

    member_scores = {}
    for m, p in zip(members, oof):
        member_scores[m.name] = {"value": score(metric, y, p), "ll": logloss(y, p)}
        log.info(f"member {m.name:<24} OOF {fmt_scores(metric, **member_scores[m.name])}")
    blend_oof, blend_test, weights = build_blender(ens.method)(oof, test, y, folds, stack_c=ens.stack_c)
    from .defaults import resolve_clip

    clip = ens.clip if ens.clip is not None else resolve_clip(cfg)
    s, ll = score(metric, y, blend_oof), logloss(y, blend_oof)
    how = " (weights/stacker fitted on the other folds)" if ens.method in ("weights", "stack") else ""
    log.info(f"blend  {ens.name} ({ens.method}){how}: OOF {fmt_scores(metric, s, ll)}")
    if weights is not None:
        log.info("weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights)))
    ll_clip = None
    if clip is not None:
        ll_clip = logloss(y, clip_probs(blend_oof, clip))
        log.info(f"clipping to {list(clip)}: OOF logloss {ll:.4f} without, {ll_clip:.4f} with")
    best_name = (max if better else min)(member_scores, key=lambda n: member_scores[n]["value"])
    best = member_scores[best_name]["value"]
    if not (s > best if better else s < best):
        log.info(f"warning: the blend's OOF {metric} {s:.4f} is not better than the best member's ({best_name}: {best:.4f})")

    hashes = {m.name: {"train": m.run.snapshot_hash("train"), "predict": m.run.snapshot_hash("predict")} for m in members}
    info = {"experiments": names, "weights": weights, "method": ens.method, "metric": metric, "oof_score": s,
            "oof_logloss": ll, "oof_logloss_clipped": ll_clip, "clip": list(clip) if clip else None,
            "member_scores": {n: {"oof_score": v["value"], "oof_logloss": v["ll"]} for n, v in member_scores.items()},
            "members": [str(m.run_dir) for m in members], "config_hashes": hashes,
            "ensemble_file": str(path)}
    # All or nothing: the blend's files are staged and checked, then the submission is written, then
    # the files move into place, ensemble.json (what marks the folder an ensemble) last.
    with out.staged("ensemble") as stage:
        write_predictions(stage.path(out.oof), pred_frame(first.oof["id"], blend_oof, class_names, fold=folds, target=y), "oof")
        test_path = stage.path(out.test_pred)
        write_predictions(test_path, pred_frame(first.test["id"], blend_test, class_names), "test")
        blend = read_predictions(test_path, "test", class_names=class_names, hint=f"pipeline ensemble {path}")
        atomic_write_json(stage.path(out.ensemble_json), info)
        sub = write_submission(cfg, blend["id"].to_numpy(), clip_probs(probs_of(blend, class_names), clip), class_names, ens.name, info)
        stage.undo(lambda: remove_submission(sub))
    return sub
