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

import logging
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError, field_validator

from pipeline.config.schema import SEED_MAX, Config, _read_yaml, registered, apply_overrides, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.registry import Registry
from pipeline.config.options import Section
from pipeline.core.io import atomic_write_json
from pipeline.core.keys import known_keys
from pipeline.core.metrics import GREATER_IS_BETTER, logloss, score
from pipeline.predict.predictor import clip_probs, fmt_scores
from pipeline.runs.predictions import pcols, pred_frame, probs_of, read_classes, read_predictions, write_predictions
from pipeline.runs.layout import RunDir
from pipeline.tasks import build_task
from pipeline.runs.records import read_predict_info, stale_predictions

log = logging.getLogger(__name__)

EPS = 1e-15


class GbmConfig(Section):
    """``method: gbm``: LightGBM settings; the defaults suit a few hundred to a few thousand rows
    (small trees, and few rows per leaf so that a fold of 300 rows can still split)."""

    num_leaves: int = Field(7, ge=2, le=4096)
    min_data_in_leaf: int = Field(5, ge=1, le=1_000_000)
    learning_rate: float = Field(0.05, gt=0, le=1)
    rounds: int = Field(500, ge=1, le=100_000, description="most boosting rounds; early stopping usually stops sooner")
    early_stopping: int = Field(50, ge=1, le=100_000, description="rounds without a better inner-split log-loss before stopping")
    valid_share: float = Field(0.2, gt=0, lt=1, description="share of each fit's rows held out (stratified) to early-stop on")
    lambda_l2: float = Field(1.0, ge=0)
    feature_fraction: float = Field(1.0, gt=0, le=1)
    scalars: bool = Field(True, description="add the table's scalar features (pipeline/ensemble/scalars.py); false: the members' predictions only")
    seed: int = Field(0, ge=0, le=SEED_MAX)


# ``method:``: (oof, test, y, folds, **kw) -> (blended oof, blended test, weights); the blenders register below
BLENDERS = Registry("blender")


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
        return f"{path}: unknown key '{loc}'" + (f"; did you mean {', '.join(close)}?" if close else f"; expected {', '.join(keys)}")
    if e["type"] == "missing":
        return f"{path}: missing required key '{loc}'"
    got, msg = e.get("input"), e["msg"].removeprefix("Value error, ")
    got_s = "" if isinstance(got, (dict, list)) or "got" in msg or repr(got) in msg else f" (got {got!r})"
    return f"{path}: {loc}: {msg}{got_s}"


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

    def raw_probs(self, path: Path, kind: str, ids: pd.Series, class_names) -> np.ndarray:
        """A prediction file's uncalibrated probabilities in the row order of ``ids``."""
        df = read_predictions(path, kind, class_names=class_names, hint=f"pipeline predict <config of {self.name}>")
        if len(df) != len(ids) or set(df["id"]) != set(ids):
            raise PipelineError(f"{path}: predicts other ids than {self.oof_path if kind == 'oof' else self.test_path}; "
                                f"rerun `pipeline predict <config of {self.name}>`")
        return probs_of(df.set_index("id").reindex(ids), class_names)


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
    from pipeline.plan.store import planned

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
    info = read_predict_info(run)
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


def _fold_test(details: dict | None, fold_tests: dict | None, k: int, apply: Callable) -> None:
    """Fold k's blend of the members' fold-k test predictions (``fold_tests[k]``: (M, T, K)) by ``apply``,
    the blender as fitted for fold k's OOF rows (on the other folds), into ``details["fold_test"]``; what
    an ensemble's ``test_pred_fold<k>.csv`` holds, so it can label fold k's pseudo rows (pipeline/train/pseudo.py)."""
    if fold_tests is not None and details is not None:
        details.setdefault("fold_test", {})[int(k)] = apply(fold_tests[int(k)])


def _fold_tests_unfitted(details, fold_tests, fn: Callable) -> None:
    for k in fold_tests or {}:  # nothing fitted: every fold blends by the same rule
        _fold_test(details, fold_tests, k, fn)


def blend_mean(oof, test, y=None, folds=None, details=None, fold_tests=None, **_):
    m = oof.shape[0]
    _fold_tests_unfitted(details, fold_tests, lambda p: p.mean(0))
    return oof.mean(0), test.mean(0), [1 / m] * m


def _geometric(p: np.ndarray) -> np.ndarray:
    return _normalise(np.exp(np.log(np.clip(p, EPS, 1)).mean(0)))


def blend_geometric(oof, test, y=None, folds=None, details=None, fold_tests=None, **_):
    m = oof.shape[0]
    _fold_tests_unfitted(details, fold_tests, _geometric)
    return _geometric(oof), _geometric(test), [1 / m] * m


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


def blend_rank(oof, test, y=None, folds=None, details=None, fold_tests=None, **_):
    m = oof.shape[0]
    _fold_tests_unfitted(details, fold_tests, rank_average)
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


def blend_weights(oof, test, y, folds, details=None, fold_tests=None, **_):
    out = np.empty(oof.shape[1:])
    for k in np.unique(folds):  # honest OOF: weights fitted on the other folds
        tr, va = folds != k, folds == k
        wk = optimise_weights(oof[:, tr], y[tr])
        out[va] = np.tensordot(wk, oof[:, va], 1)
        _fold_test(details, fold_tests, k, lambda p: np.tensordot(wk, p, 1))
    w = optimise_weights(oof, y)
    return out, np.tensordot(w, test, 1), w.tolist()


def stack_features(p: np.ndarray) -> np.ndarray:
    """Members' predictions (M, N, K) as the task's second-stage columns, side by side: (N, M*K')
    (binary: log-odds; multiclass: log-probabilities)."""
    return build_task(p.shape[2]).stack_features(p)


def _lr_fit(x_tr, y_tr, k, c) -> Callable:
    """A logistic regression fitted on (x_tr, y_tr): features -> (n, k) probabilities."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=c, max_iter=2000).fit(x_tr, y_tr)

    def proba(x):
        out = np.full((len(x), k), EPS)
        out[:, lr.classes_] = lr.predict_proba(x)
        return _normalise(out)

    return proba


def blend_stack(oof, test, y, folds, stack_c: float = 1.0, details=None, fold_tests=None, **_):
    """Logistic regression on the members' OOF predictions; its own OOF from the same folds."""
    k = oof.shape[2]
    x, xt = stack_features(oof), stack_features(test)
    out = np.empty((len(y), k))
    for f in np.unique(folds):
        tr, va = folds != f, folds == f
        proba = _lr_fit(x[tr], y[tr], k, stack_c)
        out[va] = proba(x[va])
        _fold_test(details, fold_tests, f, lambda p: proba(stack_features(p)))
    return out, _lr_fit(x, y, k, stack_c)(xt), None


def hillclimb_weights(p: np.ndarray, y: np.ndarray, metric: str = "logloss", iterations: int = 50) -> np.ndarray:
    """Ensemble selection (Caruana et al. 2004, as AutoGluon's weighted ensemble): start from the best
    single member, then ``iterations`` times add (with replacement) the member whose addition makes the
    running average score best on ``metric``, worse or not; the weights are the pick counts of the best
    prefix of that path, normalised. Ties go to the lower member index and to the shorter prefix, so the
    same inputs always give the same weights."""
    m = p.shape[0]
    sign = 1.0 if GREATER_IS_BETTER[metric] else -1.0

    def value(q):  # larger is better; a NaN score (AUC of rows without one class) counts as the worst
        v = score(metric, y, q)
        return -np.inf if np.isnan(v) else sign * v

    first = int(np.argmax([value(p[j]) for j in range(m)]))
    counts = np.zeros(m, np.int64)
    counts[first] = 1
    total = p[first].astype(np.float64)
    best_value, best_counts = value(total), counts.copy()
    for n in range(2, iterations + 2):  # n members in the average after this addition
        cand = [value((total + p[j]) / n) for j in range(m)]
        j = int(np.argmax(cand))
        counts[j] += 1
        total += p[j]
        if cand[j] > best_value:
            best_value, best_counts = cand[j], counts.copy()
    return best_counts / best_counts.sum()


def blend_hillclimb(oof, test, y, folds, metric: str = "logloss", iterations: int = 50, details: dict | None = None,
                    fold_tests=None, **_):
    """Ensemble selection fitted fold by fold (nested OOF); ``details`` (if given) gets each fold's weights
    and the in-sample score of the selection on all rows."""
    out = np.empty(oof.shape[1:])
    per_fold = {}
    for k in np.unique(folds):  # fold k's rows are blended by weights selected on the other folds only
        tr, va = folds != k, folds == k
        w = hillclimb_weights(oof[:, tr], y[tr], metric, iterations)
        out[va] = np.tensordot(w, oof[:, va], 1)
        per_fold[int(k)] = w.tolist()
        _fold_test(details, fold_tests, k, lambda p: np.tensordot(w, p, 1))
    w = hillclimb_weights(oof, y, metric, iterations)
    if details is not None:
        details.update(iterations=iterations, fold_weights=per_fold,
                       in_sample_score=score(metric, y, np.tensordot(w, oof, 1)))
    return out, np.tensordot(w, test, 1), w.tolist()


# ---- gbm: LightGBM over the members' predictions and the table's scalar features --------------

def gbm_feature_names(m: int, k: int, member_names: list[str] | None = None, scalar_names: list[str] | None = None) -> list[str]:
    """Column names of ``stack_features`` for ``m`` members of ``k`` classes, then the scalar features."""
    names = member_names or [f"m{i}" for i in range(m)]
    return build_task(k).stack_names(names, k) + list(scalar_names or [])


def _gbm_params(k: int, s: GbmConfig) -> dict:
    return {**build_task(k).gbm_params(k), "num_leaves": s.num_leaves, "min_data_in_leaf": s.min_data_in_leaf,
            "learning_rate": s.learning_rate, "lambda_l2": s.lambda_l2, "feature_fraction": s.feature_fraction, "seed": s.seed,
            # same inputs, same trees: one thread and LightGBM's deterministic mode
            "deterministic": True, "force_row_wise": True, "num_threads": 1, "verbose": -1}


def _inner_split(y: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    try:
        return next(StratifiedShuffleSplit(1, test_size=share, random_state=seed).split(y, y))
    except ValueError:  # a class too small to stratify: a plain shuffle split
        return next(ShuffleSplit(1, test_size=share, random_state=seed).split(y))


def gbm_fit(x: np.ndarray, y: np.ndarray, k: int, s: GbmConfig, rounds: int | None = None):
    """One LightGBM model on rows ``x``: ``rounds`` boosting rounds, or (None) early-stopped on a stratified
    ``s.valid_share`` of these rows. Returns (booster, rounds it predicts with)."""
    import lightgbm as lgb

    params = _gbm_params(k, s)
    if rounds is not None:
        return lgb.train(params, lgb.Dataset(x, y), num_boost_round=rounds), rounds
    fit, stop = _inner_split(y, s.valid_share, s.seed)
    train = lgb.Dataset(x[fit], y[fit])
    booster = lgb.train(params, train, num_boost_round=s.rounds, valid_sets=[lgb.Dataset(x[stop], y[stop], reference=train)],
                        callbacks=[lgb.early_stopping(s.early_stopping, verbose=False)])
    return booster, int(booster.best_iteration or s.rounds)


def gbm_predict(booster, x: np.ndarray, rounds: int, k: int) -> np.ndarray:
    return _normalise(np.clip(build_task(k).gbm_probs(booster.predict(x, num_iteration=rounds)), EPS, 1))


def blend_gbm(oof, test, y, folds, gbm: GbmConfig | dict | None = None, scalars: tuple[np.ndarray, np.ndarray] | None = None,
              scalar_names: list[str] | None = None, member_names: list[str] | None = None, details: dict | None = None,
              fold_tests=None, **_):
    """LightGBM on ``stack_features`` plus ``scalars`` (train rows, test rows), fitted fold by fold: fold k
    is predicted by a model that never saw its rows; the test model is fitted on all rows for the median of
    the folds' early-stopped rounds. ``gbm``: GbmConfig or a dict of its keys."""
    s = gbm if isinstance(gbm, GbmConfig) else GbmConfig(**(gbm or {}))
    k = oof.shape[2]

    def features(p, part):  # part: 0 with the training rows' scalars, 1 with the test rows'
        f = stack_features(p)
        return f if scalars is None else np.concatenate([f, scalars[part]], 1)

    x, xt = features(oof, 0), features(test, 1)
    out = np.empty((len(y), k))
    best = {}
    for f in np.unique(folds):
        tr, va = folds != f, folds == f
        booster, best[int(f)] = gbm_fit(x[tr], y[tr], k, s)
        out[va] = gbm_predict(booster, x[va], best[int(f)], k)
        _fold_test(details, fold_tests, f, lambda p: gbm_predict(booster, features(p, 1), best[int(f)], k))
    rounds = max(1, int(round(float(np.median(list(best.values()))))))
    booster, _ = gbm_fit(x, y, k, s, rounds=rounds)
    if details is not None:
        names = gbm_feature_names(oof.shape[0], k, member_names, scalar_names if scalars is not None else None)
        gain = booster.feature_importance("gain")
        details.update(best_iterations=best, test_rounds=rounds, feature_names=names, settings=s.model_dump(),
                       importance_gain={n: round(float(g), 4) for n, g in zip(names, gain)})
    return out, gbm_predict(booster, xt, rounds, k), None


for _name, _blend in (("mean", blend_mean), ("geometric", blend_geometric), ("rank", blend_rank), ("weights", blend_weights),
                     ("stack", blend_stack), ("hillclimb", blend_hillclimb), ("gbm", blend_gbm)):
    BLENDERS.register(_name, _blend)
NESTED = ("weights", "stack", "hillclimb", "gbm")  # fitted on the other folds' OOF rows: their OOF score is nested


def build_blender(method: str) -> Callable:
    if method not in BLENDERS:
        raise PipelineError(f"method: {BLENDERS.unknown(method)}")
    return BLENDERS.get(method)


# ---- the stage -----------------------------------------------------------------------------

def blend_inputs(ens: EnsembleConfig, cfg: Config, members: list[Member]) -> dict:
    """The keyword arguments every blender gets (each takes what it uses); for ``gbm`` the table's scalar
    features, in the members' row order (read here, so bad data fails before anything is written)."""
    kw = {"stack_c": ens.stack_c, "metric": cfg.metric, "iterations": ens.iterations, "gbm": ens.gbm,
          "member_names": [m.name for m in members]}
    if ens.method == "gbm" and ens.gbm.scalars:
        from pipeline.ensemble.scalars import scalars_for

        train, names = scalars_for(cfg, "train", members[0].oof["id"])
        test, _ = scalars_for(cfg, "test", members[0].test["id"])
        kw.update(scalars=(train, test), scalar_names=names)
    return kw


def fold_blends(ens: EnsembleConfig, members: list[Member], class_names: list[str], y: np.ndarray, folds: np.ndarray,
                kw: dict) -> dict[int, np.ndarray] | None:
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
            log.info(f"note: {stale}; this ensemble keeps no per-fold test predictions (rerun `pipeline predict` for {m.name})")
            return None
        missing = next((m.run.test_pred_fold(k) for k in ks if not m.run.test_pred_fold(k).is_file()), None)
        if missing is not None:
            log.info(f"note: member {m.name} has no {missing.name}; this ensemble keeps no per-fold test predictions "
                     f"and cannot be a pseudo-label source (rerun that member's `pipeline predict`)")
            return None
    ids, tids = members[0].oof["id"], members[0].test["id"]
    oof = np.stack([m.raw_probs(m.oof_path, "oof", ids, class_names) for m in members])
    test = np.stack([m.raw_probs(m.test_path, "test", tids, class_names) for m in members])
    try:  # optional files: a bad one costs the per-fold blends, not the blend
        fold_tests = {k: np.stack([m.raw_probs(m.run.test_pred_fold(k), "test", tids, class_names) for m in members]) for k in ks}
    except PipelineError as e:
        log.info(f"note: {e}; this ensemble keeps no per-fold test predictions and cannot be a pseudo-label source")
        return None
    details: dict = {}
    build_blender(ens.method)(oof, test, y, folds, details=details, fold_tests=fold_tests, **kw)
    return details["fold_test"]


def _report_blend(ens: EnsembleConfig, metric: str, names: list[str], weights, details: dict, s: float, ll: float,
                  best_name: str, best: float) -> None:
    """The blend's lines: its (nested) OOF score beside the best member's, what it chose, and a warning
    when it does not beat that member."""
    nested = ens.method in NESTED
    how = " (fitted on the other folds: nested)" if nested else ""
    log.info(f"blend  {ens.name} ({ens.method}){how}: OOF {fmt_scores(metric, s, ll)}; best member {best_name}: {metric} {best:.4f}")
    if "in_sample_score" in details:
        log.info(f"in-sample {metric} {details['in_sample_score']:.4f} (selected and scored on all rows: optimistic), "
                 f"nested {s:.4f}")
    if ens.method == "hillclimb":
        log.info("chosen: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights) if w > 0))
    elif weights is not None:
        log.info("weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights)))
    if "best_iterations" in details:
        log.info(f"gbm: best rounds per fold {list(details['best_iterations'].values())}, test model {details['test_rounds']} "
                 f"rounds on {len(details['feature_names'])} features ({', '.join(details['feature_names'])})")
    if not (s > best if GREATER_IS_BETTER[metric] else s < best):
        log.info(f"warning: the blend's OOF {metric} {s:.4f}{' (nested)' if nested else ''} is not better than the best "
                 f"member's ({best_name}: {best:.4f})")


def run_ensemble(path: str | Path, overrides: list[str] | None = None, *, ens: EnsembleConfig | None = None,
                 cfg: Config | None = None) -> Path:
    """Blend the members, print member and blend OOF scores, write runs/<comp>/<name>/ and a submission.

    ``ens`` and ``cfg`` given (``pipeline zoo``): that blend, built in memory with its name set; ``path`` is
    then the file it came from, named in messages (members resolve against the cwd, then its folder)."""
    from pipeline.config.auto import resolve_clip
    from pipeline.predict.submission import remove_submission, write_submission

    path = Path(path)
    ens, cfg = (ens, cfg) if ens is not None and cfg is not None else load_ensemble(path, overrides)
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
    details: dict = {}
    kw = blend_inputs(ens, cfg, members)
    blend_oof, blend_test, weights = build_blender(ens.method)(oof, test, y, folds, details=details, **kw)
    clip = ens.clip if ens.clip is not None else resolve_clip(cfg)
    s, ll = score(metric, y, blend_oof), logloss(y, blend_oof)
    best_name = (max if better else min)(member_scores, key=lambda n: member_scores[n]["value"])
    _report_blend(ens, metric, names, weights, details, s, ll, best_name, member_scores[best_name]["value"])
    ll_clip = None
    if clip is not None:
        ll_clip = logloss(y, clip_probs(blend_oof, clip))
        log.info(f"clipping to {list(clip)}: OOF logloss {ll:.4f} without, {ll_clip:.4f} with")

    fold_test = fold_blends(ens, members, class_names, y, folds, kw)

    hashes = {m.name: {"train": m.run.snapshot_hash("train"), "predict": m.run.snapshot_hash("predict")} for m in members}
    info = {"experiments": names, "weights": weights, "method": ens.method, "metric": metric, "oof_score": s,
            "oof_nested": ens.method in NESTED, "oof_logloss": ll, "oof_logloss_clipped": ll_clip, "clip": list(clip) if clip else None,
            "best_member": {"name": best_name, "oof_score": member_scores[best_name]["value"]}, "details": details,
            "member_scores": {n: {"oof_score": v["value"], "oof_logloss": v["ll"]} for n, v in member_scores.items()},
            "members": [str(m.run_dir) for m in members], "config_hashes": hashes,
            "test_pred_folds": [out.test_pred_fold(k).name for k in fold_test] if fold_test else [],
            "ensemble_file": str(path)}
    # All or nothing: the blend's files are staged and checked, then the submission is written, then
    # the files move into place, ensemble.json (what marks the folder an ensemble) last.
    with out.staged("ensemble") as stage:
        write_predictions(stage.path(out.oof), pred_frame(first.oof["id"], blend_oof, class_names, fold=folds, target=y), "oof")
        test_path = stage.path(out.test_pred)
        write_predictions(test_path, pred_frame(first.test["id"], blend_test, class_names), "test")
        for k, p in (fold_test or {}).items():  # fold k's own: a pseudo-label source's labels for fold k
            write_predictions(stage.path(out.test_pred_fold(k)), pred_frame(first.test["id"], p, class_names), "test")
        for k, p in out.test_pred_fold_files().items():
            if k not in (fold_test or {}):
                stage.remove(p)  # an earlier blend's
        blend = read_predictions(test_path, "test", class_names=class_names, hint=f"pipeline ensemble {path}")
        atomic_write_json(stage.path(out.ensemble_json), info)
        sub = write_submission(cfg, blend["id"].to_numpy(), clip_probs(probs_of(blend, class_names), clip), class_names, ens.name, info)
        stage.undo(lambda: remove_submission(sub))
    return sub
