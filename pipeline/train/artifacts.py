"""What one training job writes in its folder (``Artifacts``: history, TensorBoard, best/last checkpoints,
its OOF rows, the resume state, the done marker) and what its loop carries from epoch to epoch and
restores on resume (``Progress``). The loop itself is ``pipeline.train.job.FoldTrainer``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, atomic_write_csv
from pipeline.models.backbones import save_checkpoint
from pipeline.runs.layout import JobDir
from pipeline.runs.predictions import write_predictions

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Progress:
    """What the loop carries from epoch to epoch, and what resume restores."""

    best: dict = field(default_factory=lambda: {"val_loss": math.inf, "epoch": 0})
    bad_epochs: int = 0
    history: list = field(default_factory=list)


class Artifacts:
    """What a job writes in its folder (names: ``runs.JobDir``): history, TensorBoard, the best
    checkpoint and its OOF rows, the resume state, and the done marker last. With ``writes`` false
    (a torchrun rank other than 0) it keeps the history in memory and writes nothing."""

    def __init__(self, *, job: JobDir, run_hash: str, writes: bool = True):
        self.job, self.hash, self.writes = job, run_hash, writes
        self.tb = None

    @property
    def last_path(self) -> Path:
        return self.job.last

    def open_tb(self, start_epoch: int) -> None:
        if not self.writes:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.job.tb), purge_step=start_epoch)

    def close(self) -> None:
        if self.tb is not None:  # else its writer thread outlives the fold (one per pruned trial)
            self.tb.close()
            self.tb = None

    def record_epoch(self, progress: Progress, row: dict, scalars) -> None:
        progress.history.append(row)
        if not self.writes:
            return
        atomic_write_csv(self.job.history, pd.DataFrame(progress.history))
        for k in scalars:
            self.tb.add_scalar(k, row[k], row["epoch"])

    def history_until(self, epoch: int) -> list:
        """History rows up to ``epoch`` (rows written after the last checkpoint are dropped)."""
        if not self.job.history.exists():
            return []
        return pd.read_csv(self.job.history).query("epoch <= @epoch").to_dict("records")

    def save_best(self, model: nn.Module, meta: dict) -> None:
        if self.writes:
            save_checkpoint(model, self.job.best_weights, meta)

    def write_oof(self, frame: pd.DataFrame) -> None:
        if self.writes:
            write_predictions(self.job.oof, frame, "oof")

    def save_last(self, state: dict) -> None:
        if not self.writes:
            return
        with atomic_path(self.job.last) as tmp:
            torch.save({**state, "hash": self.hash}, tmp)

    def load_last(self, device: torch.device, what: str) -> dict | None:
        """The resume state, None when there is none or it is another config's."""
        if not self.job.last.exists():
            return None
        try:
            st = torch.load(self.job.last, map_location=device, weights_only=True)
        except Exception as e:
            raise PipelineError(
                f"{self.job.last}: corrupt resume checkpoint ({type(e).__name__}); delete it to restart "
                f"{what} (finished folds are kept)"
            ) from None
        if st.get("hash") != self.hash:
            log.info(f"{what}: resume state is from another config; starting over")
            return None
        return st

    def finish(self, done: dict) -> dict:
        if self.writes:
            self.job.write_done(done)
            self.job.last.unlink(missing_ok=True)
        return done
