"""Export a pruned model for deployment: compact checkpoint, ONNX, model card, registry entry.

A search leaves masked models: dense shapes full of zeros, as slow and as large as the dense
net. Export turns one of them into what a user ships:

- `model.pt`, readable with `torch.load(weights_only=True)` (tensors, numbers, strings, lists,
  dicts; never pickled code). Dead channels are physically removed (`compaction.compact`); the
  file records the dense architecture by name, the input shape and, per channel group, the
  removed channel indices, so `load_exported` rebuilds the same compacted module from the model
  zoo. Unstructured zeros left inside the kept tensors are stored sparsely (flat int32 indices
  plus values) wherever that is smaller, so the file shrinks with unstructured sparsity too.
- `model.onnx` of the compacted model, with a dynamic batch dimension.
- `model_card.json`: what was pruned how, accuracy and cost before and after, measured CPU
  latency, provenance and versions.

Export re-loads what it wrote and re-evaluates it on the test set: a card whose accuracy the
shipped file does not reproduce is refused (`UserError`), so a card can be trusted as written.
`export_best` picks a recorded search trial (by accuracy or FLOPs, under an optional budget),
exports it and registers it in the MLflow Model Registry under the study's name, alias `best`.
"""

import sys
import types

from .card import export_model, measure_latency
from .checkpoint import (
    CARD,
    CHECKPOINT,
    FORMAT,
    FORMAT_VERSION,
    ONNX,
    load_exported,
    pack_state,
    removed_channels,
    save_checkpoint,
    unpack_state,
)
from .onnx_file import export_onnx, onnx_max_abs_diff
from .registry import PICKS, export_best, register_export, select_point

__all__ = ["CARD", "CHECKPOINT", "FORMAT", "FORMAT_VERSION", "ONNX", "PICKS", "export_best",
           "export_model", "export_onnx", "load_exported", "measure_latency",
           "onnx_max_abs_diff", "pack_state", "register_export", "removed_channels",
           "save_checkpoint", "select_point", "unpack_state"]


class _CallableModule(types.ModuleType):
    """`autoprune.export(out, study, to, ...)` calls `autoprune.api.export`, while
    `from autoprune.export import load_exported` keeps working: the function and the subpackage
    share one name, and importing a submodule would otherwise replace the function."""

    def __call__(self, *args, **kwargs):
        from ..api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
