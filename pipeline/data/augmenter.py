"""Applying a training augmentation: ``Augmenter`` runs a validated albumentations Compose (built by
``pipeline.data.augment.build_augment``) on CHW images in their own units, and ``worker_init_fn`` seeds
its copies in DataLoader workers.

Why the images are remapped: albumentations 2 treats float32 images as values in [0, 1].
On raw SAR dB values (about -50..+40) its intensity transforms silently clip to [0, 1]
(RandomBrightnessContrast and GaussNoise return an image of zeros) and geometric
transforms fill borders with 0, a bright frame in dB. So an ``Augmenter`` maps intensities
linearly from the table's ``value_range`` (lo, hi) into [0, 1], runs the Compose on HWC float32,
maps back, and **clips to value_range** (what albumentations does to its own float images anyway;
value_range is the format's declared pixel scale). How the config's values are translated into
that scale: ``pipeline.data.augment``.

Randomness: albumentations' ``Compose(seed=s)`` gives every transform its *own* generator
seeded with the same ``s``, so HorizontalFlip(p=0.5) and VerticalFlip(p=0.5) always fire
together (measured on 2.0.8). ``Augmenter.set_seed`` instead shares one numpy and one python
generator across all transforms. In a DataLoader worker each copy of an Augmenter would
repeat its siblings' stream; it reseeds itself on first use in a worker from (seed,
torch worker seed), unless ``set_seed`` was called inside that worker (as the train loop
does per batch). ``worker_init_fn`` does the same explicitly and also sets up cv2/numpy.
"""

from __future__ import annotations

import random
import sys

import numpy as np

from pipeline.core.errors import PipelineError

_ALB = None


def _albumentations():
    """Import albumentations once, quietly (no update check, no network)."""
    global _ALB
    if _ALB is None:
        import os

        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        import albumentations

        _ALB = albumentations
    return _ALB


class Augmenter:
    """Applies a validated albumentations Compose to CHW images in any value range.

    ``aug(image)`` (C,H,W) and ``aug.batch(images)`` (N,C,H,W) return float32 in the same
    units as the input, shape ``(C, *output_size)``. An empty spec is the identity.
    """

    def __init__(
        self,
        transforms: list,
        value_range: tuple[float, float],
        channels: int,
        image_size: tuple[int, int],
        output_size: tuple[int, int],
        seed: int | None,
        spec: list[dict] | None = None,
    ):
        self.transforms = transforms
        self.lo, self.hi = float(value_range[0]), float(value_range[1])
        self.channels, self.image_size, self.output_size = channels, tuple(image_size), tuple(output_size)
        self.spec = spec or []
        self.compose = _albumentations().Compose(transforms, p=1.0) if transforms else None
        self.seed: int | None = None
        self._worker_key = None
        self.set_seed(seed)

    @property
    def value_range(self) -> tuple[float, float]:
        return self.lo, self.hi

    @property
    def is_identity(self) -> bool:
        return self.compose is None

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.transforms) or "identity"
        return f"Augmenter([{names}], value_range={self.value_range}, channels={self.channels}, seed={self.seed})"

    # ---- randomness ----
    def set_seed(self, seed: int | None) -> None:
        """Restart the random stream: same seed, same outputs (None = fresh entropy)."""
        self.seed = seed
        self._worker_key = _worker_seed()  # an explicit seed inside a worker wins over auto-reseeding
        self._set_state(seed)

    def _set_state(self, seed: int | None) -> None:
        if self.compose is not None:
            s = None if seed is None else int(seed) % 2**64
            self.compose.set_random_state(np.random.default_rng(s), random.Random(s))

    def reseed_for_worker(self, worker_seed: int) -> None:
        """Derive this copy's stream from (seed, the DataLoader worker's torch seed)."""
        entropy = [worker_seed % 2**64] + ([] if self.seed is None else [self.seed % 2**64])
        self._set_state(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))
        self._worker_key = worker_seed

    def _check_worker(self) -> None:
        key = _worker_seed()
        if key is not None and key != self._worker_key:
            self.reseed_for_worker(key)

    # ---- application ----
    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3:
            raise PipelineError(f"augment: expected one (C, H, W) image, got shape {tuple(image.shape)}")
        return self.batch(image[None])[0]

    def batch(self, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) any dtype -> (N, C, H', W') float32, each image with the next random draw."""
        if self.compose is None:
            return np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise PipelineError(f"augment: expected (N, {self.channels}, H, W) images, got shape {tuple(images.shape)}")
        self._check_worker()
        scale = self.hi - self.lo
        x = np.asarray(images, dtype=np.float32)
        x = np.ascontiguousarray(((x - self.lo) * np.float32(1.0 / scale)).transpose(0, 2, 3, 1))
        out = np.stack([self.compose(image=img)["image"] for img in x])
        if out.ndim == 3:  # a transform dropped the channel axis of a 1-channel image
            out = out[..., None]
        np.clip(out, 0.0, 1.0, out=out)
        out = out.transpose(0, 3, 1, 2) * np.float32(scale) + np.float32(self.lo)
        return np.ascontiguousarray(out, dtype=np.float32)


def _worker_seed() -> int | None:
    """The torch DataLoader worker's seed, or None outside a worker (cheap: no torch import)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        info = torch.utils.data.get_worker_info()
    except AttributeError:
        return None
    return None if info is None else int(info.seed)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: cv2 without threads (albumentations #1246), numpy/random
    seeded from torch's per-worker seed, and every Augmenter on the dataset reseeded from it,
    so workers draw different streams that repeat when the torch seed repeats."""
    import cv2
    import torch

    cv2.setNumThreads(0)
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        for aug in _find_augmenters(info.dataset):
            aug.reseed_for_worker(int(info.seed))


def _find_augmenters(obj, depth: int = 3) -> list[Augmenter]:
    """Augmenters on a dataset, its attributes, and wrapped datasets (Subset, ConcatDataset)."""
    if isinstance(obj, Augmenter):
        return [obj]
    if depth == 0:
        return []
    children = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    if isinstance(obj, (list, tuple)):
        children = list(obj)
    found: list[Augmenter] = []
    for c in children:
        if isinstance(c, Augmenter) or hasattr(c, "__dict__") or isinstance(c, (list, tuple)):
            for a in _find_augmenters(c, depth - 1):
                if all(a is not f for f in found):
                    found.append(a)
    return found
