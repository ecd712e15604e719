"""Train/test shift, measured without a trained model: what adversarial validation is built from.

Each image becomes a vector of cheap statistics (per channel mean, std, quantiles, edge strength and
an 8x8 thumbnail) and, when ImageNet weights are available offline, a pretrained backbone's pooled
embedding (``tf_efficientnet_lite0``; 1 or 2 channels adapted by pipeline/models/weights.py); the table's
scalar features (statoil's ``inc_angle`` and its missing flag) join them. A logistic regression
tells train rows from test rows; its out-of-fold ``p(test)`` per row and ROC AUC (0.5: no visible
shift) are what pipeline/evaluate/adversarial.py reports and pipeline/data/folds.py stratifies on. Duplicates are
found by hash of the raw pixels (exact) and by cosine similarity of mean-centred 16x16 thumbnails
(near: robust to a brightness or contrast change, unlike the hash).

Nothing here knows run folders or configs beyond ``cfg.adversarial``, so the fold stage can call it.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.table import Table

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
STATS_THUMB = 8  # thumbnail side in the statistics vector
NEAR_THUMB = 16  # thumbnail side the near-duplicate search compares
CHUNK = 256  # images converted to float at a time (a memmap of large photos never loads whole)


@dataclass(frozen=True, kw_only=True)
class Embedding:
    """Per-row vectors of train then test rows, and what they are made of."""

    X: np.ndarray  # (n_train + n_test, D) float32, the classifier's input
    near: np.ndarray  # (n_train + n_test, d) float32, L2-normalised, for near duplicates
    hashes: np.ndarray  # (n_train + n_test,) sha1 hex of each image's raw pixels
    n_train: int
    parts: list[str]  # e.g. ["image statistics (72)", "tf_efficientnet_lite0 (1280)", "scalar features (2)"]
    blocks: list[tuple[str, int]]  # (kind, width) of X's column blocks in order: "image" blocks are PCA-reduced
    backbone_source: str | None = None


def _float_chunks(images: np.ndarray):
    for s in range(0, len(images), CHUNK):
        yield np.asarray(images[s : s + CHUNK], dtype=np.float32)


def image_hashes(images: np.ndarray) -> np.ndarray:
    """sha1 of each image's raw bytes (dtype and shape included): equal hashes, identical pixels."""
    out = []
    for s in range(0, len(images), CHUNK):
        block = np.ascontiguousarray(images[s : s + CHUNK])
        out += [hashlib.sha1(img.tobytes()).hexdigest() for img in block]
    return np.asarray(out, dtype=object)


def _pool(x: np.ndarray, side: int) -> np.ndarray:
    """(N, C, H, W) -> (N, C, side, side) by area averaging (torch's adaptive pool: any H, W)."""
    import torch

    return torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), side).numpy()


def image_stats(images: np.ndarray) -> np.ndarray:
    """(N, C*(2 + len(QUANTILES) + 1 + STATS_THUMB**2)) per-image statistics in the pixels' own scale."""
    rows = []
    for x in _float_chunks(images):
        flat = x.reshape(len(x), x.shape[1], -1)
        ranks = (np.asarray(QUANTILES) * (flat.shape[2] - 1)).round().astype(int)
        q = np.sort(flat, axis=2)[:, :, ranks]  # (n, C, Q): nearest-rank quantiles, a sort cheaper than np.quantile
        edge = np.abs(np.diff(x, axis=3)).mean((2, 3)) + np.abs(np.diff(x, axis=2)).mean((2, 3))
        thumb = _pool(x, STATS_THUMB).reshape(len(x), -1)
        rows.append(np.concatenate([flat.mean(2), flat.std(2), q.reshape(len(x), -1), edge, thumb], 1))
    return np.concatenate(rows).astype(np.float32)


def near_vectors(images: np.ndarray) -> np.ndarray:
    """Mean-centred, L2-normalised 16x16 thumbnails: cosine 1 for the same picture at another brightness."""
    rows = []
    for x in _float_chunks(images):
        t = _pool(x, NEAR_THUMB).reshape(len(x), -1).astype(np.float64)
        t -= t.mean(1, keepdims=True)
        t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        rows.append(t.astype(np.float32))
    return np.concatenate(rows)


def scalar_features(train: Table, test: Table) -> np.ndarray | None:
    """Both splits' scalar features, NaN imputed by the train median with a missing flag per column
    that has NaNs (statoil already flags a missing angle; the flag then repeats it harmlessly)."""
    if train.features is None or test.features is None or train.feature_names != test.feature_names:
        return None
    f = np.concatenate([train.features, test.features]).astype(np.float64)
    miss = np.isnan(f)
    with warnings.catch_warnings():  # an all-missing column's median is NaN, then 0
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nan_to_num(np.nanmedian(f[: len(train)], 0))
    f = np.where(miss, med, f)
    flags = miss[:, miss.any(0)].astype(np.float64)
    return np.concatenate([f, flags], 1).astype(np.float32)


def backbone_embeddings(
    train: Table, test: Table, *, name: str, size: int, batch_size: int = 64, hashes: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """(n_train + n_test, D) pooled embeddings of a pretrained backbone (offline weights only) and
    where its weights came from. Inputs are standardised per channel on the train rows and resized
    to ``size``; the result is cached by the images' hashes, so evaluate and fold reruns are free."""
    import torch

    from pipeline.core.io import cache_dir
    from pipeline.models.backbones import Net, create_backbone
    from pipeline.models.weights import load_pretrained

    c = train.channels
    with torch.random.fork_rng(devices=[]):  # building a model draws from the global RNG
        backbone = create_backbone(name, c, (size, size))
    source = load_pretrained(backbone, name, None, c)
    if hashes is None:
        hashes = np.concatenate([image_hashes(train.images), image_hashes(test.images)])
    key = hashlib.sha256("|".join([name, str(size), str(c), source, torch.__version__, *hashes]).encode()).hexdigest()[
        :20
    ]
    path = cache_dir() / "adversarial" / f"{name}-{key}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False), source
        except (ValueError, OSError):  # a damaged cache entry: compute again
            pass
    net = Net(backbone, 1, c, 0, size).eval()
    net.fit_normalisation(train.images, None)
    out = []
    with torch.no_grad():
        for images in (train.images, test.images):
            for x in _float_chunks(images):
                for s in range(0, len(x), batch_size):
                    out.append(net.embed(torch.from_numpy(np.ascontiguousarray(x[s : s + batch_size]))).numpy())
    emb = np.concatenate(out).astype(np.float32)
    from pipeline.core.io import atomic_path

    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, emb, allow_pickle=False)
    except OSError as e:  # a read-only cache costs a recomputation, not the stage
        log.warning(f"adversarial: cannot cache embeddings at {path} ({e.strerror or e})")
    return emb, source


def embed(train: Table, test: Table, acfg) -> Embedding:
    """Everything the classifier and the duplicate search need, for ``cfg.adversarial`` settings."""
    if train.channels != test.channels or train.image_size != test.image_size:
        raise PipelineError(
            f"adversarial: train images are {train.channels}x{train.image_size} and test images "
            f"{test.channels}x{test.image_size}; expected the same channels and size"
        )
    images = (train.images, test.images)
    hashes = np.concatenate([image_hashes(a) for a in images])
    parts_x = [np.concatenate([image_stats(a) for a in images])]
    parts = [f"image statistics ({parts_x[0].shape[1]})"]
    blocks = [("image", parts_x[0].shape[1])]
    source = None
    if acfg.embedding != "stats":
        try:
            emb, source = backbone_embeddings(train, test, name=acfg.backbone, size=acfg.image_size, hashes=hashes)
        except PipelineError as e:
            if acfg.embedding == "backbone":
                raise PipelineError(f"adversarial.embedding is 'backbone' but {e}") from None
            log.info(f"adversarial: no backbone embedding ({e}); image statistics only")
        else:
            parts_x.append(emb)
            blocks.append(("image", emb.shape[1]))
            parts.append(f"{acfg.backbone} at {acfg.image_size} px ({emb.shape[1]})")
    feats = scalar_features(train, test)
    if feats is not None:
        parts_x.append(feats)
        blocks.append(("scalar", feats.shape[1]))
        parts.append(f"scalar features {', '.join(train.feature_names)} ({feats.shape[1]})")
    near = np.concatenate([near_vectors(a) for a in images])
    return Embedding(
        X=np.concatenate(parts_x, 1),
        near=near,
        hashes=hashes,
        n_train=len(train),
        parts=parts,
        blocks=blocks,
        backbone_source=source,
    )


def adversarial_scores(
    X: np.ndarray, n_train: int, *, blocks: list[tuple[str, int]], n_splits: int, seed: int
) -> tuple[np.ndarray, float]:
    """Out-of-fold p(test) of every row (train rows first) and the classifier's ROC AUC.

    Each image block is standardised and PCA-reduced to at most 32 components (a thousand embedding
    dimensions on a few hundred rows would let the classifier memorise noise, and would drown a
    two-column scalar block); scalar blocks are only standardised. Then an L2 logistic regression
    with balanced class weights, so p/(1-p) estimates the test/train density ratio whatever the two
    splits' sizes."""
    from sklearn.compose import ColumnTransformer
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_test = len(X) - n_train
    k = min(n_splits, n_train, n_test)
    if k < 2:
        raise PipelineError(
            f"adversarial: {n_train} train and {n_test} test rows; expected at least 2 of each to tell them apart"
        )
    cols, parts = 0, []
    for b, (kind, width) in enumerate(blocks):
        dims = min(32, width, len(X) - len(X) // k - 1)
        steps = [StandardScaler()] + ([PCA(dims, random_state=seed)] if kind == "image" else [])
        parts.append((f"{kind}{b}", make_pipeline(*steps), list(range(cols, cols + width))))
        cols += width
    model = make_pipeline(ColumnTransformer(parts), LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000))
    y = np.r_[np.zeros(n_train, int), np.ones(n_test, int)]
    cv = StratifiedKFold(k, shuffle=True, random_state=seed)
    p = cross_val_predict(model, X.astype(np.float64), y, cv=cv, method="predict_proba")[:, 1]
    return p, float(roc_auc_score(y, p))


def duplicate_pairs(emb: Embedding, *, threshold: float, limit: int) -> dict:
    """Train/test pairs with identical pixels (``exact``) and, among the rest, each test row's most
    similar train row when their thumbnails' cosine similarity is at least ``threshold`` (``near``).
    Pairs are (train row, test row, similarity), most similar first, at most ``limit`` of each kind."""
    n = emb.n_train
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(emb.hashes[:n]):
        by_hash.setdefault(h, []).append(i)
    exact = [(i, j - n, 1.0) for j in range(n, len(emb.hashes)) for i in by_hash.get(emb.hashes[j], [])]
    near = []
    if n:
        train = emb.near[:n]
        for s in range(n, len(emb.near), 1024):  # a (1024, n_train) block of similarities at a time
            sim = emb.near[s : s + 1024] @ train.T
            best = sim.argmax(1)
            for r, (i, v) in enumerate(zip(best, sim[np.arange(len(best)), best])):
                j = s + r
                if v >= threshold and emb.hashes[j] != emb.hashes[i]:
                    near.append((int(i), j - n, float(min(v, 1.0))))
    near.sort(key=lambda t: (-t[2], t[1]))
    return {"n_exact": len(exact), "n_near": len(near), "exact": exact[:limit], "near": near[:limit]}


def shift_scores(train: Table, test: Table, acfg) -> tuple[Embedding, np.ndarray, float]:
    """(embedding, out-of-fold p(test) of every row, train rows first, ROC AUC) for ``cfg.adversarial``."""
    emb = embed(train, test, acfg)
    p, auc = adversarial_scores(emb.X, emb.n_train, blocks=emb.blocks, n_splits=acfg.n_splits, seed=acfg.seed)
    return emb, p, auc


def quantile_bins(p: np.ndarray, labels: np.ndarray, bins: int, n_splits: int) -> np.ndarray:
    """Stratum per train row: rank bin of ``p`` within its class x label, numbered bin-major
    (``bin * n_classes + label``). StratifiedKFold deals the rows sorted by stratum round-robin, so
    bin-major numbering keeps each bin's rows (across classes) contiguous and deals every fold an
    equal share of the most test-like rows, while each class still spreads evenly. Ties are broken by
    row order (deterministic). Fewer bins when the smallest class could not give each bin one row
    per fold."""
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    b = max(1, min(bins, smallest // n_splits))
    strata = np.zeros(len(p), np.int64)
    for c in np.flatnonzero(counts):
        rows = np.flatnonzero(labels == c)
        order = rows[np.argsort(p[rows], kind="stable")]
        strata[order] = (np.arange(len(order)) * b) // len(order) * len(counts) + c
    return strata
