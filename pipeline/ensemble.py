"""Ensemble stage: blend experiments that share a folds file -> runs/<competition>/<name>/ + submissions/.

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
same way (``predict.json`` names them: ``oof.csv`` or ``oof_tta.csv``, with the same temperature).
Members must agree on ids, targets and folds. ``weights`` and ``stack`` are fitted on OOF predictions
with the folds themselves (for each fold: fit on the other folds, predict this one), so their printed
OOF scores are honest; the test blend uses the fit on all OOF rows.
"""
from __future__ import annotations

import logging
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import Config, _read_yaml, apply_overrides, load_config, read_stage_hash
from .errors import PipelineError
from .io import atomic_write_csv, atomic_write_json
from .metrics import GREATER_IS_BETTER, logloss, score
from .predict import apply_temperature, clip_probs, fmt_scores, pred_frame

log = logging.getLogger(__name__)

EPS = 1e-15


class EnsembleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    name: str
    run_dir: Path
    oof: pd.DataFrame
    test: pd.DataFrame
    info: dict

    def oof_probs(self, cols) -> np.ndarray:
        return self.oof[cols].to_numpy(np.float64)

    def test_probs(self, cols) -> np.ndarray:
        return self.test[cols].to_numpy(np.float64)


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
    cfg = load_config(cpath)
    if cfg.competition != ens.competition:
        raise PipelineError(f"{path}: competition is {ens.competition!r} but config {ens.config} is for {cfg.competition!r}")
    if ens.name is None:
        ens.name = path.stem.replace(" ", "_")
    return ens, cfg


def load_member(entry: str, i: int, path: Path, competition: str) -> Member:
    where = f"{path}: members[{i}]"
    found = _resolve(entry, path.parent)
    if found is None:
        raise PipelineError(f"{where}: {entry} not found; expected a run directory (runs/<competition>/<experiment>) or an experiment config")
    if found.is_dir():
        run = found
        if run.parent.parent.name == "runs" and run.parent.name != competition:
            raise PipelineError(f"{where}: {entry} is a run of {run.parent.name!r}; expected a run of {competition!r}")
    elif found.suffix in (".yaml", ".yml"):
        mcfg = load_config(found, check_data=False)
        if mcfg.competition != competition:
            raise PipelineError(f"{where}: {entry} is an experiment of {mcfg.competition!r}; expected {competition!r}")
        run = mcfg.run_dir
    else:
        raise PipelineError(f"{where}: {entry} is neither a run directory nor a YAML config")
    info = {}
    if (run / "predict.json").is_file():
        info = json.loads((run / "predict.json").read_text())
    for f in ("test_pred.csv", info.get("oof", "oof.csv")):
        if not (run / f).is_file():
            raise PipelineError(f"{where}: {run / f} not found; run `pipeline predict` for that experiment first")
    oof = pd.read_csv(run / info.get("oof", "oof.csv"), dtype={"id": str})
    test = pd.read_csv(run / "test_pred.csv", dtype={"id": str})
    t = info.get("temperature")
    if t:  # the OOF gets the same temperature as the member's test predictions
        cols = [c for c in oof.columns if c.startswith("p_")]
        oof[cols] = apply_temperature(oof[cols].to_numpy(np.float64), t)
    return Member(run.name, run, oof, test, info)


def check_members(members: list[Member], path: Path) -> list[str]:
    """Same classes, ids, targets and folds; aligns every member to the first one's row order."""
    first = members[0]
    cols = [c for c in first.oof.columns if c.startswith("p_")]
    for m in members:
        mc = [c for c in m.oof.columns if c.startswith("p_")]
        tc = [c for c in m.test.columns if c.startswith("p_")]
        if mc != cols or tc != cols:
            raise PipelineError(f"{path}: member {m.name} predicts classes {mc or tc}; expected {cols} like {first.name}")
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
    return cols


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
    from .submission import write_submission

    path = Path(path)
    ens, cfg = load_ensemble(path, overrides)
    out = cfg.run_dir.parent / ens.name
    if (out / "config.train.yaml").exists():
        raise PipelineError(f"{path}: name {ens.name!r} is a trained experiment in {out}; give the ensemble another name")
    members = [load_member(e, i, path, ens.competition) for i, e in enumerate(ens.members)]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PipelineError(f"{path}: members: experiment {dup!r} is listed twice")
    cols = check_members(members, path)
    for m in members:  # weights fitted on plain OOF then applied to TTA test predictions do not match
        tta = m.info.get("tta") or ["identity"]
        if tta != ["identity"] and m.info.get("oof", "oof.csv") == "oof.csv":
            log.info(f"warning: member {m.name}'s test predictions use TTA {tta} but its OOF does not; "
                 f"set predict.tta_oof=true and rerun its `pipeline predict` so the blend compares like with like")
    class_names = [c[2:] for c in cols]
    first = members[0]
    y, folds = first.oof["target"].to_numpy(int), first.oof["fold"].to_numpy(int)
    oof = np.stack([m.oof_probs(cols) for m in members])
    test = np.stack([m.test_probs(cols) for m in members])
    metric, better = cfg.metric, GREATER_IS_BETTER[cfg.metric]

    member_scores = {}
    for m, p in zip(members, oof):
        member_scores[m.name] = {"value": score(metric, y, p), "ll": logloss(y, p)}
        log.info(f"member {m.name:<24} OOF {fmt_scores(metric, **member_scores[m.name])}")
    blend_oof, blend_test, weights = build_blender(ens.method)(oof, test, y, folds, stack_c=ens.stack_c)
    clip = ens.clip if ens.clip is not None else cfg.predict.clip
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

    atomic_write_csv(out / "oof.csv", pred_frame(first.oof["id"], blend_oof, class_names, {"fold": folds, "target": y}), float_format="%.8g")
    atomic_write_csv(out / "test_pred.csv", pred_frame(first.test["id"], blend_test, class_names), float_format="%.8g")
    hashes = {m.name: {"train": read_stage_hash(m.run_dir / "config.train.yaml"),
                       "predict": read_stage_hash(m.run_dir / "config.predict.yaml")} for m in members}
    info = {"experiments": names, "weights": weights, "method": ens.method, "metric": metric, "oof_score": s,
            "oof_logloss": ll, "oof_logloss_clipped": ll_clip, "clip": list(clip) if clip else None,
            "member_scores": {n: {"oof_score": v["value"], "oof_logloss": v["ll"]} for n, v in member_scores.items()},
            "members": [str(m.run_dir) for m in members], "config_hashes": hashes,
            "ensemble_file": str(path)}
    atomic_write_json(out / "ensemble.json", info)
    return write_submission(cfg, first.test["id"].to_numpy(), clip_probs(blend_test, clip), class_names, ens.name, info)
