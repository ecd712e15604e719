"""The layout of a run folder, ``<paths.runs>/<competition>/<experiment>/``: the only code that knows it.

  config.<stage>.yaml / .hash   resolved config of a stage and its stage hash, written last (the stage is done)
  precision.json                ``train.precision: auto`` resolved once per run ({"precision", "hash"})
  plan.json, plan.lock          the run plan (pipeline/plan/): ``auto`` values and the budget resolved once
  race/                         the recipe race's scratch jobs, one folder per candidate and round
  fold_<k>/                     one training job per fold; ``fold_<k>_seed<s>/`` when ``train.seeds`` has several
      best.safetensors, best.json   best epoch's weights and what built them
      last.pt                       resume state, removed when the job is done
      history.csv                   one row per epoch
      oof.csv                       this job's validation predictions at the best epoch
      tb/                           TensorBoard scalars
      lock                          held while a process trains the job
      done.json                     written last: {"hash": run hash, ...}; the job is finished
  refit/                        with ``train.refit``: the same files from all rows (``refit_seed<s>/`` per seed)
  oof.csv, oof_tta.csv          out-of-fold predictions (read and written by pipeline/runs/predictions.py)
  test_pred.csv                 test predictions of all fold models; test_pred_fold<k>.csv fold k's own;
                                test_pred_refit.csv the refit models'
  predict.json, metrics.json, calibration.json, ensemble.json, report/
  adversarial.json              train-vs-test classifier: AUC, test-like rows, duplicate pairs
                                (pipeline/evaluate/adversarial.py)
  adversarial_scores.csv        id,p_test: its out-of-fold p(test) for every training row
  tb_hparams/                   TensorBoard HParams: the run's (or tuning trial's) headline keys and CV metric
                                (pipeline/train/hparams.py), for `tensorboard --logdir <paths.runs>/<competition>`

A job is finished for a config when its ``done.json`` holds that config's *run hash*: the train-stage
hash and the digest of the folds file it trained on (``RunDir.run_hash``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config.load import read_stage_hash, write_snapshot
from pipeline.config.schema import stage_sections
from pipeline.core.errors import PipelineError
from pipeline.core.io import Staging, atomic_write_json, read_json_object, staged

if TYPE_CHECKING:
    from pipeline.config.schema import Config

STAGES = ("train", "evaluate", "predict")
OOF_FILES = ("oof.csv", "oof_tta.csv")  # the OOF files a predict.json may name
_MARKS = ("config.train.yaml", "oof.csv", "metrics.json", "ensemble.json")  # what makes a folder a run


@dataclass(frozen=True, kw_only=True)
class JobDir:
    """One training job's folder (a fold and seed, or a refit with ``fold == -1``) and its files."""

    path: Path
    fold: int
    seed: int
    label: str  # for log lines: "fold 2", "fold 2 seed 7", "refit", "refit seed 7"
    train_cmd: str = "pipeline train CONFIG"  # what retrains the job, for messages

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_refit(self) -> bool:
        return self.fold < 0

    best_weights = property(lambda self: self.path / "best.safetensors")
    best_meta = property(lambda self: self.path / "best.json")
    onnx = property(lambda self: self.path / "model.onnx")  # `pipeline export --onnx` (pipeline/predict/export.py)
    onnx_meta = property(lambda self: self.path / "model.onnx.json")
    last = property(lambda self: self.path / "last.pt")
    history = property(lambda self: self.path / "history.csv")
    oof = property(lambda self: self.path / "oof.csv")
    tb = property(lambda self: self.path / "tb")
    lock = property(lambda self: self.path / "lock")
    done = property(lambda self: self.path / "done.json")

    def read_done(self) -> dict | None:
        """done.json's contents; None while the job is not finished."""
        if not self.done.is_file():
            return None
        return read_json_object(self.done, f"delete it to train {self.label} again with `{self.train_cmd}`")

    def read_best_meta(self) -> dict:
        """best.json, checked: what rebuilds the model (``models.load_checkpoint``) and what it was fed."""
        fix = f"delete {self.done} to train {self.label} again with `{self.train_cmd}`"
        if not self.best_meta.is_file():
            raise PipelineError(f"{self.best_meta}: file not found; {fix}")
        d = read_json_object(self.best_meta, fix)
        problem = _best_meta_problem(d)
        if problem:
            raise PipelineError(f"{self.best_meta}: {problem}; {fix}")
        return d

    def is_done(self, run_hash: str | None) -> bool:
        """Finished under ``run_hash`` (None: finished under any hash)."""
        d = self.read_done()
        return d is not None and (run_hash is None or d.get("hash") == run_hash)

    def write_done(self, record: dict) -> None:
        """Mark the job finished; ``record`` must hold the run hash it is valid for."""
        if "hash" not in record:
            raise ValueError("done.json needs the run hash ('hash')")
        atomic_write_json(self.done, record)

    def clear_done(self) -> None:
        self.done.unlink(missing_ok=True)


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _best_meta_problem(d: dict) -> str | None:
    """Why best.json cannot rebuild its model, or None."""
    model = d.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), str):
        return "model is not an object with a backbone name"
    if not (model.get("input_size") is None or _is_int(model.get("input_size"), 1)):
        return f"model.input_size is {model.get('input_size')!r}; expected a positive integer or null"
    if model.get("input_norm", "dataset") not in ("dataset", "image"):
        return f"model.input_norm is {model.get('input_norm')!r}; expected dataset or image"
    for key in ("pretrained", "use_features"):  # what models.build_model reads besides the above
        if not isinstance(model.get(key), bool):
            return f"model.{key} is {model.get(key)!r}; expected true or false"
    rate = model.get("drop_rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        return f"model.drop_rate is {rate!r}; expected a number in [0, 1)"
    names = d.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(c, str) for c in names):
        return "class_names is not a list of at least 2 class names"
    size = d.get("img_size")
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v, 1) for v in size):
        return f"img_size is {size!r}; expected [height, width]"
    for key, lo in (("in_chans", 1), ("n_features", 0)):
        if not _is_int(d.get(key), lo):
            return f"{key} is {d.get(key)!r}; expected an integer >= {lo}"
    return None


class RunDir:
    """A run folder. ``RunDir.of(cfg)`` for a config's run (knows its seeds and hashes);
    ``RunDir(path=...)`` for a folder found on disk (file names only: its config is unknown)."""

    def __init__(self, *, path: str | Path, seeds: list[int] | None = None, cfg: Config | None = None):
        self.path = Path(path)
        self._seeds = list(seeds) if seeds else None
        self._cfg = cfg

    @classmethod
    def of(cls, cfg: Config) -> RunDir:
        return cls(path=cfg.run_dir, seeds=cfg.train.seed_list, cfg=cfg)

    @classmethod
    def named(cls, cfg: Config, name: str) -> RunDir:
        """The folder of experiment (or ensemble) ``name`` of ``cfg``'s competition."""
        return cls(path=cfg.run_dir.parent / name)

    @classmethod
    def list_runs(cls, cfg: Config) -> list[RunDir]:
        """Every run of ``cfg``'s competition: folders with training or ensemble outputs (not tune/)."""
        root = cfg.run_dir.parent
        if not root.is_dir():
            return []
        return [cls(path=p) for p in sorted(root.iterdir()) if any((p / m).is_file() for m in _MARKS)]

    def __repr__(self) -> str:
        return f"RunDir(path={str(self.path)!r}, seeds={self._seeds})"

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            raise ValueError(f"{self.path}: a RunDir made from a path has no config; use RunDir.of(cfg)")
        return self._cfg

    # ---- jobs -------------------------------------------------------------------------

    @property
    def seeds(self) -> list[int]:
        """``train.seeds``, or ``[train.seed]`` when it is not set."""
        if self._seeds is None:
            if self._cfg is not None:  # train.seeds: auto, and no plan applied yet
                raise PipelineError(
                    f"{self._cfg.path}: train.seeds is auto, which the run's plan resolves; run "
                    f"`pipeline train {self._cfg.path}` with the same overrides first"
                )
            raise ValueError(f"{self.path}: seeds are unknown for a RunDir made from a path; use RunDir.of(cfg)")
        return list(self._seeds)

    def job_label(self, fold: int, seed: int) -> str:
        """How log lines name a job: ``fold 2`` (``fold 2 seed 7`` with several seeds); ``fold < 0``: refit."""
        what = "refit" if fold < 0 else f"fold {fold}"
        return what if len(self.seeds) == 1 else f"{what} seed {seed}"

    def job_dir(self, fold: int, seed: int) -> JobDir:
        """Fold ``fold``'s job for ``seed`` (``fold < 0``: the refit job)."""
        if fold < 0:
            return self.refit_dir(seed)
        name = f"fold_{fold}" if len(self.seeds) == 1 else f"fold_{fold}_seed{seed}"
        return JobDir(
            path=self.path / name,
            fold=fold,
            seed=seed,
            label=self.job_label(fold, seed),
            train_cmd=self.command("train"),
        )

    def refit_dir(self, seed: int) -> JobDir:
        name = "refit" if len(self.seeds) == 1 else f"refit_seed{seed}"
        return JobDir(
            path=self.path / name, fold=-1, seed=seed, label=self.job_label(-1, seed), train_cmd=self.command("train")
        )

    def command(self, stage: str) -> str:
        """The command that (re)makes ``stage``'s files here: with the config when it is known."""
        return f"pipeline {stage} {self._cfg.path if self._cfg is not None else f'<config of {self.name}>'}"

    def jobs(self, folds: list[int]) -> list[JobDir]:
        """The training jobs of ``folds`` in training order: seed-major, then fold."""
        return [self.job_dir(k, s) for s in self.seeds for k in folds]

    @property
    def train_hash(self) -> str:
        """The config's train-stage hash (what ``config.train.hash`` holds once it has trained)."""
        return self.cfg.hash(*stage_sections(self.cfg, "train"))

    # ---- pseudo-labels: the source run and its files (what they mean: pipeline/train/pseudo.py) ----

    @property
    def pseudo_json(self) -> Path:
        """What a pseudo-labelled run trained on besides its rows: the source, its digest, rows per class and fold."""
        return self.path / "pseudo.json"

    def finished_fold_oofs(self, n_folds: int, run_hash: str) -> tuple[dict[int, list[Path]], list[int]]:
        """({fold: its jobs' oof.csv, one per seed} for folds whose every seed is done, folds still waiting)."""
        ready, waiting = {}, []
        for k in range(n_folds):
            jobs = [self.job_dir(k, s) for s in self.seeds]
            if all(j.is_done(run_hash) for j in jobs):
                ready[k] = [j.oof for j in jobs]
            else:
                waiting.append(k)
        return ready, waiting

    def done_records(self) -> list[dict]:
        """done.json of every finished fold job, whatever the seed layout (refit jobs excluded)."""
        return [d for _, d in self.done_jobs()]

    def done_jobs(self) -> list[tuple[JobDir, dict]]:
        """(job, its done.json) of every finished fold job, whatever the seed layout (refit jobs excluded)."""
        out = []
        for done in sorted(self.path.glob("fold_*/done.json")):
            job = JobDir(path=done.parent, fold=0, seed=0, label=done.parent.name, train_cmd=self.command("train"))
            d = job.read_done()
            if d is not None:
                out.append((job, d))
        return out

    def histories(self) -> list[tuple[str, Path]]:
        """(label, history.csv) of every fold job that has one, by fold then seed: ("fold 2 seed 7", path)."""
        import re

        found = []
        for d in self.path.glob("fold_*"):
            m = re.fullmatch(r"fold_(\d+)(?:_seed(-?\d+))?", d.name)
            if m and (d / "history.csv").is_file():
                fold, seed = int(m.group(1)), m.group(2)
                label = f"fold {fold}" + (f" seed {seed}" if seed is not None else "")
                found.append(((fold, int(seed or 0)), label, d / "history.csv"))
        return [(label, h) for _, label, h in sorted(found)]

    # ---- stage snapshots ----------------------------------------------------------------

    def snapshot(self, stage: str) -> Path:
        """``config.<stage>.yaml``: the resolved config a stage ran with; its hash sits beside it."""
        if stage not in STAGES:
            raise ValueError(f"no run-folder stage {stage!r}; expected one of {', '.join(STAGES)}")
        return self.path / f"config.{stage}.yaml"

    def snapshot_hash(self, stage: str) -> str | None:
        return read_stage_hash(self.snapshot(stage))

    def write_snapshot(self, stage: str, resolved: dict | None = None, *, into: Staging | None = None) -> str:
        """Record that ``stage`` ran with this config (last, once its outputs are written); returns its hash.
        ``into``: write it into that staging (``staged``), which moves it into place last."""
        if into is None:
            return write_snapshot(self.cfg, self.snapshot(stage), stage, resolved)
        yaml_path, _ = (into.path(p) for p in self.done_markers(stage))
        return write_snapshot(self.cfg, yaml_path, stage, resolved)

    def done_markers(self, stage: str) -> list[Path]:
        """The files that mark ``stage`` done, in the order they are written: a stage snapshot and its
        hash, or an ensemble's ``ensemble.json``."""
        if stage == "ensemble":
            return [self.ensemble_json]
        snap = self.snapshot(stage)
        return [snap, snap.with_suffix(".hash")]

    def staged(self, stage: str):
        """Write ``stage``'s files all or nothing (``io.staged``): its done markers move into place last."""
        return staged(self.path, last=self.done_markers(stage))

    # ---- precision.json -----------------------------------------------------------------

    @property
    def precision_json(self) -> Path:
        return self.path / "precision.json"

    # ---- plan.json ----------------------------------------------------------------------

    @property
    def plan_json(self) -> Path:
        return self.path / "plan.json"

    @property
    def plan_lock(self) -> Path:
        return self.path / "plan.lock"

    # ---- artifacts ----------------------------------------------------------------------

    oof = property(lambda self: self.path / "oof.csv")
    oof_tta = property(lambda self: self.path / "oof_tta.csv")
    test_pred = property(lambda self: self.path / "test_pred.csv")
    test_pred_refit = property(lambda self: self.path / "test_pred_refit.csv")
    predict_json = property(lambda self: self.path / "predict.json")
    metrics_json = property(lambda self: self.path / "metrics.json")
    calibration_json = property(lambda self: self.path / "calibration.json")
    ensemble_json = property(lambda self: self.path / "ensemble.json")
    report_dir = property(lambda self: self.path / "report")
    augment_preview = property(lambda self: self.path / "augment_preview.png")
    race_dir = property(lambda self: self.path / "race")  # the recipe race's scratch jobs (pipeline/plan/race.py)
    adversarial_json = property(lambda self: self.path / "adversarial.json")
    adversarial_scores = property(lambda self: self.path / "adversarial_scores.csv")
    tb_hparams = property(lambda self: self.path / "tb_hparams")

    def test_pred_fold(self, fold: int) -> Path:
        """Fold ``fold``'s models' own test predictions (averaged over its seeds)."""
        return self.path / f"test_pred_fold{fold}.csv"

    def test_pred_fold_files(self) -> dict[int, Path]:
        """Every ``test_pred_fold<k>.csv`` present, by fold."""
        out = {}
        for p in self.path.glob("test_pred_fold*.csv"):
            k = p.stem.removeprefix("test_pred_fold")
            if k.isdigit():
                out[int(k)] = p
        return dict(sorted(out.items()))

    def oof_file(self, name: str = "oof.csv") -> Path:
        """The OOF file ``predict.json`` names (``oof.csv`` or ``oof_tta.csv``)."""
        if name not in OOF_FILES:
            raise PipelineError(
                f"{self.predict_json}: oof is {name!r}; expected one of {', '.join(OOF_FILES)}; "
                "rerun `pipeline predict`"
            )
        return self.path / name

    @property
    def is_ensemble(self) -> bool:
        return self.ensemble_json.is_file()


# ---- the competition's folder: its runs and the tuning studies beside them -------------------


def competition_dir(cfg: Config) -> Path:
    """``<paths.runs>/<competition>/``: every run of the competition, and ``tune/``."""
    return cfg.run_dir.parent


def tune_dir(cfg: Config, study: str | None = None) -> Path:
    """``tune/`` (the default SQLite study storage) or one study's folder (trials.csv, best.yaml, trial runs)."""
    root = competition_dir(cfg) / "tune"
    return root if study is None else root / study
