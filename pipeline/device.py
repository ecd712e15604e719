"""Device and thread policy."""
from __future__ import annotations

import torch

from .errors import PipelineError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PipelineError(f"train.device: {name} requested but CUDA is not available; use train.device=cpu or auto")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise PipelineError(f"train.device: {name} but only {torch.cuda.device_count()} CUDA device(s); expected cuda:0..{torch.cuda.device_count() - 1}")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PipelineError("train.device: mps requested but not available; use train.device=cpu or auto")
    return torch.device(name)
