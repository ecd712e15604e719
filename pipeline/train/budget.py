"""The time budget left to a training job: the one rule every executor applies.

A run with ``train.time_budget_s`` shares what is left of the budget equally among the waves of jobs
still to start (a wave: the jobs that run side by side, ``train.fold_jobs`` processes or Ray slots;
one job in this process). A job that early-stops hands its unused share to the jobs after it, and a
job that runs slow is stopped at its first epoch boundary past its deadline (``pipeline.train.callbacks.Deadline``), so
training ends within about an epoch of the budget.
"""

from __future__ import annotations

import time


def waves(jobs: int, width: int) -> int:
    """Waves of ``jobs`` run ``width`` at a time."""
    return -(-jobs // max(width, 1))


def job_deadline(budget_s: float | None, t_start: float, waves_left: int, now: float | None = None) -> float | None:
    """When a job starting ``now`` must stop: the budget left after ``t_start``, shared by the ``waves_left``
    waves still to run (this job's included); None without a budget."""
    if not budget_s:
        return None
    now = time.time() if now is None else now
    return now + max(budget_s - (now - t_start), 0.0) / max(waves_left, 1)
