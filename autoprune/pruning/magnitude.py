"""Magnitude pruning, the baseline: one-shot, or gradual with the AGP cubic schedule.

One-shot (Han et al. 2015): keep each layer's largest-|w| weights, then masked fine-tuning.
Gradual (Zhu & Gupta 2017, "To prune, or not to prune"): during the method's phase the sparsity of
layer i rises as s_i(t) = s_i * (1 - (1 - t / T)^3) over the first `ramp` fraction of steps, with
masks recomputed on |w| every `frequency` steps. Between updates the pruned weights are frozen at
zero as in AGP: gradients are masked before each step, weights and optimiser state (momentum, Adam
moments) after it (`MaskHook`), so a pruned weight takes no dense step and no stale momentum
carries into later training.

Granularity "filter" is the structured baseline of Li et al. 2017 ("Pruning Filters for Efficient
ConvNets"): a layer's filters are ranked by their L1 (`norm=1`, the paper's choice) or L2 norm and
the lowest ones removed together with everything producing their channel (bias, BatchNorm), so
the channel is dead and compaction removes it. Gradual mode raises the share of filters by the
same AGP schedule.

Differences from the papers:
* Targets are per layer, from the search or the budget projection, not Li et al.'s per-layer
  sensitivity analysis or Zhu & Gupta's one sparsity for all layers.
* AGP starts at step 0 with initial sparsity 0 (t0 = 0, s_i = 0) and its last update lands on
  the ramp's last step; the phase then continues with the final masks fixed.
* Li et al. prune filters layer by layer with retraining in between (or all at once, then
  retrain); one-shot here prunes every layer at once, then fine-tunes.
* Residual-coupled channels are ranked and removed as one group (the members' mean filter
  norm); Li et al. prune ResNets' coupled layers specially (they leave the shortcut stream alone).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..engine import total_steps
from ..graph import unit_scores
from .base import (
    MaskHook,
    Masks,
    Pruner,
    filter_masks,
    hp,
    register,
    weight_masks,
)


def agp_sparsity(final: float, progress: float) -> float:
    """AGP's cubic ramp: 0 at progress 0, `final` at progress >= 1."""
    p = min(max(progress, 0.0), 1.0)
    return final * (1.0 - (1.0 - p) ** 3)


@register
class Magnitude(Pruner):
    name = "magnitude"
    # by hand: one-shot and AGP (Li et al.'s L1 for filters), and Torch-Pruning's default
    # one-shot group L2 filter pruning (with the global split: its global pruning)
    baselines = ({"gradual": False}, {"gradual": True},
                 {"gradual": False, "granularity": "filter", "norm": 2})
    differences = (
        "one-shot (Han et al. 2015) prunes and retrains in several rounds, with a threshold of "
        "quality x std of the layer's weights; here one exact top-|w| cut per layer, then a "
        "single masked fine-tune",
        "gradual (Zhu & Gupta 2017) starts pruning at a chosen step t0 of ongoing training and "
        "keeps training after the ramp; here the ramp starts with the phase (t0 = 0) and the "
        "phase is short, fine-tuning follows",
    )

    @dataclasses.dataclass
    class Params:
        gradual: bool = hp(False, doc="AGP cubic schedule instead of one-shot",
                           search_choices=(False, True))
        epochs: float = hp(2.0, 0.0, 1000.0, doc="length of the gradual phase",
                           search=(0.5, 2.0), length=True)
        ramp: float = hp(0.75, 0.05, 1.0, doc="fraction of the phase over which sparsity rises")
        frequency: int = hp(10, 1, 100000, doc="steps between mask updates")
        granularity: str = hp("weight", choices=("weight", "filter"),
                              doc="single weights (|w|) or whole filters (Li et al. 2017)",
                              search_choices=("weight", "filter"))
        norm: int = hp(1, choices=(1, 2), doc="filter importance: L1 (Li et al.) or L2 norm",
                       search_choices=(1, 2))

    @property
    def prune_epochs(self) -> float:
        return float(self.params.epochs) if self.params.gradual else 0.0

    def masks_at(self, sparsities: dict[str, float]) -> Masks:
        """Magnitude masks of the current weights at the given per-layer sparsities."""
        if self.granularity == "filter":
            # one score per channel of each group (a residual stream's members ranked jointly)
            scores = unit_scores(self.graph, self.model, sparsities, p=self.params.norm)
            return filter_masks(self.graph, self.model, sparsities, scores)
        return weight_masks(self.model, sparsities)

    def final_masks(self) -> Masks:
        return self.masks_at(self.targets)

    # -- gradual (AGP) phase -------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       steps_per_epoch: int, epochs: float) -> None:
        steps = total_steps(epochs, steps_per_epoch)
        self._ramp = max(1, min(steps, int(round(steps * self.params.ramp))))
        self._step = 0
        self._start = (optimizer, steps_per_epoch, epochs)
        self._hook: MaskHook | None = None  # the masks in force, none before the first update

    def before_step(self, model: nn.Module) -> None:
        if self._hook is not None:
            self._hook.before_step(model)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        self._step += 1
        if self._hook is not None:
            self._hook.after_step(model)
        if self._step <= self._ramp and (self._step % self.params.frequency == 0
                                         or self._step == self._ramp):
            now = {k: agp_sparsity(s, self._step / self._ramp) for k, s in self.targets.items()}
            # A fresh MaskHook zeroes the newly pruned weights and their optimiser state.
            self._hook = MaskHook(self.masks_at(now))
            self._hook.on_train_start(model, *self._start)
