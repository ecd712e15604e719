"""The plan's search: the image size, epochs, seeds and cut epochs that fill the budget at the estimated
speed (``make_plan``), for the jobs ``pipeline.plan.jobs.Shape`` describes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

from pipeline.config.auto import AUTO, DEFAULT_EPOCHS, plan_hash
from pipeline.config.schema import Config, with_values
from pipeline.plan.facts import MIN_PRETRAINED_SIDE, Facts, _candidates, choose_model
from pipeline.plan.jobs import MAX_EPOCHS, TARGET, Shape, auto_seeds
from pipeline.plan.speed import SIZE_EXPONENT, SpeedFn, _scaled, _thread_speeds
from pipeline.plan.tta import START_S, WHOLE, WHOLE_FILL, _evaluate_s, _fit_tta
from pipeline.train.executors import executor_width
from pipeline.train.trainer import caches_embeddings

MIN_EPOCHS = 8  # image_size: auto keeps the largest size that still gets these per fold
SEED_EPOCHS = DEFAULT_EPOCHS  # train.seeds: auto adds a seed only while every job still gets this many epochs
MAX_SEEDS = 5  # ... and at most this many: past it another seed adds little to the average
FILL = 0.94  # whole epochs filling less than this: one more, each cut to fewer steps (_fill_steps); 0.90 left
# digits at 520 s a plan of 0.91 that spent 0.79 when the run went 15% faster


# ---- the plan --------------------------------------------------------------------------------


def _plan_seeds(
    cfg: Config, shape_of: Callable[[int], Shape], budget: float, sp, fit: int, epochs: int, why: list
) -> tuple[list[int], int]:
    """``train.seeds: auto`` with a budget: the most seeds (at most ``MAX_SEEDS``) at which every job still
    gets ``SEED_EPOCHS`` epochs (a fixed ``train.epochs``: at which those fit ``TARGET`` of the budget), and
    the epochs that then fill it. ``fit``: the epochs one seed would get. Returns (seeds, epochs)."""
    fixed = cfg.train.epochs != AUTO
    need = epochs if fixed else SEED_EPOCHS

    def fits(n: int) -> bool:
        s = shape_of(n)
        return s.seconds(epochs, sp) <= TARGET * budget if fixed else s.epochs_for(budget, sp) >= need

    n = max([k for k in range(1, MAX_SEEDS + 1) if fits(k)], default=1)
    seeds = auto_seeds(cfg.train.seed, n)
    if not fixed:
        epochs = shape_of(n).epochs_for(budget, sp)
    if n == 1:
        why.append(
            f"seeds {seeds}: one seed per fold; a second would leave each job under {need} epochs (one seed gets {fit})"
            if not fixed
            else f"seeds {seeds}: two seeds of {need} epochs would not fit"
        )
    else:
        why.append(
            f"seeds {seeds}: the most seeds (at most {MAX_SEEDS}) at which every job still gets "
            f"{need} epochs; one seed alone would get {fit}"
            + (f" (capped at {MAX_EPOCHS}: the rest of the budget would go unused)" if fit >= MAX_EPOCHS else "")
        )
    return seeds, epochs


def _fill_steps(shape: Shape, budget: float, sp, epochs: int, batch_size: int, why: list) -> int | None:
    """``train.epochs: auto`` when whole epochs fill less than ``FILL`` of the budget (a few long epochs):
    one epoch more, each cut to the most steps that fit ``TARGET`` of it (the first batches of the epoch's
    own shuffled order, so each epoch trains another random subset, and the schedule is sized to the
    steps). None when whole epochs fill enough, or the cut epochs would train fewer rows in all."""
    if epochs >= MAX_EPOCHS or shape.seconds(epochs, sp) >= FILL * budget:
        return None
    rows = shape.train_rows()
    full = math.ceil(rows / batch_size)  # the trainer's steps of a whole epoch, its short last batch included
    steps = next(
        (
            k
            for k in range(full - 1, 0, -1)
            if replace(shape, max_train_rows=k * batch_size).seconds(epochs + 1, sp) <= TARGET * budget
        ),
        0,
    )
    if (epochs + 1) * steps * batch_size <= epochs * rows:  # the cut epochs must train more rows in all
        return None
    # ... and spend more of the budget: the cut shortens the refit's epochs too (on every row, so more
    # than a fold's), which can leave the whole plan shorter than the whole epochs were
    if replace(shape, max_train_rows=steps * batch_size).seconds(epochs + 1, sp) <= shape.seconds(epochs, sp):
        return None
    why.append(
        f"epochs {epochs + 1} of {steps} of the {full} steps each: {epochs} whole epochs would fill "
        f"{shape.seconds(epochs, sp) / budget:.0%} of the budget, {epochs + 1} whole ones more than {TARGET:.0%}"
    )
    return steps


def make_plan(
    cfg: Config, facts: Facts, *, device_type: str, cores: int, speed: SpeedFn, planning_s: float | None = None
) -> dict:
    """The plan for ``cfg`` on data ``facts``: the values every ``auto`` takes, and why. ``speed``: the speed
    of a config at a size and thread count (the cost model of ``pipeline.plan.choose.Timer``; tests inject
    one); ``planning_s``: the seconds planning takes, for the whole run's time (default: as this call
    measures them)."""
    from pipeline.runs.layout import RunDir

    t0 = time.time()
    seeds_auto = cfg.train.seeds == AUTO
    seeds = [cfg.train.seed] if seeds_auto else RunDir.of(cfg).seeds  # auto: one seed until the budget says more
    n_folds = cfg.folds.n_splits * cfg.folds.repeats

    def shape_of(c: Config, n_seeds: int | None = None) -> Shape:
        return _shape(c, facts, n_folds=n_folds, n_seeds=n_seeds or len(seeds), cores=cores, device_type=device_type)

    values, why = {}, []
    sizes = _auto_model(cfg, facts, values, why)
    budget = cfg.train.time_budget_s
    size, epochs, expected, measured = sizes[0], cfg.train.epochs, None, {}

    measure = speed
    if budget:
        size, sp, epochs, seeds, expected, measured = _fill_budget(
            cfg, values, sizes, budget, shape_of, measure, seeds, why
        )  # sp: threads -> Speed
    elif cfg.train.epochs == AUTO:
        epochs = DEFAULT_EPOCHS
        why.append(f"epochs {DEFAULT_EPOCHS}: no time budget (train.time_budget_s or --budget) to plan by")
    _auto_values(cfg, facts, values, why, seeds=seeds, size=size, epochs=epochs, budget=budget)
    if budget and cfg.predict.tta == AUTO and facts.n_test:
        fixed = START_S + (time.time() - t0 if planning_s is None else planning_s) + _evaluate_s(facts, sp(cores))
        values["predict.tta"] = _fit_tta(
            cfg,
            facts,
            size,
            sp(cores),
            len(seeds) * (n_folds + cfg.train.refit),
            budget,
            why,
            left_s=WHOLE_FILL * WHOLE * budget - expected - fixed,
        )
    plan = {
        "config_hash": plan_hash(cfg),
        "budget_s": budget,
        "values": values,
        "why": why,
        "folds": n_folds,
        "seeds": seeds,
        "expected_train_s": round(expected, 1) if expected is not None else None,
        "measured": {str(k): v for k, v in measured.items()},
        "made_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if budget and expected is not None and expected > budget and cfg.train.epochs != AUTO:
        plan["warning"] = (
            f"train.epochs {cfg.train.epochs} needs ~{expected:.0f} s, more than the {budget:.0f} s budget: "
            f"the deadline will stop folds early; set train.epochs=auto to plan the epochs"
        )
    return plan


def _shape(c: Config, facts: Facts, *, n_folds: int, n_seeds: int, cores: int, device_type: str) -> Shape:
    """The jobs config ``c`` trains on ``facts``: ``n_folds`` x ``n_seeds`` (+ refits) on ``cores``."""
    cap = c.train.max_steps_per_epoch and c.train.max_steps_per_epoch * c.train.batch_size
    return Shape(
        n_rows=facts.n_rows,
        extra_rows=facts.n_pseudo,
        n_folds=n_folds,
        n_seeds=n_seeds,
        refit=c.train.refit,
        cores=cores,
        width=executor_width(c, n_folds * n_seeds, device_type),
        max_train_rows=cap or None,
        n_splits=c.folds.n_splits,
        model=c.model,
        cached=caches_embeddings(c),
    )


def _auto_model(cfg: Config, facts: Facts, values: dict, why: list) -> list[int]:
    """``data.channels`` and the model when ``auto`` (into ``values``, the reasons into ``why``); returns the
    image sizes to try, largest first."""
    n_train = facts.n_rows - math.ceil(facts.n_rows / cfg.folds.n_splits)
    if cfg.data.channels == AUTO:
        values["data.channels"] = facts.channels
        why.append(f"channels {facts.channels}: the files' own")
    if cfg.model.backbone == AUTO:
        chosen, reason = choose_model(cfg, facts, n_train)
        values.update({f"model.{k}": v for k, v in chosen.items()})
        why += reason
    sizes = _candidates(cfg, facts)
    if values.get(
        "model.pretrained", cfg.model.pretrained and cfg.model.backbone != AUTO
    ):  # ImageNet features need the pixels
        sizes = [s for s in sizes if s >= MIN_PRETRAINED_SIDE] or sizes[:1]
    return sizes


def _fill_budget(cfg: Config, values: dict, sizes: list[int], budget: float, shape_of, measure, seeds, why: list):
    """With a time budget: the image size, the speed there, the epochs, the seeds (``train.seeds: auto``),
    maybe cut epochs (into ``values``) and the expected training time. Returns (size, speed(threads),
    epochs, seeds, expected seconds, measured)."""
    size, sp, fit, measured = _search_size(cfg, values, sizes, budget, shape_of, measure, why)  # sp: threads -> Speed
    epochs = fit if cfg.train.epochs == AUTO else cfg.train.epochs
    sized = with_values(cfg, {**values, "data.image_size": size, "train.epochs": 1})
    if cfg.train.seeds == AUTO:
        seeds, epochs = _plan_seeds(cfg, lambda n: shape_of(sized, n), budget, sp, fit, epochs, why)
    shape = shape_of(sized, len(seeds))
    if cfg.train.epochs == AUTO and not cfg.train.max_steps_per_epoch:
        if shape.seconds(1, sp) > TARGET * budget:  # not even one whole epoch fits: one, cut to the steps that do
            steps, epochs = _one_cut_epoch(shape, budget, sp, cfg.train.batch_size, why), 1
        else:
            steps = _fill_steps(shape, budget, sp, epochs, cfg.train.batch_size, why)
            epochs += 1 if steps else 0
        if steps:
            values["train.max_steps_per_epoch"] = steps
            shape = replace(shape, max_train_rows=steps * cfg.train.batch_size)
    return size, sp, epochs, seeds, shape.seconds(epochs, sp), measured


def _one_cut_epoch(shape: Shape, budget: float, sp, batch_size: int, why: list) -> int:
    """The most steps of one epoch that fit ``TARGET`` of the budget (at least one), when a whole epoch does not."""
    full = math.ceil(shape.train_rows() / batch_size)
    steps = next(
        (
            k
            for k in range(full - 1, 0, -1)
            if replace(shape, max_train_rows=k * batch_size).seconds(1, sp) <= TARGET * budget
        ),
        1,
    )
    why.append(
        f"epochs 1 of {steps} of the {full} steps: one whole epoch per fold would take "
        f"{shape.seconds(1, sp) / budget:.0%} of the budget"
    )
    return steps


def _auto_values(
    cfg: Config, facts: Facts, values: dict, why: list, *, seeds: list, size: int, epochs: int, budget
) -> None:
    """The plan's ``train.seeds``, ``data.image_size`` and ``train.epochs`` where they are ``auto``."""
    if cfg.train.seeds == AUTO:
        values["train.seeds"] = seeds if len(seeds) > 1 else None  # one: the run (and its hash) of seeds left unset
        if not budget:
            why.append(f"seeds {seeds}: no time budget to plan more by")
    if cfg.data.image_size == AUTO:
        values["data.image_size"] = size
        why.append(
            f"image size {size}: the files are {facts.native} px"
            + (
                "; never upscaled"
                if size == facts.native
                else f"; the largest size below at which {epochs} epochs per fold fit the budget"
            )
        )
    if cfg.train.epochs == AUTO:
        values["train.epochs"] = int(epochs)
        if budget and "train.max_steps_per_epoch" not in values:  # else _fill_steps said why
            why.append(
                f"epochs {epochs}: {'the most' if epochs < MAX_EPOCHS else f'capped at {MAX_EPOCHS}, fewer than'} "
                f"that fit {TARGET:.0%} of the {budget:.0f} s budget at the measured speed"
            )


SKIP_BELOW = 0.7  # a size estimated below this share of MIN_EPOCHS is skipped without measuring


def _search_size(cfg: Config, values: dict, sizes: list[int], budget: float, shape_of, measure, why: list):
    """The largest of ``sizes`` (descending) at which every fold gets ``MIN_EPOCHS``; the smallest when
    none does. Speeds come from ``measure`` (the plan's cost model: a network timed at a small size, other
    sizes and thread counts estimated; tests inject one): at each size tried, at the thread count most jobs
    run with, and at the size chosen on every core too (the last wave's jobs, the refit); a size whose
    estimate falls well short is skipped. Returns (size, speed(threads), epochs, speeds seen)."""
    measured, i = {}, 0
    need = MIN_EPOCHS if cfg.train.epochs == AUTO else cfg.train.epochs
    while True:
        size = sizes[i]
        c = with_values(cfg, {**values, "data.image_size": size, "train.epochs": 1})
        shape = shape_of(c)
        main = shape.threads()[0]
        base = measure(c, size, main)
        measured[size] = {"threads": main, **base.__dict__}
        sp = _thread_speeds({main: base}, main)
        fit = shape.epochs_for(budget, sp)
        if fit >= need or i == len(sizes) - 1:
            if shape.width > 1 and shape.cores != main:
                # a last partial wave's jobs and the refit run on every core
                wide = measure(c, size, shape.cores)
                measured[size]["on_every_core"] = {"threads": shape.cores, **wide.__dict__}
                sp = _thread_speeds({main: base, shape.cores: wide}, main)
                fit = shape.epochs_for(budget, sp)
            return size, sp, fit, measured
        why.append(f"image size {size}: only {fit} epochs per fold fit the budget (< {need})")
        i += 1
        while i < len(sizes) - 1:  # skip sizes that by estimate fall short too
            est = shape.epochs_for(budget, lambda th, f=(size / sizes[i]) ** SIZE_EXPONENT, sp=sp: _scaled(sp(th), f))
            if est >= SKIP_BELOW * need:  # near enough to measure: the estimate is rough
                break
            why.append(f"image size {sizes[i]}: about {est} epochs per fold would fit the budget (estimated)")
            i += 1
