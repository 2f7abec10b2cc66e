"""ONNX export of a compacted model (dynamic batch) and the check that it computes the same."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write `model` as ONNX with a dynamic batch dimension; returns the exporter used.

    The torch.export-based exporter (torch's default) first; the TorchScript one if it fails
    (some user models do not trace under torch.export). Weights go inside the one file unless
    the model is too large for protobuf's 2 GB limit.
    """
    import warnings

    model = copy.deepcopy(model).cpu().eval()
    x = example[:1].cpu()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), input_names=["input"],
                              output_names=["logits"], external_data=big, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        return "dynamo"
    except Exception:  # noqa: BLE001 - any failure of the new exporter: try the old one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), input_names=["input"],
                              output_names=["logits"], dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        return "torchscript"


def onnx_max_abs_diff(model: nn.Module, path: Path, x: torch.Tensor) -> float | None:
    """Largest |ONNX Runtime output - torch output| on `x`; None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = copy.deepcopy(model).cpu().eval()(x.cpu()).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: x.cpu().numpy()})[0]
    return float(abs(out - ref).max())
