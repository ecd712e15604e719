"""Optuna samplers and pruners for ``pipeline tune``: the entries of the registries ``SAMPLERS`` and
``PRUNERS`` (pipeline/config/registries.py), one ``build_*`` each. Optuna is imported when one is
built, so the config checks ``tune.sampler`` and ``tune.pruner`` without it.

The sampler is rebuilt for each trial with a seed derived from (``tune.seed``, trial number): one
worker repeats its search exactly, and parallel workers started with the same seed do not draw
the same parameters. An epoch-wise pruner sees the validation metric after each epoch of the
first tuned fold (step = epoch); the others see each fold's value (step = fold number).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config.registries import PRUNERS, SAMPLERS
from pipeline.core.errors import PipelineError
from pipeline.tune.space import trial_seed

if TYPE_CHECKING:
    from pipeline.tune.space import Space


# ---- samplers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSpec:
    make: Callable[[Any, Space, int], Any]  # (tune config section, space, seed) -> optuna sampler
    check: Callable[[Any, Space], None] | None = None  # refuses a space it cannot search (cfg, space)


def _tpe(tc, space: Space, seed: int):
    import optuna

    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=tc.n_startup_trials, multivariate=True, group=space.conditional, constant_liar=True
    )


def _random(tc, space: Space, seed: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _cmaes(tc, space: Space, seed: int):
    import optuna

    return optuna.samplers.CmaEsSampler(
        seed=seed,
        n_startup_trials=tc.n_startup_trials,
        independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        warn_independent_sampling=False,
    )


def _check_cmaes(cfg, space: Space) -> None:
    """Numeric spaces only: a categorical or conditional parameter is refused rather than
    silently sampled at random."""
    path = cfg.path or "config"
    for p in space.params:
        if p.type == "categorical":
            raise PipelineError(
                f"{path}: tune.space.{p.key}: tune.sampler cmaes searches numeric spaces only; "
                "use tune.sampler tpe (or random) for categorical parameters"
            )
        if p.when:
            raise PipelineError(
                f"{path}: tune.space.{p.key}: tune.sampler cmaes cannot search conditional parameters; "
                "use tune.sampler tpe"
            )
    if len(space.params) < 2:
        raise PipelineError(f"{path}: tune.sampler: cmaes needs at least 2 searched parameters; use tpe or random")
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise PipelineError(f"{path}: tune.sampler: cmaes needs the 'cmaes' package (pip install cmaes)") from None


# the built-in entries of SAMPLERS (pipeline/config/registries.py)
TPE = SamplerSpec(_tpe)  # multivariate, grouped when the space has conditions
RANDOM = SamplerSpec(_random)
CMAES = SamplerSpec(_cmaes, _check_cmaes)


def check_sampler(cfg, space: Space) -> None:
    """The sampler can search this space (after the command line's pinned keys left it)."""
    check = SAMPLERS.get(cfg.tune.sampler).check
    if check is not None:
        check(cfg, space)


def build_sampler(cfg, space: Space):
    import optuna

    make, tc = SAMPLERS.get(cfg.tune.sampler).make, cfg.tune

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        """The configured sampler, rebuilt per trial with a seed from (tune.seed, trial number)."""

        def __init__(self):
            self.inner = make(tc, space, tc.seed)

        def before_trial(self, study, trial):
            self.inner = make(tc, space, trial_seed(tc.seed, trial.number))
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self.inner.reseed_rng()

    return TrialSeededSampler()


# ---- pruners -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunerSpec:
    make: Callable[[Any, Space, int], Any]  # (config, space, number of folds) -> optuna pruner
    epoch_wise: bool  # reported each epoch of the first tuned fold, else each fold's value
    label: str  # what the run's header says; {fold} is the first tuned fold


def _median(cfg, space: Space, n_folds: int):
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=cfg.tune.n_startup_trials, n_warmup_steps=0)


def _halving(cfg, space: Space, n_folds: int):
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


def _hyperband(cfg, space: Space, n_folds: int):
    import optuna

    p = space.get("train.epochs")
    max_epochs = int(
        p.high if p is not None and p.type == "int" else max(p.choices) if p is not None else cfg.train.epochs
    )
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1), reduction_factor=3)


def _wilcoxon(cfg, space: Space, n_folds: int):
    import optuna

    return optuna.pruners.WilcoxonPruner(p_threshold=cfg.tune.p_threshold, n_startup_steps=2)


def _nop(cfg, space: Space, n_folds: int):
    import optuna

    return optuna.pruners.NopPruner()


# the built-in entries of PRUNERS (pipeline/config/registries.py)
MEDIAN = PrunerSpec(_median, True, "MedianPruner on the epochs of fold {fold}")
HALVING = PrunerSpec(_halving, True, "SuccessiveHalvingPruner on the epochs of fold {fold}")
HYPERBAND = PrunerSpec(_hyperband, True, "HyperbandPruner on the epochs of fold {fold}")
# about 4 finished folds before it can reach p < 0.1: use it with many folds or repeats
WILCOXON = PrunerSpec(_wilcoxon, False, "WilcoxonPruner on the fold values")
NONE = PrunerSpec(_nop, False, "no pruning")


def build_pruner(cfg, space: Space, n_folds: int):
    return PRUNERS.get(cfg.tune.pruner).make(cfg, space, n_folds)
