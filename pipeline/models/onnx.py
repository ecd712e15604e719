"""A trained model as an ONNX graph, run by onnxruntime with the call interface of ``Net``.

The legacy TorchScript exporter (``dynamo=False``) needs no onnxscript and traces the eval graph once; the
batch axis is dynamic, the image size is the traced one (a view of another size is refused by name).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import PipelineError

OPSET = 17  # onnxruntime >= 1.14 runs it; every op Net and timm's CNNs export to exists there


def export_onnx(model, images: np.ndarray, features: np.ndarray | None, path: Path) -> None:
    """Trace ``model`` (eval) on two rows of ``images`` (raw scale, as predict feeds them) into ``path``."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images[:2], dtype=np.float32))
    names, axes = ["images"], {"images": {0: "batch"}, "logits": {0: "batch"}}
    args: tuple = (x,)
    if getattr(model, "n_features", 0):
        args = (x, torch.from_numpy(np.asarray(features[:2], np.float32)))
        names.append("features")
        axes["features"] = {0: "batch"}
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            opset_version=OPSET,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            dynamo=False,
        )


class OnnxModel:
    """``model(x, feats) -> logits`` through onnxruntime; ``eval`` and ``to`` keep torch callers unchanged."""

    batches_views = True  # TTA views go through one session call per image batch (pipeline/models/tta.py)

    def __init__(self, path: Path, *, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types on a damaged file
            raise PipelineError(
                f"{path}: not a loadable ONNX model ({type(e).__name__}: {str(e)[:120]}); export it again"
            ) from None
        self.path = path
        inputs = self.session.get_inputs()
        self.inputs = [i.name for i in inputs]
        self.size = tuple(inputs[0].shape[2:])

    def eval(self) -> OnnxModel:
        return self

    def to(self, *args, **kwargs) -> OnnxModel:
        return self

    def __call__(self, x: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.size:
            raise PipelineError(
                f"{self.path}: exported for {self.size[0]}x{self.size[1]} images, given {x.shape[2]}x{x.shape[3]} "
                "(a TTA view of another size); predict it with predict.engine: torch"
            )
        feed = {"images": x.detach().float().cpu().contiguous().numpy()}
        if "features" in self.inputs:
            feed["features"] = feats.detach().float().cpu().numpy()
        return torch.from_numpy(self.session.run(["logits"], feed)[0])
