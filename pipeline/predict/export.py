"""``pipeline export CONFIG --onnx``: each fold (and refit) model as an ONNX graph beside its weights, checked
against torch before it is kept, and the check ``predict.engine: onnx`` makes before it uses one.

Every model is exported to a temporary file and predicted by both engines on its fold's OOF images (a refit
model, which has none, on the first training rows); only when every model agrees within ``TOLERANCE`` (max
absolute difference of the predicted probabilities) are the graphs kept, each with a JSON naming the weights
it was made from, the opset and the measured difference. One model that disagrees is one line naming it,
and nothing is written.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, atomic_write_json, file_sha256, read_json_object
from pipeline.runs.layout import JobDir

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # max |dp| between torch and onnxruntime on the parity images
PARITY_ROWS = 512  # OOF images per model for the check (all of them when fewer)


def export_onnx_run(cfg: Config, *, parity_rows: int = PARITY_ROWS) -> list[Path]:
    """Export every finished model of the run; returns the ONNX paths (none written when one fails)."""
    from pipeline.data.folds import load_folds
    from pipeline.data.formats import read_table
    from pipeline.models.onnx import OPSET
    from pipeline.train.finished import model_dirs

    dirs = model_dirs(cfg) + (model_dirs(cfg, refit=True) if cfg.train.refit else [])  # one line when missing
    table = read_table(cfg, "train")
    fold_of = load_folds(cfg, table)
    # graphs are made and checked outside the run folder: a refusal leaves it exactly as it was
    with tempfile.TemporaryDirectory(prefix="pipeline-onnx-") as scratch:
        made = []
        for i, d in enumerate(dirs):
            rows = np.flatnonzero(fold_of == d.fold) if not d.is_refit else np.arange(len(table))
            tmp = Path(scratch) / f"{i}.onnx"
            made.append((d, tmp, _export_checked(d, table, rows[:parity_rows], tmp)))
        for d, tmp, meta in made:
            with atomic_path(d.onnx) as out:
                shutil.copyfile(tmp, out)
            atomic_write_json(d.onnx_meta, {**meta, "opset": OPSET})
            log.info(f"{d.label}: wrote {d.onnx} (max |dp| {meta['max_abs_dp']:.1e} on {meta['rows']} OOF images)")
    return [d.onnx for d in dirs]


def _export_checked(d: JobDir, table, rows: np.ndarray, tmp: Path) -> dict:
    """Export one model to ``tmp`` and measure it against torch on ``rows``; one line when they differ."""
    import torch

    from pipeline.models.backbones import load_checkpoint
    from pipeline.models.inference import predict_logits
    from pipeline.models.onnx import OnnxModel, export_onnx
    from pipeline.tasks import build_task

    model, meta = load_checkpoint(d.best_weights)
    images = np.asarray(table.images[rows])
    feats = None if table.features is None else np.asarray(table.features[rows])
    export_onnx(model, images, feats, tmp)
    task, cpu = build_task(len(meta["class_names"])), torch.device("cpu")
    want = task.activate(predict_logits(model, images, feats, 64, cpu))
    got = task.activate(predict_logits(OnnxModel(tmp), images, feats, 64, cpu))
    dp = float(np.abs(want - got).max())
    if not dp <= TOLERANCE:
        raise PipelineError(
            f"{d.best_weights}: the ONNX export differs from torch by max |dp| {dp:.2g} on {len(rows)} OOF images "
            f"(tolerance {TOLERANCE:g}); nothing exported: predict this run with predict.engine: torch"
        )
    return {
        "weights_sha256": file_sha256(d.best_weights),
        "max_abs_dp": dp,
        "rows": len(rows),
        "image_size": list(images.shape[2:]),
        "torch": version("torch"),
        "onnxruntime": version("onnxruntime"),
    }


def check_exported(cfg: Config) -> None:
    """Every model predict will use has a current graph (one line for the first that has not)."""
    from pipeline.train.finished import model_dirs

    for d in model_dirs(cfg) + (model_dirs(cfg, refit=True) if cfg.train.refit else []):
        _check_graph(cfg, d)


def exported_model(cfg: Config, d: JobDir):
    """The run's ONNX graph of model ``d`` for ``predict.engine: onnx``: exported from these very weights."""
    from pipeline.models.onnx import OnnxModel

    _check_graph(cfg, d)
    return OnnxModel(d.onnx)


def _check_graph(cfg: Config, d: JobDir) -> None:
    fix = f"run `pipeline export {cfg.path} --onnx`"
    if not d.onnx.is_file() or not d.onnx_meta.is_file():
        raise PipelineError(f"{d.onnx}: not exported (predict.engine is onnx); {fix}")
    meta = read_json_object(d.onnx_meta, fix)
    if meta.get("weights_sha256") != file_sha256(d.best_weights):
        raise PipelineError(f"{d.onnx}: exported from other weights than {d.best_weights.name} (retrained); {fix}")
