"""Batched prediction shared by validation, evaluation and the predict stage."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.device import amp_plan, non_blocking


def to_tensor(images: np.ndarray, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Compact-dtype images (uint8/float16/float32, raw scale) -> float32 tensor on device."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device, non_blocking=non_blocking(device))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def features_tensor(features: np.ndarray | None, idx, device) -> torch.Tensor | None:
    if features is None:
        return None
    return torch.from_numpy(np.asarray(features[idx], np.float32)).to(device, non_blocking=non_blocking(device))


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast (``pipeline.core.device.amp_plan``). A model trained in fp16 on a GPU is
    predicted in fp32 on a device without fp16 (predicting needs no loss scaling); training there is
    refused at the boundary (``pipeline.core.device.prepare_training_device``)."""
    if precision == "fp16" and device.type != "cuda":
        precision = "fp32"
    dtype = amp_plan(device.type, precision).dtype
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)


@torch.no_grad()
def predict_logits(
    model,
    images: np.ndarray,
    features: np.ndarray | None,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
    precision: str = "fp32",
    transform=None,
) -> np.ndarray:
    """(N, K) float64 logits; ``transform`` maps an image batch tensor (TTA)."""
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        idx = np.arange(s, min(s + batch_size, len(images)))
        x = to_tensor(images[idx], device, channels_last)
        if transform is not None:
            x = transform(x)
        with autocast(device, precision):
            logits = model(x, features_tensor(features, idx, device))
        out.append(logits.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


class Rows:
    """Lazy row subset of an array (avoids copying a memmap to predict a fold)."""

    def __init__(self, arr, idx):
        self.arr, self.idx = arr, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.arr[self.idx[i]]
