"""Grad-CAM (Selvaraju et al. 2017) with plain torch hooks, for any ``models.Net``.

The map is ReLU(sum_c alpha_c A_c) where A is the backbone's last convolutional feature map and
alpha_c the spatial mean of d(class logit)/dA_c. It shows which parts of the image raised the
score of the class that is explained.

Which feature map: the output of the backbone's last ``nn.Conv2d``, followed through the leaf
modules after it that keep its spatial size (normalisation, activation, a residual block's
final activation), and stopping before pooling shrinks it. That is timm's ``forward_features``
output for CNNs (EfficientNet ``bn2``, ResNet ``layer4``) and the last ReLU of ``simple_cnn``.
When the input is so small that the last conv's map is 1x1 (no spatial information), the last
conv with a larger map is used. Backbones whose last conv feeds token layers (ViT) have no such
map: ``NoFeatureMap``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class NoFeatureMap(Exception):
    """The backbone has no convolutional feature map to explain."""


def _leaves(module: nn.Module):
    return [(n, m) for n, m in module.named_modules() if not list(m.children())]


@torch.enable_grad()
def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    features: torch.Tensor | None = None,
    classes: np.ndarray | list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Grad-CAM maps for a batch of raw-scale images (what ``Net.forward`` takes).

    ``classes``: the class explained per image (default: the predicted one).
    Returns (maps (N, H, W) in [0, 1] at the image's size, logits (N, K), the feature map's module
    name and size, e.g. ``"bn2.act (3x3)"``).
    """
    model.eval()
    records: list[tuple[str, nn.Module, torch.Tensor]] = []

    def hook(name):
        def f(mod, inp, out):
            if isinstance(out, torch.Tensor):
                records.append((name, mod, out))

        return f

    backbone = getattr(model, "backbone", model)
    handles = [m.register_forward_hook(hook(n)) for n, m in _leaves(backbone)]
    try:
        x = images.detach().float()
        logits = model(x, features) if features is not None else model(x)
    finally:
        for h in handles:
            h.remove()
    name, fmap, shrink = _feature_map(records)
    cls = logits.argmax(1) if classes is None else torch.as_tensor(np.asarray(classes), device=logits.device).long()
    # Sum over the batch: each image's logit depends only on its own map (eval mode), so one
    # backward pass gives every image's gradient.
    target = logits.gather(1, cls.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(target, fmap)
    alpha = grad.mean((2, 3), keepdim=True)
    cam = F.relu((alpha * fmap).sum(1, keepdim=True))
    cam = _to_image_grid(cam.detach(), tuple(images.shape[-2:]), shrink)[:, 0].cpu().double().numpy()
    peak = cam.reshape(len(cam), -1).max(1).reshape(-1, 1, 1)
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    return cam, logits.detach().cpu().double().numpy(), f"{name} ({fmap.shape[-2]}x{fmap.shape[-1]})"


def _to_image_grid(cam: torch.Tensor, size: tuple[int, int], shrink: int = 0) -> torch.Tensor:
    """Upsample a (N, 1, h, w) map by its stride and centre it on the image.

    Stretching a map to the image size misplaces it when convolutions are unpadded
    (``simple_cnn``: the 20x20 map of a 24x24 image covers the image's centre, not all of it).
    ``shrink`` is the border those convolutions eat; the map is scaled by the stride of what is
    left, and the difference is cut or zero-padded evenly.
    """
    scaled = [max(1, round(max(full - shrink, 1) / small)) * small for full, small in zip(size, cam.shape[-2:])]
    cam = F.interpolate(cam, size=tuple(scaled), mode="bilinear", align_corners=False)
    (h, w), (sh, sw) = size, scaled
    top, left = (sh - h) // 2, (sw - w) // 2  # negative: pad
    cam = cam[:, :, max(top, 0) : max(top, 0) + h, max(left, 0) : max(left, 0) + w]
    if top < 0 or left < 0:
        pt, pl = max(-top, 0), max(-left, 0)
        cam = F.pad(cam, (pl, w - cam.shape[3] - pl, pt, h - cam.shape[2] - pt))
    return cam


def _valid_shrink(records) -> int:
    """Pixels per axis that unpadded stride-1 convolutions remove (2 per 3x3 conv of ``simple_cnn``).

    timm's padded convolutions remove none; its ``Conv2dSame`` pads inside forward, so it is skipped.
    """
    shrink = 0
    for _, m, _ in records:
        if isinstance(m, nn.Conv2d) and not type(m).__name__.endswith("Same"):
            k, st, pad, dil = m.kernel_size[0], m.stride[0], m.padding, m.dilation[0]
            if pad in (0, (0, 0)) and st == 1 and k > 1:
                shrink += (k - 1) * dil
    return shrink


def _feature_map(records) -> tuple[str, torch.Tensor, int]:
    # A conv with a 1x1 output (squeeze-and-excitation on a pooled vector) holds no spatial map.
    convs = [i for i, (_, m, out) in enumerate(records) if isinstance(m, nn.Conv2d) and out.shape[-2:].numel() > 1]
    if not convs:
        raise NoFeatureMap("the backbone has no Conv2d layer with a spatial output")
    i = convs[-1]
    size = records[i][2].shape[-2:]
    best = i
    for j in range(i + 1, len(records)):
        out = records[j][2]
        if out.dim() == 3:  # tokens after the last conv (a ViT's patch embedding): no spatial map
            raise NoFeatureMap(f"the last Conv2d ({records[i][0]}) feeds token layers")
        if out.dim() == 4 and out.shape[-2:] == size and out.requires_grad:
            best = j
    return records[best][0], records[best][2], _valid_shrink(records[: best + 1])


def mass_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of a map's total mass that falls inside a boolean mask."""
    total = cam.sum()
    return float(cam[mask].sum() / total) if total > 0 else 0.0
