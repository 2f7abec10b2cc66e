"""The model card of an export: what was pruned how, accuracy and cost before and after,
measured CPU latency, provenance and versions; written only when the shipped file reproduces
the recorded accuracy."""

from __future__ import annotations

import copy
import io
import json
import os
import statistics
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import TensorData, load_dataset
from ..engine import evaluate_split
from ..errors import UserError
from ..flops import Accountant, count_dense
from ..study import Study
from .card_md import CARD_MD, markdown
from .checkpoint import (
    CARD,
    CHECKPOINT,
    ONNX,
    _architecture,
    dense_reference,
    load_exported,
    removed_channels,
    save_checkpoint,
)
from .onnx_file import export_onnx, onnx_max_abs_diff

# The recorded and the re-evaluated accuracy must agree to this (i.e. the same predictions):
# measured on CPU, masked and compacted models agree to ~1e-6 in the logits and make identical
# predictions. On CUDA `engine.evaluate` runs under bf16 autocast, where removing zero channels
# changes which kernel sums what, and a bf16 rounding can flip a near-tie: there a small
# fraction of the test set may differ (an estimate; not measured on a GPU yet).
ACCURACY_TOLERANCE = 1e-6
BF16_TOLERANCE = 0.002
LATENCY_THREADS = 2


def measure_latency(model: nn.Module, input_shape: Sequence[int], batch: int, *,
                    threads: int = LATENCY_THREADS, repeats: int = 30,
                    max_seconds: float = 1.0) -> float:
    """Median CPU forward time (ms) of one batch, torch limited to `threads` threads.

    A few warm-up calls first (allocator, oneDNN primitive caches); then up to `repeats` timed
    calls, fewer when they exceed `max_seconds` (at least 5), so large models stay affordable.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m = copy.deepcopy(model).cpu().eval()
        x = torch.randn(batch, *input_shape)
        times: list[float] = []
        with torch.inference_mode():
            for _ in range(3):
                m(x)
            start = time.perf_counter()
            while len(times) < repeats and (len(times) < 5 or
                                            time.perf_counter() - start < max_seconds):
                t0 = time.perf_counter()
                m(x)
                times.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(old)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("autoprune", "torch", "torch-pruning", "onnx", "onnxruntime", "onnxscript",
                "mlflow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _checkpoint_bytes(state: dict[str, torch.Tensor]) -> int:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return buf.tell()


def export_model(model: nn.Module, study: Study, example: torch.Tensor, to: str | os.PathLike, *,
                 metrics: dict[str, Any], dense: dict[str, Any], source: dict[str, Any],
                 data: TensorData | None = None, data_root: str | None = None,
                 latency: bool = True,
                 reproduce: dict[str, str] | None = None) -> dict[str, Any]:
    """Export a pruned (masked) `model` of `study` into folder `to`; return the model card.

    `metrics`: the pruned model's record (val_accuracy, test_accuracy, method, hparams or
    params_set, granularity); `dense`: the dense baseline's (val/test accuracy); `source`: where
    the model came from (trial, run ids, checkpoint), copied into the card. `data` supplies the
    test set for the re-evaluation (loaded from the study when omitted). Raises `UserError` when
    the reloaded export does not reproduce `metrics["test_accuracy"]`.
    """
    from ..pruning.compaction import compact

    to = Path(to).expanduser()
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create export folder {to}: {exc.strerror}") from None
    device = next(model.parameters()).device
    example = example[:1].to(device)
    arch = _architecture(study, example, model)

    # Counts: mask-aware against the dense architecture, and of the compacted model as it is.
    reference = dense_reference(study, arch).to(device)
    accountant = Accountant(reference, example)
    counts = accountant.count(model)
    compacted = compact(model, example, accountant.graph)
    c_macs, c_params = count_dense(compacted, example)
    removed = removed_channels(model, example, accountant.graph)

    ckpt_path = to / CHECKPOINT
    save_checkpoint(compacted, arch, removed, ckpt_path,
                    extra={"study": study.name, "method": str(metrics.get("method", ""))})
    exported = load_exported(ckpt_path, model=dense_reference(study, arch)
                             if study.objects is not None else None)

    onnx_path = to / ONNX
    exporter = export_onnx(exported, example, onnx_path)
    probe = torch.randn(4, *arch["input_shape"], generator=torch.Generator().manual_seed(0))
    onnx_diff = onnx_max_abs_diff(exported, onnx_path, probe)

    if data is None:
        data = load_dataset(study.dataset, data_root, val_fraction=study.val_fraction,
                            device=device, options=study.data_options)
    exported = exported.to(data.device)
    test_acc = evaluate_split(exported, data, "test")
    val_acc = evaluate_split(exported, data, "val")  # shown beside the recorded one
    recorded = metrics.get("test_accuracy")
    tolerance = ACCURACY_TOLERANCE if data.device.type == "cpu" else max(
        BF16_TOLERANCE, 1.0 / max(data.split_size("test"), 1))
    if recorded is not None and abs(test_acc - float(recorded)) > tolerance:
        raise UserError(f"exported model's test accuracy {test_acc:.6f} differs from the "
                        f"recorded {float(recorded):.6f} (export in {to} is not trustworthy)")

    lat: dict[str, Any] = {}
    if latency:
        shape = arch["input_shape"]
        lat = {"threads": LATENCY_THREADS, "statistic": "median",
               "dense_batch1_ms": measure_latency(model, shape, 1),
               "dense_batch32_ms": measure_latency(model, shape, 32),
               "exported_batch1_ms": measure_latency(exported, shape, 1),
               "exported_batch32_ms": measure_latency(exported, shape, 32)}
        lat["speedup_batch1"] = lat["dense_batch1_ms"] / lat["exported_batch1_ms"]
        lat["speedup_batch32"] = lat["dense_batch32_ms"] / lat["exported_batch32_ms"]

    hparams = metrics.get("hparams", metrics.get("params_set", {}))
    if isinstance(hparams, str):
        try:
            hparams = json.loads(hparams)
        except json.JSONDecodeError:
            pass
    files = {f.name: f.stat().st_size for f in sorted(to.iterdir())
             if f.is_file() and f.name not in (CARD, CARD_MD)}
    load = ("from autoprune.export import load_exported; model = load_exported(DIR" +
            (f", model={study.model}(...))" if study.objects is not None else ")"))
    card = {
        "study": study.name, "model": study.model, "dataset": study.dataset,
        "input_shape": arch["input_shape"], "num_classes": arch["num_classes"],
        "method": metrics.get("method"), "granularity": metrics.get("granularity"),
        "hyperparameters": hparams,
        "dense": {"val_accuracy": dense.get("val_accuracy"),
                  "test_accuracy": dense.get("test_accuracy"),
                  "flops": accountant.dense_macs, "params": accountant.dense_params},
        "pruned": {"val_accuracy": metrics.get("val_accuracy"),
                   "test_accuracy": recorded,
                   "flops": counts.macs, "params": counts.params,
                   "flops_frac": counts.flops_frac, "params_frac": counts.params_frac,
                   "weight_compression": counts.weight_compression,
                   "layer_sparsity": counts.layer_sparsity()},
        # the four budget kinds: compacted MACs, MACs of nonzero weights, nonzero params,
        # nonzero conv/linear weights (fractions of the dense model's)
        "fractions": counts.fractions(),
        "exported": {"test_accuracy": test_acc, "val_accuracy": val_acc, "flops": c_macs,
                     "params": c_params,
                     "flops_frac": c_macs / accountant.dense_macs,
                     "params_frac": c_params / accountant.dense_params,
                     "nonzero_params": int(sum(int((p != 0).sum())
                                               for p in exported.parameters())),
                     "removed_channels": {k: len(v) for k, v in removed.items()},
                     "accuracy_check": {"device": str(data.device), "tolerance": tolerance,
                                        "test_examples": data.split_size("test")},
                     "onnx_exporter": exporter, "onnx_max_abs_diff": onnx_diff},
        "flops_unit": "multiply-accumulates of conv and linear layers",
        "latency_cpu": lat,
        "source": source,
        "files": files,  # bytes
        "dense_checkpoint_bytes": _checkpoint_bytes(model.state_dict()),
        "load": load,
        "reproduce": dict(reproduce or {}),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_card(card, to)
    return card


def write_card(card: dict[str, Any], to: Path) -> None:
    """model_card.json and model_card.md."""
    (to / CARD).write_text(json.dumps(card, indent=2, default=float) + "\n")
    (to / CARD_MD).write_text(markdown(json.loads(json.dumps(card, default=float))))
