"""Prune then fine-tune: the two phases every method goes through, whatever the method.

Phase 1 trains with the method's hooks for `pruner.prune_epochs` (ADMM iterations, L0 gates,
soft filter pruning, AGP ramp; zero for one-shot methods), after `pruner.calibrate` has seen
training batches (data-driven one-shot methods such as Taylor score there). Then
`final_masks()` fixes the sparsity pattern, which is applied and kept by masked fine-tuning
(phase 2).

Phase 2 ends on its last epoch's weights unless validation accuracy fell by more than
`COLLAPSE_DROP` below the best fine-tune epoch: then the best epoch's weights are put back
(`PruneResult.kept_epoch`). A long retrain at a searched learning rate can collapse (a finalist
went from val 0.944 to 0.09 at 5.5x the study's rate); every epoch of phase 2 has the same masks,
so the weights put back are as sparse. A smaller dip keeps the last epoch: on a small validation
set it is noise (digits: 144 images, one is 0.7 points; at a 1-point threshold 2 of 36
finalists and 8 four-epoch trials were put back, eleventh runs).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import TensorData
from ..engine import Recipe, TrainHook, prepare, train
from ..graph import ChannelGraph
from .base import MaskHook, Masks, Pruner, apply_masks, get_method

COLLAPSE_DROP = 0.05  # val accuracy below the best fine-tune epoch's that undoes the last ones
PROBE_EPOCHS = 0.2  # the share of a fine-tune epoch `fine_tune_pace` times


@dataclass
class PrunedState:
    """What the prune phase leaves behind: enough to run the fine-tune phase alone.

    A search trial checkpoints it, so a trial retried after its worker died skips the prune
    phase (usually the longest: ADMM iterations, L0 gates, AGP ramps).
    """

    state: dict[str, Any]  # model weights with the masks applied (CPU tensors)
    masks: Masks
    history: list[dict]  # the prune phase's per-epoch records


@dataclass
class PruneResult:
    pruner: Pruner
    masks: Masks
    history: list[dict]  # per-epoch records of both phases, with a "phase" key
    kept_epoch: int = -1  # the fine-tune epoch whose weights were kept (-1: no fine-tune)


def prune_and_finetune(model: nn.Module, data: TensorData, graph: ChannelGraph, method: str,
                       targets: dict[str, float], params: dict[str, Any],
                       prune_recipe: Recipe, finetune_recipe: Recipe, *, seed: int = 0,
                       on_epoch: Callable[[dict], None] | None = None,
                       on_pruned: Callable[[PrunedState], None] | None = None,
                       resume: PrunedState | None = None,
                       refit: Callable[[float], int] | None = None) -> PruneResult:
    """Run `method` on `model` (in place) and return its final masks and training history.

    `on_pruned` receives the state between the phases (to checkpoint it); `resume` is such a
    state: the prune phase is then skipped and only the fine-tune phase runs. `refit` is given
    the fine-tune's measured seconds per epoch (`fine_tune_pace`) once the masks are fixed and
    returns the fine-tune's epochs: a finalist fits its fine-tune to the time it has left.
    """
    pruner = get_method(method)(model, targets, graph, **params)
    history: list[dict] = [] if resume is None else [dict(r) for r in resume.history]

    def log(phase: str):
        def _cb(rec: dict) -> None:
            rec = {**rec, "phase": phase, "step": len(history)}
            history.append(rec)
            if on_epoch is not None:
                on_epoch(rec)
        return _cb

    if resume is not None:
        model.load_state_dict(resume.state)
        masks = {k: v.to(model.get_parameter(k).device) for k, v in resume.masks.items()}
    else:
        model = prepare(model, data.device)
        pruner.calibrate(model, calibration_batches(data, prune_recipe.batch_size, seed))
        if pruner.prune_epochs > 0:
            recipe = dataclasses.replace(prune_recipe, epochs=pruner.prune_epochs)
            train(model, data, recipe, hooks=[pruner], seed=seed, on_epoch=log("prune"))
        masks = pruner.final_masks()
        masks = _from_rank_zero(model, masks)  # data-parallel trials: one set of masks
    apply_masks(model, masks)
    if refit is not None:
        finetune_recipe = dataclasses.replace(finetune_recipe, epochs=refit(
            fine_tune_pace(model, data, finetune_recipe, masks, seed)))
    if on_pruned is not None and resume is None:
        on_pruned(PrunedState({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                              {k: v.detach().cpu().clone() for k, v in masks.items()},
                              [dict(r) for r in history]))
    kept = -1
    if finetune_recipe.epochs > 0:
        best = _BestEpoch(model)
        logged = log("finetune")

        def finetune_epoch(rec: dict) -> None:
            best.see(rec)
            logged(rec)

        train(model, data, finetune_recipe, hooks=[MaskHook(masks)], seed=seed + 1,
              on_epoch=finetune_epoch)
        kept = best.keep()
    return PruneResult(pruner, masks, history, kept)


class _Clock(TrainHook):
    """When a training call's steps start and when its last epoch's steps end (before the
    validation pass that closes every epoch); on a GPU once its queued work is done."""

    def __init__(self) -> None:
        self.start = self.steps_end = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, model, optimizer, steps_per_epoch, epochs) -> None:
        self.start = self._now()

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        self.steps_end = self._now()


def fine_tune_pace(model: nn.Module, data: TensorData, recipe: Recipe, masks: Masks,
                   seed: int = 0, probe: float = PROBE_EPOCHS) -> float:
    """Seconds one masked fine-tune epoch of `recipe` takes here and now, timed on a throwaway
    copy of `model` for `probe` of an epoch: its training steps scaled up, plus the validation
    pass that ends it (timed once, as part of the same call, not scaled).

    Why not the method's own phase: an AGP or ADMM epoch costs more than a fine-tune epoch
    (alone, on one thread: AGP 19.3 s, masked fine-tune 18.1 s), and finalists fitted at the
    phase's pace ended 9-11 % before their time (docs/benchmarks.md, fifteenth runs).
    """
    clock = _Clock()
    train(copy.deepcopy(model), data, dataclasses.replace(recipe, epochs=probe),
          hooks=[MaskHook(masks), clock], seed=seed)
    done = time.perf_counter()
    return (clock.steps_end - clock.start) / probe + (done - clock.steps_end)


class _BestEpoch:
    """The fine-tune epoch with the best validation accuracy, and its weights (on CPU)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.best: tuple[float, int] | None = None  # (val accuracy, epoch)
        self.last: tuple[float, int] | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def see(self, rec: dict) -> None:
        self.last = (float(rec["val_accuracy"]), int(rec["epoch"]))
        if self.best is None or self.last[0] > self.best[0]:
            self.best = self.last
            self.state = {k: v.detach().cpu().clone()
                          for k, v in self.model.state_dict().items()}

    def keep(self) -> int:
        """Put the best epoch's weights back if the last fell more than `COLLAPSE_DROP` below
        them; return the epoch whose weights the model now holds."""
        if self.best is None or self.last is None:
            return -1
        if self.state is not None and self.best[0] - self.last[0] > COLLAPSE_DROP:
            self.model.load_state_dict(self.state)
            return self.best[1]
        return self.last[1]


def _from_rank_zero(model: nn.Module, masks: Masks) -> Masks:
    """In a data-parallel trial, rank 0's masks and weights on every rank (else as given)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return masks
    out = {}
    for name in sorted(masks):
        m = masks[name]
        buf = m.to(torch.uint8) if m.dtype == torch.bool else m.clone()  # gloo has no bool
        dist.broadcast(buf, src=0)
        out[name] = buf.to(m.dtype)
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    return out


def calibration_batches(data: TensorData, batch_size: int, seed: int
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled training batches for `Pruner.calibrate`, drawn lazily (seeded)."""
    gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: no global reseed
    return itertools.chain.from_iterable(
        data.batches(batch_size, gen) for _ in itertools.count())
