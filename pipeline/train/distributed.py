"""Data-parallel training under torchrun: which rank this process is, and the few collective steps
the trainer and the CV driver take (``DistContext``).

``torchrun --nproc_per_node N -m pipeline train CONFIG`` starts N copies of the command; torchrun's
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) says which
one this is. A world of one (no torchrun, or ``--nproc_per_node 1``) is ``DistContext()``: no
process group, and every method hands its input back untouched, so one process runs today's code.

How the ranks of a world train one model (``pipeline.train.trainer.FoldTrainer``):

- ``train.batch_size`` is the global batch. Every rank draws the same epoch permutation from
  (seed, fold, epoch), as one process does, and trains its contiguous share of each global batch
  (``shard_batches``); each share's loss is weighted by its size, so DDP's averaged gradient is the
  global batch's mean gradient, as in one process. The world size changes where a run computes, not
  what it computes, so it is not part of the run hash.
- Validation rows are split the same way and the probabilities gathered (``gather_rows``): every
  rank holds the same validation loss, for the scheduler and the stop rules.
- What decides the course of a run (a job's lock, early stopping, the deadline, a pruner's
  exception, the OOF file) happens on rank 0 and is broadcast (``broadcast_decision``), so ranks
  never disagree and then wait for each other in a collective forever.
- Rank 0 alone writes files; the others read what it wrote (a resume state, a plan).

torch is imported inside the methods, so the CLI reads torchrun's environment without it.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def _env_int(env: Mapping[str, str], name: str, default: int | None, lo: int) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise PipelineError(
                f"environment: WORLD_SIZE is set but {name} is not; start the command with torchrun, "
                f"which sets {', '.join(ENV_KEYS)}"
            )
        return default
    try:
        v = int(raw)
    except ValueError:
        raise PipelineError(f"environment: {name}={raw!r} is not a whole number; expected what torchrun sets") from None
    if v < lo:
        raise PipelineError(f"environment: {name}={v}; expected a whole number >= {lo}")
    return v


@dataclass(frozen=True, kw_only=True)
class DistContext:
    """This process's place in a torchrun world; ``DistContext()`` is one process alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistContext:
        """The world torchrun's environment describes (``os.environ`` by default); without
        ``WORLD_SIZE``, one process alone."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        world = _env_int(env, "WORLD_SIZE", None, 1)
        rank = _env_int(env, "RANK", None, 0)
        local = _env_int(env, "LOCAL_RANK", rank, 0)
        if rank >= world:
            raise PipelineError(f"environment: RANK={rank} with WORLD_SIZE={world}; expected RANK < WORLD_SIZE")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def active(self) -> bool:
        """More than one process: a process group, DDP, sharded batches."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"world_size {self.world_size}" if self.active else "one process"

    # ---- set-up ------------------------------------------------------------------------------

    def check(self, cfg) -> torch.device:
        """This rank's device for ``cfg``; what a world cannot run is one line naming the key,
        before any process group exists (so it is exit code 2, not a hang)."""
        import torch

        from pipeline.core.device import prepare_training_device

        t = cfg.train
        if not self.active:
            if t.sync_bn:
                log.info("train.sync_bn: one process, no BatchNorm statistics to synchronise")
            return prepare_training_device(t)
        where = f"{cfg.path}: train" if cfg.path else "train"
        if t.fold_jobs > 1:
            raise PipelineError(
                f"{where}.fold_jobs: {t.fold_jobs} with torchrun (world_size {self.world_size}); "
                "expected train.fold_jobs=1: torchrun's processes train one fold together"
            )
        if t.executor == "ray":
            raise PipelineError(
                f"{where}.executor: ray with torchrun (world_size {self.world_size}); "
                "expected train.executor=local: torchrun's processes train one fold together"
            )
        if t.batch_size < 2 * self.world_size:
            raise PipelineError(
                f"{where}.batch_size: {t.batch_size} is the global batch, fewer than 2 rows for each of "
                f"{self.world_size} ranks (BatchNorm); expected at least {2 * self.world_size}"
            )
        if t.device.startswith("cuda:"):
            raise PipelineError(
                f"{where}.device: {t.device} with torchrun; expected cuda or auto (rank r uses cuda:LOCAL_RANK)"
            )
        if t.device == "mps":
            raise PipelineError(
                f"{where}.device: mps with torchrun; expected cuda or cpu (no process-group backend for mps)"
            )
        cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        if t.sync_bn and not cuda:
            raise PipelineError(
                f"{where}.sync_bn: true on cpu; torch's SyncBatchNorm runs on CUDA only, "
                "expected train.sync_bn=false with the gloo backend"
            )
        # this rank's GPU made current, fp16 off CUDA refused, cuDNN flags set: as for one process
        return prepare_training_device(t.model_copy(update={"device": f"cuda:{self.local_rank}" if cuda else "cpu"}))

    def init(self, device: torch.device) -> None:
        """Join the process group (``nccl`` on CUDA, ``gloo`` otherwise); ranks other than 0 log
        warnings only, so a run's lines appear once."""
        if not self.active:
            return
        import torch
        import torch.distributed as td

        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(
            backend,
            init_method="env://",
            rank=self.rank,
            world_size=self.world_size,
            **({"device_id": device} if device.type == "cuda" else {}),
        )
        if not self.is_main:
            logging.getLogger("pipeline").setLevel(logging.WARNING)
        log.info(f"torchrun: {self.world_size} processes, backend {backend}, rank 0 writes the run's files")

    def teardown(self) -> None:
        if not self.active:
            return
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
        logging.getLogger("pipeline").setLevel(logging.INFO)

    @contextmanager
    def running(self, device: torch.device):
        """``init`` ... ``teardown``, however the block ends."""
        self.init(device)
        try:
            yield self
        finally:
            self.teardown()

    # ---- collectives (each a pass-through in a world of one) ---------------------------------

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def broadcast_decision(self, decide: Callable[[], T]) -> T:
        """``decide()`` runs on rank 0; every rank returns its result, or raises what it raised.

        Whatever changes the course of a run goes through here (a lock taken, a stop rule, a
        pruner's exception, a file read once), so no rank goes on while another stops."""
        if not self.active:
            return decide()
        import torch.distributed as td

        box: list = [None]
        error = None
        if self.is_main:
            try:
                box[0] = ("ok", decide())
            except Exception as e:  # every rank raises it, rank 0 with its own traceback
                error = e
                box[0] = ("raise", _portable(e))
        td.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "raise":
            raise error if error is not None else value
        return value

    def main_first(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, then on the other ranks, which find what it made (a decoded-image
        cache) instead of making it again side by side; rank 0's error is every rank's."""
        if not self.active:
            return make()
        made: list = []
        self.broadcast_decision(lambda: made.append(make()))
        return made[0] if self.is_main else make()

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of ``rows`` (sizes differ by at most one)."""
        if not self.active:
            return rows
        return np.array_split(rows, self.world_size)[self.rank]

    def shard_batches(self, batches: list[np.ndarray]) -> tuple[list[np.ndarray], list[float] | None]:
        """This rank's share of each global batch, and the weight of its loss: DDP averages the
        ranks' gradients, so a share of ``n_r`` of ``n`` rows counts ``n_r * world_size / n`` and the
        average is the global batch's mean gradient even when the shares differ in size."""
        if not self.active:
            return batches, None
        shards = [self.shard(b) for b in batches]
        return shards, [len(s) * self.world_size / len(b) for s, b in zip(shards, batches)]

    def gather_rows(self, part: np.ndarray) -> np.ndarray:
        """The ranks' ``shard``-ed results put back together in row order, on every rank."""
        if not self.active:
            return part
        import torch.distributed as td

        parts: list = [None] * self.world_size
        td.all_gather_object(parts, part)
        return np.concatenate(parts)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        import torch
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64)
        if td.get_backend() == "nccl":
            t = t.cuda()
        td.all_reduce(t)
        return t.cpu().tolist()

    # ---- the model ---------------------------------------------------------------------------

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` in ``DistributedDataParallel`` (built anew whenever the set of trainable
        weights changes: DDP syncs the gradients of the weights that trained when it was built)."""
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """``train.sync_bn``: every BatchNorm (timm's BatchNormAct2d too, keeping its activation) as a
    SyncBatchNorm over the world, sharing the original weights and running statistics, so an
    optimizer built before still holds them and checkpoint keys are unchanged."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def _portable(e: Exception) -> Exception:
    """``e`` if it survives pickling (a PipelineError, optuna's TrialPruned), else its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        cls = PipelineError if isinstance(e, PipelineError) else RuntimeError
        return cls(f"rank 0: {type(e).__name__}: {e}")
