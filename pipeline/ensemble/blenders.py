"""The blend methods of ``pipeline ensemble`` (``method:``), each an entry of ``BLENDERS``: a function
``(oof, test, y, folds, **kw) -> (blended oof, blended test, weights)`` over the members' predictions
(M, N, K). Those fitted on labels (``weights``, ``stack``, ``hillclimb``, ``gbm``) are fitted fold by
fold, so their OOF score is nested; ``details`` collects what they chose and ``fold_tests`` each fold's
own blend of the members' fold-k test predictions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import Field

from pipeline.config.options import Section
from pipeline.config.sections import SEED_MAX
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import GREATER_IS_BETTER, score
from pipeline.core.registry import Registry
from pipeline.tasks import build_task

EPS = 1e-15


class GbmConfig(Section):
    """``method: gbm``: LightGBM settings; the defaults suit a few hundred to a few thousand rows
    (small trees, and few rows per leaf so that a fold of 300 rows can still split)."""

    num_leaves: int = Field(7, ge=2, le=4096)
    min_data_in_leaf: int = Field(5, ge=1, le=1_000_000)
    learning_rate: float = Field(0.05, gt=0, le=1)
    rounds: int = Field(500, ge=1, le=100_000, description="most boosting rounds; early stopping usually stops sooner")
    early_stopping: int = Field(
        50, ge=1, le=100_000, description="rounds without a better inner-split log-loss before stopping"
    )
    valid_share: float = Field(
        0.2, gt=0, lt=1, description="share of each fit's rows held out (stratified) to early-stop on"
    )
    lambda_l2: float = Field(1.0, ge=0)
    feature_fraction: float = Field(1.0, gt=0, le=1)
    scalars: bool = Field(
        True,
        description="add the table's scalar features (pipeline/ensemble/scalars.py); "
        "false: the members' predictions only",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX)


# ``method:``: (oof, test, y, folds, **kw) -> (blended oof, blended test, weights); registered below
BLENDERS = Registry("blender")


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

    res = minimize(
        loss,
        np.full(m, 1 / m),
        method="SLSQP",
        bounds=[(0, 1)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    w = np.clip(res.x, 0, None)
    return w / w.sum()


def blend_weights(oof, test, y, folds, details=None, fold_tests=None, **_):
    out = np.empty(oof.shape[1:])
    for k in np.unique(folds):  # honest OOF: weights fitted on the other folds
        tr, va = folds != k, folds == k
        wk = optimise_weights(oof[:, tr], y[tr])
        out[va] = np.tensordot(wk, oof[:, va], 1)
        _fold_test(details, fold_tests, k, lambda p, wk=wk: np.tensordot(wk, p, 1))
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
        _fold_test(details, fold_tests, f, lambda p, proba=proba: proba(stack_features(p)))
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


def blend_hillclimb(
    oof,
    test,
    y,
    folds,
    metric: str = "logloss",
    iterations: int = 50,
    details: dict | None = None,
    fold_tests=None,
    **_,
):
    """Ensemble selection fitted fold by fold (nested OOF); ``details`` (if given) gets each fold's weights
    and the in-sample score of the selection on all rows."""
    out = np.empty(oof.shape[1:])
    per_fold = {}
    for k in np.unique(folds):  # fold k's rows are blended by weights selected on the other folds only
        tr, va = folds != k, folds == k
        w = hillclimb_weights(oof[:, tr], y[tr], metric, iterations)
        out[va] = np.tensordot(w, oof[:, va], 1)
        per_fold[int(k)] = w.tolist()
        _fold_test(details, fold_tests, k, lambda p, w=w: np.tensordot(w, p, 1))
    w = hillclimb_weights(oof, y, metric, iterations)
    if details is not None:
        details.update(
            iterations=iterations, fold_weights=per_fold, in_sample_score=score(metric, y, np.tensordot(w, oof, 1))
        )
    return out, np.tensordot(w, test, 1), w.tolist()


# ---- gbm: LightGBM over the members' predictions and the table's scalar features --------------


def gbm_feature_names(
    m: int, k: int, member_names: list[str] | None = None, scalar_names: list[str] | None = None
) -> list[str]:
    """Column names of ``stack_features`` for ``m`` members of ``k`` classes, then the scalar features."""
    names = member_names or [f"m{i}" for i in range(m)]
    return build_task(k).stack_names(names, k) + list(scalar_names or [])


def _gbm_params(k: int, s: GbmConfig) -> dict:
    return {
        **build_task(k).gbm_params(k),
        "num_leaves": s.num_leaves,
        "min_data_in_leaf": s.min_data_in_leaf,
        "learning_rate": s.learning_rate,
        "lambda_l2": s.lambda_l2,
        "feature_fraction": s.feature_fraction,
        "seed": s.seed,
        # same inputs, same trees: one thread and LightGBM's deterministic mode
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
        "verbose": -1,
    }


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
    booster = lgb.train(
        params,
        train,
        num_boost_round=s.rounds,
        valid_sets=[lgb.Dataset(x[stop], y[stop], reference=train)],
        callbacks=[lgb.early_stopping(s.early_stopping, verbose=False)],
    )
    return booster, int(booster.best_iteration or s.rounds)


def gbm_predict(booster, x: np.ndarray, rounds: int, k: int) -> np.ndarray:
    return _normalise(np.clip(build_task(k).gbm_probs(booster.predict(x, num_iteration=rounds)), EPS, 1))


def blend_gbm(
    oof,
    test,
    y,
    folds,
    gbm: GbmConfig | dict | None = None,
    scalars: tuple[np.ndarray, np.ndarray] | None = None,
    scalar_names: list[str] | None = None,
    member_names: list[str] | None = None,
    details: dict | None = None,
    fold_tests=None,
    **_,
):
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
        _fold_test(
            details,
            fold_tests,
            f,
            lambda p, booster=booster, f=f: gbm_predict(booster, features(p, 1), best[int(f)], k),
        )
    rounds = max(1, int(round(float(np.median(list(best.values()))))))
    booster, _ = gbm_fit(x, y, k, s, rounds=rounds)
    if details is not None:
        names = gbm_feature_names(oof.shape[0], k, member_names, scalar_names if scalars is not None else None)
        gain = booster.feature_importance("gain")
        details.update(
            best_iterations=best,
            test_rounds=rounds,
            feature_names=names,
            settings=s.model_dump(),
            importance_gain={n: round(float(g), 4) for n, g in zip(names, gain)},
        )
    return out, gbm_predict(booster, xt, rounds, k), None


for _name, _blend in (
    ("mean", blend_mean),
    ("geometric", blend_geometric),
    ("rank", blend_rank),
    ("weights", blend_weights),
    ("stack", blend_stack),
    ("hillclimb", blend_hillclimb),
    ("gbm", blend_gbm),
):
    BLENDERS.register(_name, _blend)
NESTED = ("weights", "stack", "hillclimb", "gbm")  # fitted on the other folds' OOF rows: their OOF score is nested


def build_blender(method: str) -> Callable:
    if method not in BLENDERS:
        raise PipelineError(f"method: {BLENDERS.unknown(method)}")
    return BLENDERS.get(method)
