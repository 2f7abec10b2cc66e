"""Magnitude pruning, the baseline: one-shot, or gradual with the AGP cubic schedule.

One-shot (Han et al. 2015): keep each layer's largest-|w| weights, then masked fine-tuning.
Gradual (Zhu & Gupta 2017, "To prune, or not to prune"): during the method's phase the sparsity of
layer i rises as s_i(t) = s_i * (1 - (1 - t / T)^3) over the first `ramp` fraction of steps, with
masks recomputed on |w| every `frequency` steps and applied after every step.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import Masks, Pruner, apply_masks, hp, register, weight_masks


def agp_sparsity(final: float, progress: float) -> float:
    """AGP's cubic ramp: 0 at progress 0, `final` at progress >= 1."""
    p = min(max(progress, 0.0), 1.0)
    return final * (1.0 - (1.0 - p) ** 3)


@register
class Magnitude(Pruner):
    name = "magnitude"
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
                           search=(0.5, 2.0))
        ramp: float = hp(0.75, 0.05, 1.0, doc="fraction of the phase over which sparsity rises")
        frequency: int = hp(10, 1, 100000, doc="steps between mask updates")

    @property
    def prune_epochs(self) -> float:
        return float(self.params.epochs) if self.params.gradual else 0.0

    def on_train_start(self, model, optimizer, steps_per_epoch, epochs) -> None:
        self._total = max(1, int(round(steps_per_epoch * epochs * self.params.ramp)))
        self._step = 0
        self._masks: Masks = {}

    @torch.no_grad()
    def after_step(self, model) -> None:
        if self._step % self.params.frequency == 0 or self._step == self._total:
            progress = self._step / self._total
            now = {k: agp_sparsity(s, progress) for k, s in self.targets.items()}
            self._masks = weight_masks(model, now)
        apply_masks(model, self._masks)
        self._step += 1

    def final_masks(self) -> Masks:
        return weight_masks(self.model, self.targets)
