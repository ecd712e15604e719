"""One factory for every model: a timm backbone (or ``simple_cnn``) + scalar features + a head.

The ``Net`` carries its own input normalisation and feature standardisation as buffers, so a
checkpoint alone predicts on raw-scale images (uint8 values or dB) with no side files.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models import group_parameters, register_model
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, atomic_write_json


class SimpleCNN(nn.Module):
    """The seeds' baseline: Conv32-ReLU, Conv64-ReLU, MaxPool2, Dropout .25, Flatten, Dense128-ReLU, Dropout .5, out."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int | tuple = 28, **_):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
        )
        flat = 64 * ((h - 4) // 2) * ((w - 4) // 2)
        self.fc = nn.Sequential(nn.Linear(flat, 128), nn.ReLU(inplace=True), nn.Dropout(0.5))
        self.num_features = 128
        self.classifier = nn.Linear(128, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x):
        return self.fc(self.features(x))

    def forward(self, x):
        return self.classifier(self.forward_features(x))

    def group_matcher(self, coarse: bool = False):
        return {"stem": r"^features\.0", "blocks": [(r"^features\.(\d+)", None), (r"^fc", (99999,))]}


@register_model
def simple_cnn(pretrained: bool = False, **kwargs) -> SimpleCNN:
    if pretrained:
        raise PipelineError("model.pretrained: simple_cnn has no pretrained weights; set model.pretrained=false")
    return SimpleCNN(**kwargs)


class BnCNN(nn.Module):
    """A small CNN for images under 48 px trained from scratch, in the shape of the batch-norm CNNs of
    Kaggle's digit recognizer: three stages of padded 3x3 conv-BN-ReLU (32, 32 | 64, 64 | 128 channels),
    a 2x2 max-pool and dropout after the first two, global average pooling (any image size from 4 px).
    About 1.5x the compute of ``simple_cnn`` per image, a ninth of its parameters. Batch norm does not
    make it robust to a test set at another brightness or contrast by itself (it fixes train's
    statistics): augment intensities or set ``model.input_norm: image``."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, widths: tuple = (32, 64, 128), drop: float = 0.25, **_
    ):
        super().__init__()

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        a, b, c = widths
        stages = [
            conv(in_chans, a),  # the stem
            [*conv(a, a), nn.MaxPool2d(2), nn.Dropout(drop)],
            [*conv(a, b), *conv(b, b), nn.MaxPool2d(2), nn.Dropout(drop)],
            [*conv(b, c), nn.AdaptiveAvgPool2d(1), nn.Flatten()],
        ]
        self.features = nn.Sequential(*(m for stage in stages for m in stage))  # flat: layer names as features.<i>
        self._stage_sizes = [len(stage) for stage in stages]
        self.num_features = c
        self.classifier = nn.Linear(c, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x):
        return self.features(x)

    def forward(self, x):
        return self.classifier(self.forward_features(x))

    def group_matcher(self, coarse: bool = False):
        """The stem, then one group per stage (``model.unfreeze_stages`` counts these from the end)."""
        bounds = np.cumsum([0, *self._stage_sizes])

        def layers(i: int) -> str:
            return r"^features\.(?:" + "|".join(map(str, range(bounds[i], bounds[i + 1]))) + r")\."

        return {"stem": layers(0), "blocks": [(layers(i), (i - 1,)) for i in range(1, len(self._stage_sizes))]}


@register_model
def bn_cnn(pretrained: bool = False, **kwargs) -> BnCNN:
    if pretrained:
        raise PipelineError("model.pretrained: bn_cnn has no pretrained weights; set model.pretrained=false")
    return BnCNN(**kwargs)


def check_backbone(name: str, key: str = "model.backbone") -> None:
    """One line for a name timm does not know (``auto`` is the plan's to resolve)."""
    if name == "auto" or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
    raise PipelineError(f"{key}: timm does not know {name!r}{hint}")


def check_config(cfg) -> None:
    """The config's backbone names (``model.backbone``, ``adversarial.backbone``): training checks them before
    it looks at a finished fold (a typo used to unfinish one, then fail)."""
    check_backbone(cfg.model.backbone, f"{cfg.path}: model.backbone")
    check_backbone(cfg.adversarial.backbone, f"{cfg.path}: adversarial.backbone")


def create_backbone(name: str, in_chans: int, img_size: tuple[int, int]) -> nn.Module:
    """A timm model with no classifier (``num_classes=0``): forward gives pooled features."""
    check_backbone(name)
    # Dropout lives in Net's head (model.drop_rate), not twice.
    kw = dict(pretrained=False, num_classes=0, in_chans=in_chans)
    try:  # models with a fixed input size (ViT, simple_cnn) need it; others refuse the argument
        return timm.create_model(name, img_size=img_size, **kw)
    except TypeError:
        return timm.create_model(name, **kw)


class Net(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        in_chans: int,
        n_features: int,
        input_size: int | None = None,
        drop_rate: float = 0.2,
        input_norm: str = "dataset",
        zero_head: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.input_size = input_size
        self.per_image = input_norm == "image"  # model.input_norm (pipeline/config/schema.py)
        self.register_buffer("img_mean", torch.zeros(1, in_chans, 1, 1))
        self.register_buffer("img_std", torch.ones(1, in_chans, 1, 1))
        self.n_features = n_features
        dim = backbone.num_features
        if n_features:
            self.register_buffer("feat_mean", torch.zeros(n_features))
            self.register_buffer("feat_std", torch.ones(n_features))
            self.feat_net = nn.Sequential(nn.Linear(n_features, 16), nn.ReLU(inplace=True))
            dim += 16
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(dim, num_classes))
        # On pretrained features a zero last layer predicts the uniform distribution: a new head starts
        # calibrated. A network from scratch keeps the default init: a zero head passes no gradient to the
        # layers below until it has grown, and those have everything to learn (bn_cnn on 3,200 digits:
        # 77% after 80 steps, 95% without).
        if zero_head:
            nn.init.zeros_(self.head[1].weight)
            nn.init.zeros_(self.head[1].bias)

    def fit_normalisation(self, images: np.ndarray, features: np.ndarray | None, max_rows: int = 2000) -> None:
        """Per-channel image mean/std (of the per-image standardised images with ``input_norm: image``)
        and NaN-aware feature mean/std from training rows."""
        idx = np.linspace(0, len(images) - 1, min(len(images), max_rows)).astype(int)
        # Sums in float64 over chunks: a float32 copy of 2,000 224x224 RGB images would cost 1.2 GB.
        c = images.shape[1]
        s1, s2, n = np.zeros(c), np.zeros(c), 0
        for i in range(0, len(idx), 128):
            x = np.asarray(images[idx[i : i + 128]], dtype=np.float64)
            if self.per_image:  # the statistics of what embed() normalises: the standardised images
                x = self.standardise(torch.from_numpy(x)).numpy()
            s1 += x.sum((0, 2, 3))
            s2 += (x * x).sum((0, 2, 3))
            n += x.shape[0] * x.shape[2] * x.shape[3]
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean**2, 0) * n / max(n - 1, 1))
        self.img_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.img_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6).view(1, -1, 1, 1))
        if self.n_features:
            f = np.asarray(features, np.float64)
            mean = np.nan_to_num(np.nanmean(f, 0)) if np.isfinite(f).any() else np.zeros(f.shape[1])
            std = np.nan_to_num(np.nanstd(f, 0), nan=1.0)
            self.feat_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.feat_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))

    @staticmethod
    def standardise(x: torch.Tensor) -> torch.Tensor:
        """Each image minus its own mean, over its own std (one pair over all its channels, so the
        channels keep their relation: an RGB colour, SAR's HH against HV); a flat image becomes 0."""
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) / x.std((1, 2, 3), keepdim=True, correction=0).clamp_min(1e-6)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            x = self.standardise(x)
        x = (x - self.img_mean) / self.img_std
        if self.input_size and x.shape[-1] != self.input_size:
            x = nn.functional.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return self.backbone(x)

    def forward_head(self, emb: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        if self.n_features:
            # Standardise; a missing value (NaN) becomes the training mean (0), its flag says so.
            f = torch.nan_to_num((feats - self.feat_mean) / self.feat_std, nan=0.0)
            emb = torch.cat([emb, self.feat_net(f)], 1)
        return self.head(emb)

    def forward(self, x: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.embed(x), feats)


def build_model(
    cfg, in_chans: int, num_classes: int, n_features: int, img_size: tuple[int, int], load_weights: bool = True
) -> tuple[Net, str]:
    """The one model factory. Returns the model and where its backbone weights came from."""
    m = cfg.model
    size = (m.input_size, m.input_size) if m.input_size else img_size
    backbone = create_backbone(m.backbone, in_chans, size)
    source = "random init"
    if m.pretrained and load_weights:
        from pipeline.models.weights import load_pretrained

        source = load_pretrained(backbone, m.backbone, m.weights, in_chans)
    n_feat = n_features if m.use_features else 0
    # checkpoints written before model.input_norm existed normalised by the dataset's statistics
    return Net(
        backbone,
        num_classes,
        in_chans,
        n_feat,
        m.input_size,
        m.drop_rate,
        getattr(m, "input_norm", "dataset"),
        zero_head=m.pretrained,
    ), source


# ---- fine-tuning strategies ------------------------------------------------------------


def backbone_groups(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone in timm's coarse stage groups, input to output."""
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def apply_finetune(model: Net, mode: str, unfreeze_stages: int) -> int:
    """Freeze backbone parameters for ``head``/``partial``; returns the trainable backbone tensors."""
    names = backbone_groups(model.backbone)
    if mode == "full":
        keep = {n for g in names for n in g}
    elif mode == "head":
        keep = set()
    else:
        keep = {n for g in names[len(names) - unfreeze_stages :] for n in g} if unfreeze_stages else set()
    for n, p in model.backbone.named_parameters():
        p.requires_grad_(n in keep)
    return len(keep)


def finetune_stage(m, epoch: int, epochs: int) -> str:
    """What of the backbone trains in ``epoch`` (``m`` is the config's model section): ``gradual``
    trains the head alone for the first epoch, then the last ``unfreeze_stages`` stages, then all of it
    after ``unfreeze_after`` (default a third of the epochs) - small data first fits a head on
    pretrained features, then adapts the layers nearest to it; other modes keep theirs until
    ``unfreeze_after``, if set."""
    if m.finetune == "gradual":
        after = m.unfreeze_after or max(2, epochs // 3)
        return "head" if epoch == 1 else "partial" if epoch <= after else "full"
    return "full" if m.unfreeze_after and epoch > m.unfreeze_after else m.finetune


def freeze_bn_stats(model: Net, every: bool = False) -> None:
    """BatchNorm of frozen layers keeps its pretrained statistics (call after ``model.train()``);
    ``every`` (``train.freeze_bn``): all BatchNorm layers do, their weights still training."""
    for mod in model.backbone.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            params = list(mod.parameters(recurse=False))
            if every or (params and not any(p.requires_grad for p in params)):
                mod.eval()


# ---- checkpoints (safetensors + JSON metadata; never pickles) --------------------------


def save_checkpoint(model: Net, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    atomic_write_json(Path(path).with_suffix(".json"), meta)


def load_checkpoint(path: Path, cfg=None) -> tuple[Net, dict]:
    """Rebuild the model a checkpoint was trained as (from its JSON) and load its weights."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(path))
    except FileNotFoundError as e:
        raise PipelineError(f"{e.filename}: checkpoint file not found; train this fold first") from None
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise PipelineError(
            f"{path}: corrupt checkpoint ({type(e).__name__}: {str(e)[:120]}); retrain this fold"
        ) from None
    from types import SimpleNamespace

    try:
        mcfg = SimpleNamespace(model=SimpleNamespace(**meta["model"]))
        model, _ = build_model(
            mcfg,
            meta["in_chans"],
            len(meta["class_names"]),
            meta["n_features"],
            tuple(meta["img_size"]),
            load_weights=False,
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a best.json that is not what train wrote
        raise PipelineError(
            f"{meta_path}: corrupt checkpoint description ({type(e).__name__}: {str(e)[:120]}); retrain this fold"
        ) from None
    fits = f"{meta['model']['backbone']} with in_chans={meta['in_chans']}, {len(meta['class_names'])} classes"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise PipelineError(
            f"{path}: checkpoint does not fit {fits} ({str(e).splitlines()[-1].strip()[:160]})"
        ) from None
    if missing or unexpected:
        k = (missing or unexpected)[0]
        raise PipelineError(
            f"{path}: checkpoint does not fit {fits} ({'missing' if missing else 'unexpected'} key {k!r})"
        )
    model.eval()
    return model, meta
