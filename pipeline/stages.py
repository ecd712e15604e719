"""``pipeline run``: fold -> train -> evaluate -> predict -> submission, skipping fresh stages.

A stage is *done* when its output exists and the hash of the config sections it depends on
(``config.STAGE_SECTIONS``) equals the one saved beside that output; *stale* when the output
exists under another hash (or an upstream stage will rerun); *missing* otherwise. Training is stale too
when its jobs finished under another run hash (``pipeline.train.finished.run_hash``: the folds file's bytes, and with
``pseudo`` the source's prediction files, changed since).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.load import read_stage_hash
from pipeline.config.schema import Config
from pipeline.data.folds import n_folds
from pipeline.runs.layout import RunDir
from pipeline.train.finished import run_hash

log = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    output: Callable[[Config], Path]
    snapshot: Callable[[Config], Path]
    run: Callable[[Config], object]


def _fold(cfg):
    from pipeline.data.folds import run_fold

    run_fold(cfg)


def _train(cfg):
    from pipeline.train.cv import train_cv

    if train_cv(cfg) is None:  # pragma: no cover - all folds are requested
        raise RuntimeError("training ended without complete OOF predictions")


def _evaluate(cfg):
    from pipeline.evaluate.evaluator import evaluate

    evaluate(cfg)


def _predict(cfg):
    from pipeline.predict.predictor import submit_experiment

    submit_experiment(cfg)


STAGES = [
    Stage("fold", lambda c: c.folds_path, lambda c: c.folds_path.with_suffix(".config.yaml"), _fold),
    Stage("train", lambda c: RunDir.of(c).oof, lambda c: RunDir.of(c).snapshot("train"), _train),
    Stage("evaluate", lambda c: RunDir.of(c).metrics_json, lambda c: RunDir.of(c).snapshot("evaluate"), _evaluate),
    Stage("predict", lambda c: RunDir.of(c).test_pred, lambda c: RunDir.of(c).snapshot("predict"), _predict),
]


def stage_states(cfg: Config) -> list[tuple[Stage, str]]:
    """(stage, done|stale|missing); a stage after one that must rerun is stale too."""
    out, upstream_rerun = [], False
    for st in STAGES:
        if not st.output(cfg).exists():
            state = "missing"
        elif (
            upstream_rerun
            or read_stage_hash(st.snapshot(cfg)) != cfg.hash(*_sections(cfg, st.name))
            or (st.name == "train" and not _jobs_current(cfg))
        ):
            state = "stale"
        else:
            state = "done"
        upstream_rerun |= state != "done"
        out.append((st, state))
    return out


def _jobs_current(cfg: Config) -> bool:
    """No finished fold job of this config's folds holds another run hash than its inputs give now."""
    from pipeline.core.errors import PipelineError

    run = RunDir.of(cfg)
    try:
        want = run_hash(cfg)
    except (PipelineError, OSError):  # e.g. a pseudo source without its files: training says what is wrong
        return False
    done = (job.read_done() for job in run.jobs(list(range(n_folds(cfg)))))
    return all(d is None or d.get("hash") == want for d in done)


def _sections(cfg: Config, stage: str):
    from pipeline.config.schema import stage_sections

    return stage_sections(cfg, stage)


def run_all(cfg: Config) -> dict[str, float]:
    """Run every stage that is not done; returns seconds per stage (0 for skipped ones)."""
    from pipeline.plan.store import planned

    t0 = time.time()
    cfg = planned(cfg)
    times = {"plan": time.time() - t0} if cfg.plan is not None else {}
    race_s = (cfg.plan or {}).get("race", {}).get("seconds") if (cfg.plan or {}).get("made_now") else None
    if race_s is not None:  # the race trains: its own stage, out of the plan's time
        times = {"plan": max(times["plan"] - race_s, 0.0), "race": race_s}
    for st, state in stage_states(cfg):
        if state == "done":
            log.info(f"[{st.name}] up to date ({st.output(cfg)}), skipping")
            times[st.name] = 0.0
            continue
        log.info(f"[{st.name}] {'rerunning (stale)' if state == 'stale' else 'running'}")
        t0 = time.time()
        st.run(cfg)
        times[st.name] = time.time() - t0
        log.info(f"[{st.name}] done in {times[st.name]:.1f}s")
    log.info(
        "stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) + f"; total {sum(times.values()):.1f}s"
    )
    log.info(_peak_memory())
    return times


def _peak_memory() -> str:
    """Peak resident memory of this process and of its largest finished worker process (Linux/macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return "peak memory: not measured on this platform"
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**30
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit / 2**30
    return f"peak memory: {own:.2f} GiB in this process" + (f", {child:.2f} GiB in its largest worker" if child else "")


def status(cfg: Config) -> list[tuple[str, str, str]]:
    from pipeline.plan.store import planned

    cfg = planned(cfg, create=False, require=False)  # not planned yet: every stage shows as missing or stale
    rows = [(st.name, state, str(st.output(cfg))) for st, state in stage_states(cfg)]
    w = max(len(r[0]) for r in rows)
    for name, state, path in rows:
        log.info(f"{name:<{w}}  {state:<7}  {path}")
    return rows
