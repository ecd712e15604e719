"""Choosing the recipe within a bounded planning share: time each candidate network once at a small size
(the cost model), build the prior's portfolio from what the budget affords, and race it.

Planning (the data's facts, these timings, the plan itself) takes at most max(5% of the budget, 10 s)
(``PlanClock``): the networks are timed in the prior's order while the clock allows (the first always),
at ``probe_size`` (at most 64 px), and a second size for the exponent only when there is time for it. A
network not timed does not enter the race. No timing runs at a size larger than the probe, so no single
step can outlast the budget, and the memory planning needs follows the small size, not the files' own.
"""

from __future__ import annotations

import logging
import math

from pipeline.config.auto import AUTO
from pipeline.config.schema import Config, with_values
from pipeline.plan.facts import Facts, fixed_size, format_size, given_size
from pipeline.plan.jobs import TARGET
from pipeline.plan.recipes import AUG_FAMILIES, Recipe, backbones, n_candidates, portfolio
from pipeline.plan.search import _shape
from pipeline.plan.speed import TIMING_COST_S, CostModel, PlanClock, Speed

log = logging.getLogger(__name__)

PROBE_MAX = 64  # networks are timed at the files' size up to this side, larger sizes estimated
MIN_FINAL_EPOCHS = {"tune": 3, "head": 6, "scratch": 8}  # what the final training must afford at a size


def probe_size(facts: Facts, cfg: Config | None = None) -> int:
    """The size networks are timed at: the run's size (the files' own, or the config's) up to ``PROBE_MAX``,
    or the size the format fixes, as it is."""
    if cfg is not None and format_size(cfg):
        return facts.native
    return min(given_size(cfg, facts) if cfg is not None and fixed_size(cfg) else facts.native, PROBE_MAX)


def net_key(c: Config) -> tuple:
    """What the cost model times once: the network, timed training whole (a frozen part's speed-up is
    ``STAGE_SPEEDUP``'s)."""
    return (c.model.backbone, bool(c.model.pretrained))


class Timer:
    """The cost model, filled by quick timings while the plan's clock allows (``pipeline.plan.timing``)."""

    def __init__(self, cfg: Config, facts: Facts, clock: PlanClock, *, cores: int, device_type: str, given=None):
        self.cfg, self.facts, self.clock, self.cores, self.device_type = cfg, facts, clock, cores, device_type
        self.given = given  # a SpeedFn the caller injects (tests): used in place of timings
        n_folds = cfg.folds.n_splits * cfg.folds.repeats
        shape = _shape(cfg, facts, n_folds=n_folds, n_seeds=1, cores=cores, device_type=device_type)
        self.main, self.width = shape.threads()[0], shape.width
        self.cost = CostModel(self.main)
        # one job on every core (the race, a last partial wave, the refit): timed too when the clock allows,
        # since the thread count's rule errs (simple_cnn ran 1.84x as fast on 2 threads as on 1, not 1.41x)
        self.wide = CostModel(cores)

    def ensure(self, c: Config, *, required: bool) -> bool:
        """Time ``c``'s network at the probe size unless known; False when the clock has no room (not ``required``)."""
        key = net_key(c)
        if self.cost.knows(key):
            return True
        if not required and self.clock.left() < TIMING_COST_S:
            log.info(
                f"plan: {key[0]} not timed: {self.clock.spent():.0f} s of the "
                f"{self.clock.limit:.0f} s planning share spent"
            )
            return False
        self._time(c, probe_size(self.facts, self.cfg))
        return True

    def refine(self, c: Config, size: int) -> None:
        """A second timed size for ``c``'s network, so the exponent is fitted, when the clock allows."""
        key, probe = net_key(c), probe_size(self.facts, self.cfg)
        if size <= probe * 1.4 or size in self.cost.timed.get(key, {}) or self.clock.left() < 2 * TIMING_COST_S:
            return
        self._time(c, size)

    def time_wide(self, c: Config) -> None:
        """``c``'s network on every core at the probe size, when the jobs do not already run so and the clock allows."""
        key = net_key(c)
        if self.main == self.cores or self.wide.knows(key) or self.clock.left() < TIMING_COST_S:
            return
        self._time(c, probe_size(self.facts, self.cfg), threads=self.cores)

    def estimate(self, key: tuple, size: int, threads: int) -> Speed:
        if threads == self.cores and self.wide.knows(key):
            return self.wide.speed(key, size)
        return self.cost.speed(key, size, threads)

    def _time(self, c: Config, size: int, threads: int | None = None) -> None:
        from pipeline.plan.timing import measure_speed

        threads = threads or self.main
        model = self.cost if threads == self.main else self.wide
        if self.given is not None:
            model.add(net_key(c), size, self.given(c, size, threads))
            return
        siblings = (
            self.width - 1 if threads == self.main and self.width > 1 and self.main * self.width <= self.cores else 0
        )
        log.info(
            f"plan: timing {c.model.backbone} at {size} px on {threads} thread(s)"
            f"{f' beside {siblings} sibling job(s)' if siblings else ''} "
            f"({self.clock.spent():.0f} of {self.clock.limit:.0f} s of planning spent)"
        )
        # no pretrained weights for a timing: the speed is the same, and a cold cache's conversion is not planning's
        timing = {"train.epochs": 1, "model.pretrained": False, "model.weights": None}
        sized = with_values(c, {**timing, **({} if format_size(self.cfg) else {"data.image_size": size})})
        model.add(net_key(c), size, measure_speed(sized, self.facts, size, threads, siblings=siblings, quick=True))

    def speed_fn(self):
        """A ``SpeedFn`` for ``make_plan``: the cost model's estimate (the network timed first when unknown)."""

        def speed(c: Config, size: int, threads: int) -> Speed:
            self.ensure(c, required=True)
            if threads == self.cores:
                self.time_wide(c)
            return self.estimate(net_key(c), size, threads)

        return speed


def races(cfg: Config) -> bool:
    """A race needs a budget, a share for it and an ``auto`` in the recipe's keys."""
    recipe_auto = AUTO in (cfg.model.backbone, cfg.data.image_size, cfg.model.input_norm) or cfg.augment == AUTO
    return bool(cfg.train.time_budget_s) and cfg.race.share > 0 and recipe_auto


def race_portfolio(cfg: Config, facts: Facts, timer: Timer, why: list) -> list[Recipe]:
    """The candidates the prior puts first among those the clock could time, sized by the budget."""
    budget = cfg.train.time_budget_s
    train_s = TARGET * budget * (1 - cfg.race.share)
    n_train = facts.n_rows - math.ceil(facts.n_rows * cfg.race.holdout)
    timed = []
    for i, (backbone, pretrained, finetune) in enumerate(backbones(cfg, facts, n_train)):
        c = _with_net(cfg, facts, backbone, pretrained, finetune)
        if timer.ensure(c, required=i == 0):
            timed.append((backbone, pretrained, finetune))

    def largest(backbone: str, pretrained: bool, finetune: str) -> int:
        if (backbone, pretrained, finetune) not in timed:
            return 0
        return _largest_size(cfg, facts, timer, _with_net(cfg, facts, backbone, pretrained, finetune), train_s)

    recipes = [
        r
        for r in portfolio(cfg, facts, n=n_candidates(cfg, budget), largest_size=largest)
        if (r.backbone, r.pretrained, r.finetune) in timed
    ]
    why.append(
        f"race: {len(recipes)} candidates ({', '.join(r.name for r in recipes)}) for "
        f"{cfg.race.share:.0%} of the {budget:.0f} s budget"
    )
    return recipes


def _with_net(cfg: Config, facts: Facts, backbone: str, pretrained: bool, finetune: str) -> Config:
    values = {"model.backbone": backbone, "model.pretrained": pretrained, "model.finetune": finetune}
    if cfg.augment == AUTO:
        values["augment"] = AUG_FAMILIES["none" if finetune == "head" else "affine"]
    if cfg.model.input_norm == AUTO:
        values["model.input_norm"] = "dataset"
    if cfg.data.channels == AUTO:
        values["data.channels"] = facts.channels
    if not format_size(cfg):
        values["data.image_size"] = probe_size(facts, cfg)
    return with_values(cfg, values)


def _largest_size(cfg: Config, facts: Facts, timer: Timer, c: Config, train_s: float) -> int:
    """The largest standard size (never above the files') at which the final training affords its minimum
    epochs, by the cost model; the probe size refines the exponent once it is known to matter."""
    from pipeline.plan.facts import SIZES

    kind = "head" if c.model.finetune == "head" else ("tune" if c.model.pretrained else "scratch")
    need = MIN_FINAL_EPOCHS[kind]
    n_folds = cfg.folds.n_splits * cfg.folds.repeats
    shape = _shape(c, facts, n_folds=n_folds, n_seeds=1, cores=timer.cores, device_type=timer.device_type)
    key = net_key(c)
    if fixed_size(cfg):
        return given_size(cfg, facts)
    for size in [s for s in (facts.native, *SIZES) if s <= facts.native]:
        if size > probe_size(facts):
            timer.refine(c, min(size, 2 * probe_size(facts)))
        sp = lambda th, size=size: timer.cost.speed(key, size, th)  # noqa: E731
        if shape.seconds(need, sp) <= train_s:
            return size
    return 0  # no size affords the minimum epochs: the prior puts this network last


def recipe_speeds(timer: Timer, cfg: Config, facts: Facts, recipes: list[Recipe]) -> dict[str, Speed]:
    """Each candidate's speed in the race: one job on every core, by the cost model."""
    out = {}
    for r in recipes:
        c = _with_net(cfg, facts, r.backbone, r.pretrained, r.finetune)
        timer.time_wide(c)
        out[r.name] = timer.estimate(net_key(c), r.size, timer.cores)
    return out
