"""How fast this machine trains a config: ``Speed`` (images per second and fixed costs), and the cost model
that estimates it at sizes and thread counts not timed (``CostModel``: one or two short timings at small
sizes, ``pipeline.plan.timing``; img/s against pixels by ``SIZE_EXPONENT`` or a fitted exponent, other
thread counts by ``THREAD_EXPONENT``), within the share of the budget planning may take (``PlanClock``).
Tests inject speeds: ``make_plan(speed=...)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config.schema import Config

log = logging.getLogger(__name__)

# training img/s of a partly frozen backbone over the whole one's (timed with the whole network):
# lite0 at 75 px here trained 3.5-4.5x as fast head-only and ~2x with the last stages (history.csv)
STAGE_SPEEDUP = {"full": 1.0, "partial": 1.6, "head": 2.5}


# ---- measured speed --------------------------------------------------------------------------


@dataclass(frozen=True)
class Speed:
    """One job's speed at one thread count: images per second and fixed costs."""

    train_img_s: float
    val_img_s: float
    build_s: float = 0.0  # building the model (and loading its weights) once per job
    epoch_s: float = 0.0  # per epoch besides the images: checkpoints, history, OOF

    def epoch_seconds(self, n_train: int, n_val: int, stage: str = "full") -> float:
        """One epoch; a frozen backbone trains faster (no backward pass through it): ``STAGE_SPEEDUP``."""
        return n_train / (self.train_img_s * STAGE_SPEEDUP[stage]) + n_val / self.val_img_s + self.epoch_s


SpeedFn = Callable[[Config, int, int], Speed]  # (config resolved but for epochs, image size, threads) -> Speed


SIZE_EXPONENT = 1.75  # img/s grows as (bigger / smaller side) ** 1.75 (lite0 here: 128 -> 64 px gave 3.4x, not 4x)
THREAD_EXPONENT = 0.5  # a job on k times the threads runs about k ** 0.5 times as fast (2 cores: 1.3-1.5x)


def _scaled(s: Speed, factor: float) -> Speed:
    return Speed(
        train_img_s=s.train_img_s * factor, val_img_s=s.val_img_s * factor, build_s=s.build_s, epoch_s=s.epoch_s
    )


def _thread_speeds(timed: dict[int, Speed], main: int) -> Callable[[int], Speed]:
    """threads -> Speed: as timed where timed, else estimated from ``main``'s by ``THREAD_EXPONENT``."""
    return lambda th: timed[th] if th in timed else _scaled(timed[main], (th / main) ** THREAD_EXPONENT)


class PlanClock:
    """The share of the budget planning may take: max(``PLAN_SHARE`` of it, ``PLAN_FLOOR_S``), from ``t0``
    (the plan's start: the data's facts and the weights conversion count too)."""

    def __init__(self, budget: float | None, t0: float):
        self.limit = max(PLAN_SHARE * budget, PLAN_FLOOR_S) if budget else math.inf
        self.t0 = t0

    def spent(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.limit - self.spent()


PLAN_SHARE = 0.05  # planning (facts, folds, timings) takes at most this share of the budget ...
PLAN_FLOOR_S = 10.0  # ... or this many seconds, whichever is more
TIMING_COST_S = 3.5  # what one quick timing costs here, its model built and a sibling beside it (2.5-4 s measured)


class CostModel:
    """img/s against pixels: each network timed once at a small size (``probe``), other sizes estimated as
    (probe / size) ** ``exponent`` (fitted when a second size was timed, else ``SIZE_EXPONENT``), other thread
    counts by ``THREAD_EXPONENT``. ``timed``: (network key, size) -> Speed at ``threads`` threads."""

    def __init__(self, threads: int, exponent: float = SIZE_EXPONENT):
        self.threads, self.default = threads, exponent
        self.timed: dict[tuple, dict[int, Speed]] = {}
        self.exponents: dict[tuple, float] = {}  # a network's own, fitted from two timed sizes

    def add(self, key: tuple, size: int, speed: Speed) -> None:
        self.timed.setdefault(key, {})[size] = speed
        sizes = sorted(self.timed[key])
        if len(sizes) >= 2:  # the exponent from the two timed sizes, kept in the range seen on CPUs
            a, b = sizes[0], sizes[-1]
            ratio = self.timed[key][a].train_img_s / self.timed[key][b].train_img_s
            self.exponents[key] = min(2.2, max(1.0, math.log(ratio) / math.log(b / a)))

    def knows(self, key: tuple) -> bool:
        return key in self.timed

    def speed(self, key: tuple, size: int, threads: int | None = None) -> Speed:
        """The estimated Speed of network ``key`` at ``size`` on ``threads`` (default: the timed count)."""
        sizes = self.timed[key]
        near = min(sizes, key=lambda s: abs(math.log(s / size)))
        s = _scaled(sizes[near], (near / size) ** self.exponents.get(key, self.default))
        th = threads or self.threads
        return s if th == self.threads else _scaled(s, (th / self.threads) ** THREAD_EXPONENT)
