"""Inference speed on this CPU: torch eager, torch with ``inference_mode`` and channels-last, and onnxruntime on
the graph ``pipeline export --onnx`` writes, side by side in one run.

Two models of the demo configs, each with random weights (speed does not depend on them): the iceberg one
(``tf_efficientnet_lite0`` on 2 x 75 x 75 SAR chips with the incidence angle as a feature, as
``competitions/iceberg-demo.yaml`` trains it) and the digits one (``bn_cnn`` on 1 x 28 x 28, as
``competitions/digits.yaml`` picks it). Each engine predicts the same ``--images`` random images in batches
of 64 through ``predict_logits`` (the predict stage's own loop); rounds alternate the engines so a change in
the machine's load hits all three, and the medians are printed with each engine's ratio to torch eager.
The last line is JSON.

    .venv/bin/python benchmarks/inference.py [--rounds 5] [--images 1024]
    .venv/bin/python benchmarks/inference.py --smoke   # tiny (tests/test_benchmarks.py): figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # name: (backbone, channels, size, scalar features)
    "iceberg lite0 75px": ("tf_efficientnet_lite0", 2, 75, 2),
    "digits bn_cnn 28px": ("bn_cnn", 1, 28, 0),
}
BATCH = 64


def _model(backbone: str, chans: int, size: int, n_features: int):
    from pipeline.models.backbones import build_model

    m = SimpleNamespace(
        backbone=backbone,
        pretrained=False,
        weights=None,
        input_size=None,
        use_features=bool(n_features),
        drop_rate=0.2,
        input_norm="dataset",
    )
    model, _ = build_model(SimpleNamespace(model=m), chans, 2, n_features, (size, size), load_weights=False)
    return model.eval()


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(name: str, rounds: int, n_images: int, work: Path) -> dict:
    import torch

    from pipeline.models.inference import predict_logits
    from pipeline.models.onnx import OnnxModel, export_onnx

    backbone, chans, size, n_feat = MODELS[name]
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n_images, chans, size, size)).astype(np.float32)
    feats = rng.normal(size=(n_images, n_feat)).astype(np.float32) if n_feat else None
    model = _model(backbone, chans, size, n_feat)
    path = work / f"{backbone}.onnx"
    export_onnx(model, images, feats, path)
    onnx_model = OnnxModel(path)
    cpu = torch.device("cpu")
    last = _model(backbone, chans, size, n_feat)
    last.load_state_dict(model.state_dict())
    last = last.to(memory_format=torch.channels_last)

    def eager():
        with torch.no_grad():
            predict_logits(model, images, feats, BATCH, cpu)

    def fast():
        with torch.inference_mode():
            predict_logits(last, images, feats, BATCH, cpu, channels_last=True)

    def ort():
        predict_logits(onnx_model, images, feats, BATCH, cpu)

    engines = {"torch eager": eager, "torch inference_mode + channels_last": fast, "onnxruntime": ort}
    for fn in engines.values():  # warm-up: one-off kernel and session set-up
        fn()
    speeds: dict = {k: [] for k in engines}
    for r in range(rounds):
        for k, fn in engines.items():
            speeds[k].append(n_images / _timed(fn))
            print(f"{name}: round {r}: {k} {speeds[k][-1]:.1f} img/s", flush=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    return {k: {"img_s": round(v, 1), "ratio": round(v / med["torch eager"], 3)} for k, v in med.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.images = 1, 8
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, {args.images} images")
    out = {}
    with tempfile.TemporaryDirectory() as work:
        for name in MODELS:
            out[name] = measure(name, args.rounds, args.images, Path(work))
    for name, res in out.items():
        for k, v in res.items():
            print(f"{name:<20} {k:<38} {v['img_s']:>9.1f} img/s  x{v['ratio']:.2f} of torch eager")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
