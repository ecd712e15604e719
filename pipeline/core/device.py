"""Device and thread policy, and the GPU decisions as small pure functions.

The CUDA paths cannot run on a CPU-only machine, so every choice they make is a pure function of
plain values (device type, precision name, a capability flag), unit-tested on CPU with fake device
types (tests/test_gpu_paths.py); the few lines with side effects (``prepare_training_device``) only
apply what these functions decided. ``benchmarks/gpu_smoke.py`` runs them on a real GPU.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch

from pipeline.core.errors import PipelineError

DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what train.device accepts (the config checks it)


def parse_device(name: str) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``, ``"cpu"`` -> ``("cpu", None)``; the config already refused other text."""
    if not DEVICE_RE.fullmatch(name):
        raise PipelineError(f"train.device: got {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    kind, _, idx = name.partition(":")
    return kind, int(idx) if idx else None


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, idx = parse_device(name)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(
                f"train.device: {name} requested but CUDA is not available; use train.device=cpu or auto"
            )
        n = torch.cuda.device_count()
        if (idx or 0) >= n:
            raise PipelineError(f"train.device: {name} but only {n} CUDA device(s); expected cuda:0..{n - 1}")
    if kind == "mps" and not _mps_available():
        raise PipelineError("train.device: mps requested but not available; use train.device=cpu or auto")
    return torch.device(name)


# ---- precision -----------------------------------------------------------------------------


class Amp(NamedTuple):
    """How a step runs: the autocast dtype (None: fp32, autocast off) and whether the loss is scaled."""

    dtype: torch.dtype | None
    scaler: bool


def auto_precision(device_type: str, bf16_supported: bool) -> str | None:
    """``train.precision: auto`` where it needs no measurement: on CUDA bf16 where the GPU has it natively
    (Ampere and later), else fp16 with loss scaling. Elsewhere None: CPU and mps time fp32 against bf16
    once per machine (pipeline/train/precision.py)."""
    if device_type == "cuda":
        return "bf16" if bf16_supported else "fp16"
    return None


def amp_plan(device_type: str, precision: str, bf16_supported: bool = True) -> Amp:
    """fp16 has a narrow exponent range, so small gradients underflow unless the loss is scaled
    (``torch.amp.GradScaler``); bf16 has fp32's range and needs no scaler. fp16 is CUDA-only here: CPU
    autocast in fp16 is slow and mps has no GradScaler, so it is refused in one line."""
    if precision == "auto":
        choice = auto_precision(device_type, bf16_supported)
        if choice is None:  # a caller skipped pipeline.train.precision.resolve_precision: a bug, not bad input
            raise ValueError(f"train.precision auto on {device_type} is measured: resolve it first")
        precision = choice
    if precision == "fp32":
        return Amp(None, False)
    if precision == "bf16":
        return Amp(torch.bfloat16, False)
    if precision == "fp16":
        if device_type != "cuda":
            raise PipelineError(
                f"train.precision: fp16 needs a CUDA device (loss scaling with torch.amp.GradScaler) but "
                f"the device is {device_type}; use train.precision=bf16, fp32 or auto"
            )
        return Amp(torch.float16, True)
    raise ValueError(f"unknown precision {precision!r}")


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 on the current CUDA device (``prepare_training_device`` makes it the training one);
    emulated bf16 runs but is slower than fp16, so it does not count."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


# ---- copies and loaders --------------------------------------------------------------------


def non_blocking(device: torch.device) -> bool:
    """Host-to-GPU copies overlap with compute; on CPU a copy is a no-op and the flag means nothing."""
    return device.type == "cuda"


def loader_kwargs(device: torch.device) -> dict:
    """DataLoader options that depend on the device: page-locked batches only for CUDA (they make
    ``non_blocking`` copies asynchronous; elsewhere they cost memory and a warning)."""
    return {"pin_memory": device.type == "cuda"}


# ---- determinism ---------------------------------------------------------------------------


def cudnn_flags(deterministic: bool) -> dict:
    """``train.deterministic``: true (default) picks deterministic cuDNN kernels and asks torch for
    deterministic algorithms; ``warn_only`` because some CUDA backward ops (adaptive average pooling,
    which most timm heads use) have no deterministic kernel and would otherwise stop training with an
    error: they warn instead. false lets cuDNN benchmark and pick the fastest kernel per shape (faster,
    run-to-run differences in the last digits)."""
    return {
        "benchmark": not deterministic,
        "deterministic": deterministic,
        "use_deterministic_algorithms": deterministic,
        "warn_only": True,
    }


def apply_cudnn_flags(device: torch.device, deterministic: bool) -> dict | None:
    """Set the process-wide flags for a CUDA run; on CPU and mps nothing is touched (their kernels here
    do not depend on these flags), so CPU runs stay exactly as they were."""
    if device.type != "cuda":
        return None
    flags = cudnn_flags(deterministic)
    if deterministic:  # cuBLAS is deterministic only with a fixed workspace; read when its handle is made
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = flags["benchmark"]
    torch.backends.cudnn.deterministic = flags["deterministic"]
    torch.use_deterministic_algorithms(flags["use_deterministic_algorithms"], warn_only=flags["warn_only"])
    return flags


def prepare_training_device(t) -> torch.device:
    """The boundary of every command that trains (``train`` section ``t``): resolve the device, refuse
    fp16 off CUDA in one line before any file is written, make ``cuda:K`` the current device (so
    capability queries, pinned memory and cuDNN refer to it) and set the determinism flags."""
    device = resolve_device(t.device)
    if t.precision == "fp16":
        amp_plan(device.type, "fp16")
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        apply_cudnn_flags(device, t.deterministic)
    return device
