"""Finished jobs of an experiment's earlier configs, kept: a changed override, a regenerated folds file or a
re-predicted pseudo-label source never discards a finished fold. ``runs/<comp>/<exp>/kept/<run hash>/<job>/``
holds them; going back to that config restores them instead of training them again."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pipeline.runs.layout import JobDir, RunDir


def kept_root(run: RunDir) -> Path:
    return run.path / "kept"


def keep(run: RunDir, job: JobDir, run_hash: str | None) -> Path:
    """Move a job finished under another config (``run_hash``) aside; returns where it went."""
    dest = kept_root(run) / _hash_name(run_hash) / job.name
    if dest.exists():  # the same finished job kept once already (switched back and forth): one copy
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    job.path.rename(dest)
    return dest


def restore(run: RunDir, job: JobDir, run_hash: str) -> Path | None:
    """Put back a job this config finished before (kept when another config trained); None when none is."""
    src = kept_root(run) / _hash_name(run_hash) / job.name
    kept = JobDir(path=src, fold=job.fold, seed=job.seed, label=job.label, train_cmd=job.train_cmd)
    if not kept.is_done(run_hash) or job.path.exists():
        return None
    src.rename(job.path)
    for d in (src.parent, kept_root(run)):  # drop emptied folders
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return src


def kept_jobs(run: RunDir) -> dict[str, int]:
    """{run hash: finished jobs kept} of the experiment's earlier configs."""
    root = kept_root(run)
    if not root.is_dir():
        return {}
    return {
        d.name: n
        for d in sorted(root.iterdir())
        if d.is_dir() and (n := sum(1 for j in d.iterdir() if (j / "done.json").is_file()))
    }


def _hash_name(run_hash: str | None) -> str:
    """A kept folder's name: the run hash it finished under (text only: it names a folder)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(run_hash or "unknown"))[:80] or "unknown"
