"""Prune then fine-tune: the two phases every method goes through, whatever the method.

Phase 1 trains with the method's hooks for `pruner.prune_epochs` (ADMM iterations, L0 gates,
soft filter pruning, AGP ramp; zero for one-shot magnitude). Then `final_masks()` fixes the
sparsity pattern, which is applied and kept by masked fine-tuning (phase 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..data import TensorData
from ..engine import Recipe, train
from ..graph import ChannelGraph
from .base import MaskHook, Masks, Pruner, apply_masks, get_method


@dataclass
class PruneResult:
    pruner: Pruner
    masks: Masks
    history: list[dict]  # per-epoch records of both phases, with a "phase" key


def prune_and_finetune(model: nn.Module, data: TensorData, graph: ChannelGraph, method: str,
                       targets: dict[str, float], params: dict[str, Any],
                       prune_recipe: Recipe, finetune_recipe: Recipe, *, seed: int = 0,
                       on_epoch: Callable[[dict], None] | None = None) -> PruneResult:
    """Run `method` on `model` (in place) and return its final masks and training history."""
    pruner = get_method(method)(model, targets, graph, **params)
    history: list[dict] = []

    def log(phase: str):
        def _cb(rec: dict) -> None:
            rec = {**rec, "phase": phase, "step": len(history)}
            history.append(rec)
            if on_epoch is not None:
                on_epoch(rec)
        return _cb

    if pruner.prune_epochs > 0:
        recipe = dataclasses.replace(prune_recipe, epochs=pruner.prune_epochs)
        train(model, data, recipe, hooks=[pruner], seed=seed, on_epoch=log("prune"))
    masks = pruner.final_masks()
    apply_masks(model, masks)
    if finetune_recipe.epochs > 0:
        train(model, data, finetune_recipe, hooks=[MaskHook(masks)], seed=seed + 1,
              on_epoch=log("finetune"))
    return PruneResult(pruner, masks, history)
