"""The run plan: every ``auto`` value and the time budget, resolved once per run and kept in ``plan.json``.

``planned(cfg)`` returns the config a run trains with. A config with no ``auto`` value and no
``train.time_budget_s`` is returned as it is. Otherwise the plan is read from the run's ``plan.json``
when one was made for this config (its hash is that of the config as written, runtime keys left
out), else made now and written there, so every rerun, resumed fold and worker on another machine
(``pipeline train CONFIG --folds K``) trains with the same values and joins the same run, and never
races again; a changed budget is another config and gets a new plan. The budget counts training (the
race and the refit included).

Making a plan, in order, each step printed as it goes:

1. The data's facts (rows, classes, channels, the files' size), read at a small size.
2. The cost model (``pipeline.plan.choose.Timer``): each candidate network timed once, quickly, at the
   files' size up to 64 px, beside the sibling jobs ``train.fold_jobs`` runs with it; larger sizes are
   estimated (img/s against pixels). Planning takes at most max(5% of the budget, 10 s): a network the
   clock leaves no room for is not a candidate (``PlanClock``).
3. With a budget and ``auto`` in the recipe's keys (``model.backbone``, ``data.image_size``, ``augment``,
   ``model.input_norm``): the race (``pipeline.plan.race``) of the prior's portfolio
   (``pipeline.plan.recipes``) on a held-out split, for ``race.share`` of the budget; its table is kept.
4. The search (``pipeline.plan.search``) for the recipe chosen: the image size when still ``auto``, the
   epochs and seeds that fill what the race left of the budget (``TARGET`` of it), cut epochs when
   whole ones fill too little, and ``predict.tta: auto`` fitted to what the rest of the run leaves of
   1.4 budgets (``pipeline.plan.tta``).

Only the commands that train make a plan (fold, train, run, tune); the others use it.
Tests inject speeds: ``planned(cfg, speed=...)``, ``make_plan(..., speed=...)``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time

from pipeline.config.auto import AUTO, has_auto, needs_planner, plan_hash, without_plan
from pipeline.config.schema import Config, with_values
from pipeline.core.errors import LockHeld, PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.plan.choose import Timer, race_portfolio, races, recipe_speeds
from pipeline.plan.facts import Facts, data_facts
from pipeline.plan.race import MIN_RACE_ROWS, measurable, race
from pipeline.plan.recipes import prior_values
from pipeline.plan.search import make_plan
from pipeline.plan.speed import PlanClock, SpeedFn

log = logging.getLogger(__name__)


def parse_budget(text: str) -> float:
    """``900``, ``900s``, ``15m``, ``1.5h`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)] if m else 0.0
    if not m or not math.isfinite(seconds) or seconds <= 0:
        raise PipelineError(f"--budget: got {text!r}; expected a positive duration like 900s, 15m or 1h")
    return seconds


def describe(cfg: Config, plan: dict) -> str:
    """The plan in one line: model, size, folds x epochs x seeds, expected minutes."""
    m, t = cfg.model, cfg.train
    size = cfg.data.image_size or "native"
    exp = plan.get("expected_train_s")
    budget = plan.get("budget_s")
    steps = f" of {t.max_steps_per_epoch} steps" if t.max_steps_per_epoch else ""
    timing = (
        f"; expected {exp / 60:.1f} min of training for a {budget / 60:.1f} min budget"
        if exp is not None and budget
        else ""
    )
    return (
        f"plan: {m.backbone} ({'pretrained' if m.pretrained else 'from scratch'}, finetune {m.finetune}) at {size} px, "
        f"{plan['folds']} folds x {t.epochs} epochs{steps} x {len(plan['seeds'])} seed(s){timing}"
    )


def planned(cfg: Config, *, create: bool = True, require: bool = True, speed: SpeedFn | None = None) -> Config:
    """The config this run trains with: ``cfg`` with its plan's values (see the module docstring).

    ``create``: make the plan when there is none (the commands that train: fold, train, run, tune).
    Otherwise an existing plan is applied, and with ``require`` a config that needs one and has none
    is one line naming the command that makes it (evaluate, predict, ensemble); without, it comes back
    as it is (status)."""
    from pipeline.runs.layout import RunDir

    if cfg.plan is not None or not (has_auto(cfg) or cfg.train.time_budget_s):
        return cfg
    if not needs_planner(cfg):  # only train.epochs or seeds auto and no budget: their defaults
        return without_plan(cfg)
    run, h = RunDir.of(cfg), plan_hash(cfg)
    plan = read_plan(run, h)
    if plan is None and create:
        from pipeline.core.device import prepare_training_device

        prepare_training_device(cfg.train)  # the plan trains: fp16 off CUDA is one line before the data is read
        t0 = time.time()  # planning's share of the budget counts from here: the data's facts are part of it
        plan = _keep(cfg, run, h, data_facts(cfg), speed, t0)  # the data is read first: bad data writes nothing
        plan = {**plan, "made_now": True}  # this process planned (and raced): pipeline run times those stages
    if plan is None:
        if require:
            budget = f" --budget {cfg.train.time_budget_s:g}s" if cfg.train.time_budget_s else ""
            raise PipelineError(
                f"{run.plan_json}: no plan for this config (plan hash {h}); run `pipeline train {cfg.path}{budget}` "
                f"with the same overrides first (the plan resolves its auto values and budget)"
            )
        return cfg
    return with_values(cfg, _still_auto(cfg, plan["values"])).model_copy(update={"plan": plan})


def _keep(cfg: Config, run, h: str, facts: Facts, speed: SpeedFn | None, t0: float) -> dict:
    """Make and write the plan holding the run's plan lock: a process (machine) that finds it held waits
    and then reads what the holder wrote, so every worker of a run trains with one plan, and two
    planners never time each other's load."""
    from pipeline.core.io import exclusive

    run.path.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            with exclusive(run.plan_lock, "the run plan"):
                plan = read_plan(run, h)
                if plan is not None:
                    log.info(f"plan: using the plan another process wrote to {run.plan_json}")
                    return plan
                plan = _make(cfg, facts, speed, t0, run)
                atomic_write_json(run.plan_json, plan)
                return plan
        except LockHeld:
            time.sleep(0.5)


def _make(cfg: Config, facts: Facts, speed: SpeedFn | None, t0: float, run) -> dict:
    """The plan: the recipe (raced when the config leaves it ``auto`` and has a budget), then the epochs,
    seeds and TTA that fill what the race leaves of the budget; planning's own time bounded (``PlanClock``)."""
    import torch

    from pipeline.core.device import resolve_device

    device = resolve_device(cfg.train.device)
    cores = torch.get_num_threads()
    clock = PlanClock(cfg.train.time_budget_s, t0)
    timer = Timer(cfg, facts, clock, cores=cores, device_type=device.type, given=speed)
    speed = speed or timer.speed_fn()
    raced = _race(cfg, facts, timer, run) if races(cfg) else None
    if raced is None:
        prior = prior_values(cfg, facts)  # augment / input norm auto and nothing raced: the prior's first choice
        plan = make_plan(
            with_values(cfg, prior), facts, device_type=device.type, cores=cores, speed=speed, planning_s=clock.spent()
        )
        plan.update(config_hash=plan_hash(cfg), values={**prior, **plan["values"]})
    else:
        winner_cfg, values, info = raced
        plan = make_plan(
            winner_cfg,
            facts,
            device_type=device.type,
            cores=cores,
            speed=speed,
            planning_s=clock.spent() - info["seconds"],
        )
        plan.update(
            config_hash=plan_hash(cfg),
            race=info,
            values={**values, **plan["values"]},
            budget_s=cfg.train.time_budget_s,
            train_budget_s=winner_cfg.train.time_budget_s,
        )
        plan["why"] = info.pop("why") + plan["why"]
    plan["facts"] = {
        "n_rows": facts.n_rows,
        "classes": len(facts.class_names),
        "channels": facts.channels,
        "native": facts.native,
    }
    race_s = (plan.get("race") or {}).get("seconds", 0.0)
    plan["planning_s"] = round(time.time() - t0 - race_s, 1)
    plan["line"] = describe(with_values(cfg, _still_auto(cfg, plan["values"])), plan)
    for line in plan["why"]:
        log.info(f"plan: {line}")
    log.info(plan["line"] + f" (planned in {plan['planning_s']:.0f} s)")
    if "warning" in plan:
        log.warning(f"plan: {plan['warning']}")
    return plan


def _race(cfg: Config, facts: Facts, timer: Timer, run) -> tuple[Config, dict, dict] | None:
    """Race the prior's portfolio when it has at least three candidates: (the config the winner trains with,
    the plan values it sets, the race's record for plan.json); None when there is nothing to race."""
    why: list[str] = []
    recipes = race_portfolio(cfg, facts, timer, why)
    if len(recipes) < 3:
        return None
    budget = cfg.train.time_budget_s
    speeds = recipe_speeds(timer, cfg, facts, recipes)
    fit = measurable(cfg, facts, recipes, speeds, cfg.race.share * budget)
    left_out = [r.name for r in recipes if r not in fit]
    n_val = math.ceil(facts.n_rows * cfg.race.holdout)
    if n_val < MIN_RACE_ROWS:
        left_out = []
        skip = (
            f"{n_val} held-out rows (of {facts.n_rows}) cannot rank recipes (at least {MIN_RACE_ROWS}); the "
            f"prior's first choice trains instead"
        )
        why.append(f"race skipped: {skip}")
        return _prior_first(cfg, facts, recipes, why, skip)
    if left_out and len(fit) >= 3:
        why.append(f"race: {', '.join(left_out)} left out: round one could not give it a whole epoch")
        recipes = fit
    elif left_out:
        skip = (
            f"in {cfg.race.share * budget:.0f} s, round one could give a whole epoch to {len(fit)} of the "
            f"{len(recipes)} candidates (at least 3 race); the prior's first choice trains instead"
        )
        why.append(f"race skipped: {skip}")
        return _prior_first(cfg, facts, recipes, why, skip)
    winner, table, spent = race(cfg, facts, recipes, speeds, seconds=cfg.race.share * budget, run_dir=run.race_dir)
    values = {**winner.config_values(cfg), "train.time_budget_s": round(budget - spent, 1)}
    if cfg.data.channels == AUTO:
        values["data.channels"] = facts.channels
    why.append(
        f"race: {winner.name} won of {len(recipes)} in {spent:.0f} s; training gets the "
        f"{values['train.time_budget_s']:.0f} s left of the {budget:.0f} s budget"
    )
    info = {"winner": winner.name, "seconds": round(spent, 1), "share": cfg.race.share, "table": table, "why": why}
    return with_values(cfg, values), values, info


def _prior_first(cfg: Config, facts: Facts, recipes: list, why: list, skip: str) -> tuple[Config, dict, dict]:
    """No race: the prior's first candidate, and the reason kept in the plan."""
    first = recipes[0]
    values = {**first.config_values(cfg), **({"data.channels": facts.channels} if cfg.data.channels == AUTO else {})}
    info = {"winner": first.name, "seconds": 0.0, "share": 0.0, "table": [], "why": why, "skipped": skip}
    return with_values(cfg, values), values, info


def _still_auto(cfg: Config, values: dict) -> dict:
    """The plan's values for keys the config leaves to it: a key given a value (a key outside the plan's
    hash, e.g. ``predict.tta``) keeps it; ``model.pretrained``/``finetune`` follow ``model.backbone: auto``."""

    def auto(key: str) -> bool:
        if key in ("model.pretrained", "model.finetune") and key[6:] in cfg.model.model_fields_set:
            return False  # written in the config: the config's, whatever the backbone rule or the race says
        if key == "augment":
            return cfg.augment == AUTO
        if key == "train.time_budget_s":  # what the race left of the budget: training's own share of it
            return True
        section, name = key.split(".")
        if section == "model" and name in ("pretrained", "finetune"):
            name = "backbone"
        if key == "train.max_steps_per_epoch":  # the cut epochs of train.epochs: auto (_fill_steps)
            name = "epochs"
        return getattr(getattr(cfg, section), name) == AUTO

    return {k: v for k, v in values.items() if auto(k)}


def read_plan(run, config_hash: str) -> dict | None:
    """The plan made for the config whose plan hash is ``config_hash``; None when there is none
    (or it was made for another config, or the file is damaged: planned again)."""
    p = run.plan_json
    if not p.is_file():
        return None
    try:
        saved = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(saved, dict) and saved.get("config_hash") == config_hash and isinstance(saved.get("values"), dict)
    return saved if ok else None
