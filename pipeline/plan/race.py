"""The recipe race: a share of the budget measures the prior's candidates on the competition's own rows.

Every candidate trains on one stratified held-out split of the training rows (``race.holdout``, seeded by
``folds.seed``) on the same number of images (``schedule``: whole epochs, or one cut to the steps that
make them; ``unit_images`` sizes round one so the rounds fill the race's share), and is scored on the
held-out rows by the log-loss after the temperature that fits them best (the ranking a calibrated model
would have; raw log-loss and accuracy beside it). Successive halving: each round keeps the best
1/``race.eta``, and the next gives each survivor ``eta`` times the images, from scratch, until one is left.
The last round keeps the prior's favourite unless a challenger beats it by more than one standard error
of the paired per-row difference (a small held-out split ranks noisily); ties go to the prior's order.
Fewer than ``MIN_RACE_ROWS`` held-out rows: no race, the prior decides.

The race trains in the run's own scratch folder (``RunDir.race_dir``), never in its fold folders or
prediction files. Its schedules are fixed before it starts (images, then epochs and steps), so the same
candidates on the same data and seed train the same models; which candidates enter and how many images
they get follow this machine's timings, so ``plan.json`` keeps the table and the choice, and reruns and
workers never race again. A slow machine ends the race at ``OVERRUN`` of its share, not the budget.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from pipeline.config.auto import AUTO
from pipeline.config.schema import Config, with_values
from pipeline.plan.facts import Facts
from pipeline.plan.jobs import HEAD_ON_FEATURES
from pipeline.plan.recipes import Recipe
from pipeline.plan.speed import Speed

log = logging.getLogger(__name__)

MAX_RACE_EPOCHS = 30  # a candidate's schedule: more rarely changes the ranking
MIN_RACE_IMAGES = 512  # round one trains each candidate on at least this many images (or one epoch, if fewer)
MIN_RACE_ROWS = 100  # held-out rows below this rank recipes by noise: the prior decides
RACE_JOB_S = 1.5  # a race job's cost besides its steps: reading the table at its size, the trainer's files, scoring
OVERRUN = 1.15  # the race ends by this share of its time whatever the machine's speed; training gets the rest


@dataclass
class Entry:
    """One candidate in one round: what it trained and what it scored."""

    name: str
    rank: int
    round: int
    epochs: int
    steps: int | None
    planned_s: float
    images: int = 0
    seconds: float = 0.0
    score: float = math.inf
    logloss: float = math.inf
    accuracy: float = 0.0
    verdict: str = ""
    losses: np.ndarray | None = None  # each held-out row's calibrated log-loss, for the paired comparison

    def row(self) -> dict:
        return {
            "candidate": self.name,
            "prior_rank": self.rank,
            "round": self.round,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps,
            "images": self.images,
            "planned_s": round(self.planned_s, 1),
            "seconds": round(self.seconds, 1),
            "score": _r(self.score),
            "logloss": _r(self.logloss),
            "accuracy": _r(self.accuracy),
            "verdict": self.verdict,
        }


def _r(v: float) -> float | None:
    return round(float(v), 4) if math.isfinite(v) else None


def holdout(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """fold_of for the race: 0 on the held-out rows (stratified by class when every class has two rows), 1 elsewhere."""
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    idx = np.arange(len(labels))
    try:
        _, va = next(StratifiedShuffleSplit(1, test_size=share, random_state=seed).split(idx, labels))
    except ValueError:  # a class with one row cannot be split by class
        _, va = next(ShuffleSplit(1, test_size=share, random_state=seed).split(idx))
    fold_of = np.ones(len(labels), dtype=np.int64)
    fold_of[va] = 0
    return fold_of


def schedule(images: int, *, n_train: int, batch_size: int) -> tuple[int, int | None]:
    """(epochs, steps per epoch or None for whole ones) that train on about ``images`` images: whole epochs when
    at least one fits, else one epoch cut to the steps that do (at least two)."""
    if images >= n_train:
        return min(images // n_train, MAX_RACE_EPOCHS), None
    return 1, max(2, images // batch_size)


def job_seconds(
    speed: Speed,
    images: int,
    *,
    n_train: int,
    n_val: int,
    batch_size: int,
    head_only: bool,
    n_rows: int,
    features: bool = True,
) -> float:
    """A race job's expected seconds: its start, the frozen features once (``features``), the images trained on
    and a validation pass per epoch."""
    epochs, steps = schedule(images, n_train=n_train, batch_size=batch_size)
    seen = epochs * (n_train if steps is None else min(n_train, steps * batch_size))
    fixed = RACE_JOB_S + speed.build_s + (n_rows / speed.val_img_s if head_only and features else 0.0)
    per_img = 1.0 / (speed.train_img_s * (HEAD_ON_FEATURES if head_only else 1.0))
    return fixed + seen * per_img + epochs * (n_val / speed.val_img_s * (0.1 if head_only else 1.0) + speed.epoch_s)


def rounds(n: int, eta: int) -> list[int]:
    """Candidates per round of successive halving: n, ceil(n/eta), ... down to two (the last round picks one)."""
    out = [n]
    while out[-1] > 2 and math.ceil(out[-1] / eta) > 1:
        out.append(math.ceil(out[-1] / eta))
    return out


def _split_kw(cfg: Config, facts: Facts) -> dict:
    """``job_seconds``'s keywords the race's split fixes: its training and held-out rows, the batch, all rows."""
    n_val = math.ceil(facts.n_rows * cfg.race.holdout)
    return {"n_train": facts.n_rows - n_val, "n_val": n_val, "batch_size": cfg.train.batch_size, "n_rows": facts.n_rows}


def unit_images(cfg: Config, facts: Facts, recipes: list[Recipe], speeds: dict[str, Speed], seconds: float) -> int:
    """Round one's images per candidate so that every round (each survivor ``eta`` times the images of the round
    before) adds up to about ``seconds``, the candidates' costs averaged (who survives is not known yet)."""
    eta, kw = cfg.race.eta, _split_kw(cfg, facts)

    def total(images: int) -> float:
        return sum(
            k
            * np.mean(
                [
                    job_seconds(speeds[r.name], images * eta**j, head_only=r.finetune == "head", features=j == 0, **kw)
                    for r in recipes
                ]
            )
            for j, k in enumerate(rounds(len(recipes), eta))
        )

    lo, hi = 0, 1
    while total(hi) <= seconds and hi < 10**8:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= seconds else (lo, mid)
    return lo


def measurable(
    cfg: Config, facts: Facts, recipes: list[Recipe], speeds: dict[str, Speed], seconds: float
) -> list[Recipe]:
    """The candidates a race in ``seconds`` can tell apart: round one must train each on at least
    ``MIN_RACE_IMAGES`` images (or a whole epoch, when that is fewer: a handful of steps scores the
    initialisation, not the recipe). While it cannot, the costliest candidate is left out, and the others'
    share grows; the prior's order is kept."""
    need = min(MIN_RACE_IMAGES, _split_kw(cfg, facts)["n_train"])
    alive = list(recipes)
    while alive and unit_images(cfg, facts, alive, speeds, seconds) < need:
        costly = max(alive, key=lambda r: (1.0 / speeds[r.name].train_img_s, r.rank))
        alive = [r for r in alive if r is not costly]
    return alive


def race(
    cfg: Config, facts: Facts, recipes: list[Recipe], speeds: dict[str, Speed], *, seconds: float, run_dir
) -> tuple[Recipe, list[dict], float]:
    """Race ``recipes`` (``speeds``: each one's ``Speed`` by name) in about ``seconds``; returns (the winner,
    the table's rows, seconds spent)."""
    import shutil

    t0 = time.time()
    deadline = t0 + OVERRUN * seconds  # the race as a whole: a slow machine ends it, never the budget
    shutil.rmtree(run_dir, ignore_errors=True)  # a race a killed plan left: its jobs are not this race's
    eta = cfg.race.eta
    unit = unit_images(cfg, facts, recipes, speeds, seconds)
    alive, table, round_no, tables = list(recipes), [], 1, {}
    log.info(
        f"race: {len(recipes)} candidates on a {cfg.race.holdout:.0%} held-out split, ~{seconds:.0f} s in "
        f"{len(rounds(len(recipes), eta))} round(s) of successive halving (1/{eta} kept each round)"
    )
    while True:
        images = unit * eta ** (round_no - 1)
        left = max(deadline - time.time(), 0.0)
        while images > MIN_RACE_IMAGES and _round_seconds(cfg, facts, alive, speeds, images) > left:
            images //= 2  # a slow machine: a shorter round rather than a race past its share
        entries = [_train(cfg, facts, r, speeds[r.name], round_no, images, run_dir, tables, deadline) for r in alive]
        order = sorted(range(len(alive)), key=lambda i: (entries[i].score, alive[i].rank))
        out_of_time = time.time() >= deadline
        keep = 1 if len(alive) <= 2 or out_of_time else math.ceil(len(alive) / eta)
        note = ""
        if keep == 1:
            order, note = _prior_unless_beaten(order, entries, alive)
        for pos, i in enumerate(order):
            e = entries[i]
            e.verdict = (
                (("won" + note) if keep == 1 else "kept") if pos < keep else f"dropped: {pos + 1} of {len(alive)}"
            )
            table.append(e.row())
        alive = [alive[i] for i in order[:keep]]
        if len(alive) == 1:
            break
        round_no += 1
    spent = time.time() - t0
    log.info(f"race: {alive[0].name} won ({spent:.0f} s)")
    return alive[0], table, spent


def _round_seconds(cfg: Config, facts: Facts, alive: list[Recipe], speeds: dict[str, Speed], images: int) -> float:
    kw = _split_kw(cfg, facts)
    return sum(job_seconds(speeds[r.name], images, head_only=r.finetune == "head", **kw) for r in alive)


def _prior_unless_beaten(order: list[int], entries: list[Entry], alive: list[Recipe]) -> tuple[list[int], str]:
    """The last round's winner: the best score, unless the prior's favourite among the finalists is within one
    standard error of it on the held-out rows (a paired difference of each row's log-loss): a small held-out
    split ranks noisily, and the prior breaks what the measurement cannot."""
    best = order[0]
    fav = min(range(len(alive)), key=lambda i: alive[i].rank)
    a, b = entries[best].losses, entries[fav].losses
    if best == fav or a is None or b is None:
        return order, ""
    d = a - b
    gain, se = -float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
    if gain > se:
        return order, f" (by {gain:.4f} +- {se:.4f} over the prior's {alive[fav].name})"
    return [fav] + [
        i for i in order if i != fav
    ], f" (the prior's: {alive[best].name} was {gain:.4f} +- {se:.4f} better)"


def _train(
    cfg: Config,
    facts: Facts,
    recipe: Recipe,
    speed: Speed,
    round_no: int,
    images: int,
    run_dir,
    tables: dict,
    deadline: float,
) -> Entry:
    """One candidate trained on about ``images`` images, scored on the held-out split, in its own scratch job
    folder; ``tables``: the training table (and frozen features) by size, read once per race;
    ``deadline``: the race's end."""
    import pandas as pd

    from pipeline.core.device import resolve_device
    from pipeline.data.formats import read_table
    from pipeline.runs.layout import RunDir
    from pipeline.train.executors import _head_embeddings
    from pipeline.train.job import FoldTrainer

    head_only, kw = recipe.finetune == "head", _split_kw(cfg, facts)
    epochs, steps = schedule(images, n_train=kw["n_train"], batch_size=cfg.train.batch_size)
    planned = job_seconds(speed, images, head_only=head_only, features=round_no == 1, **kw)
    entry = Entry(
        name=recipe.name, rank=recipe.rank, round=round_no, epochs=epochs, steps=steps, planned_s=planned, images=images
    )
    c = with_values(cfg, {**recipe.config_values(cfg), **_race_keys(cfg, facts, epochs, steps)})
    t0 = time.time()
    key = (c.data.image_size, c.data.channels)
    if key not in tables:
        tables[key] = read_table(c, "train")
    table = tables[key]
    fold_of = holdout(table.labels, cfg.race.holdout, cfg.folds.seed)
    seed = cfg.train.seed
    job = RunDir(path=run_dir / f"round{round_no}-{recipe.name}", seeds=[seed], cfg=c).job_dir(0, seed)
    device = resolve_device(c.train.device)
    emb = None
    if head_only:  # the frozen features, computed once per race and size
        ekey = ("features", key, c.model.backbone)
        if ekey not in tables:
            tables[ekey] = _head_embeddings(c, table, device, seed)
        emb = tables[ekey]
    done = FoldTrainer(
        cfg=c,
        table=table,
        fold_of=fold_of,
        job=job,
        device=device,
        run_hash=f"race-{c.hash()}-{epochs}-{steps}",
        precision=c.train.precision if c.train.precision != AUTO else "fp32",
        embeddings=emb,
        deadline=min(t0 + 1.5 * planned + 5, deadline),
    ).run()
    entry.seconds = time.time() - t0
    if not job.oof.is_file():  # no epoch improved on the initial loss (NaN): the candidate scores last
        log.info(f"race round {round_no}: {recipe.name}: no usable epoch; scored last")
        return entry
    _score(entry, pd.read_csv(job.oof), table.class_names)
    log.info(
        f"race round {round_no}: {recipe.name}: {epochs} epoch(s)"
        + (f" of {steps} steps" if steps else "")
        + f" in {entry.seconds:.0f} s (planned {planned:.0f} s), "
        f"best epoch {done['best_epoch']}: calibrated log-loss {entry.score:.4f} (raw {entry.logloss:.4f}, "
        f"accuracy {entry.accuracy:.4f})"
    )
    return entry


def _score(entry: Entry, oof, class_names) -> None:
    """The held-out rows' log-loss after the temperature that fits them (per row too), raw log-loss and accuracy."""
    from pipeline.core.metrics import accuracy, logloss
    from pipeline.runs.predictions import probs_of
    from pipeline.tasks.calibration import apply_temperature, fit_temperature

    y = oof["target"].to_numpy()
    probs = probs_of(oof, class_names)
    entry.logloss, entry.accuracy = logloss(y, probs), accuracy(y, probs)
    calibrated = np.clip(apply_temperature(probs, fit_temperature(y, probs)), 1e-15, 1)
    entry.losses = -np.log(calibrated[np.arange(len(y)), y])
    entry.score = logloss(y, calibrated)


def _race_keys(cfg: Config, facts: Facts, epochs: int, steps: int | None) -> dict:
    """What a race job trains with besides its recipe: its short schedule, one model, no refit, no budget."""
    out = {
        "train.epochs": epochs,
        "train.max_steps_per_epoch": steps,
        "train.patience": 0,
        "train.seeds": None,
        "train.refit": False,
        "train.time_budget_s": None,
    }
    if cfg.data.channels == AUTO:
        out["data.channels"] = facts.channels
    return out
