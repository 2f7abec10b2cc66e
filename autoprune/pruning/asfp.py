"""Soft Filter Pruning (He et al., IJCAI 2018) and its asymptotic schedule (ASFP, He et al.,
IEEE TCYB 2020).

Filters are never removed during training: at regular points of the phase the lowest-norm
filters of each targeted layer are set to zero, and training then continues with *no* gradient
masking, so a zeroed filter can regrow and a different set may be zeroed next time. Because the
network keeps its full capacity while the choice is being made, the final hard prune
(lowest-norm filters at the final rate, exactly) costs less accuracy than a one-shot prune.

ASFP raises the rate asymptotically instead of using P from the start:
P_t = P * (1 - 4^(-8 t / t_max)), our closed form of the paper's exponential fitted through
(0, 0), (t_max/8, 3P/4) and (t_max, P) (see METHODS.md section 5; the anchor points are recalled,
not re-checked). `asymptotic=False` gives plain SFP (constant P). Here P is each layer's own
target (the search allocates per-layer rates; the paper uses one rate for every layer), t is
measured in fractional epochs (optimiser steps / steps per epoch) and t_max = `epochs`.

When to zero: the paper zeroes once per epoch over 200 epochs, i.e. 200 points on its schedule.
A search gives this method 1-3 epochs, where once per epoch would jump from 0 to >= 97.5 % of P
after one epoch and the asymptotic rise would never be seen. So soft pruning happens every
`min(1 epoch, phase / min_events)` (at least one step): the paper's rhythm on long phases, at
least `min_events` points on the curve on short ones.

Soft zeroing touches the filter weights only, as SFP's code does. We deliberately leave the
bias and BatchNorm gamma/beta alone: zeroing gamma too would cut every gradient into the
zeroed filter (BN output gamma * x_hat, with x_hat = 0 when the filter is 0), so it could never
regrow, which is the point of the method. The hard prune in `final_masks` then masks the
filter rows, bias and BN entries through `channel_masks`, so the channel is dead and compaction
and FLOPs accounting see it removed; masked fine-tuning absorbs the BN shift that causes.

Differences from the paper: per-layer rates instead of one rate; a pretrained start (the paper
also trains from scratch); on short phases soft pruning happens several times per epoch, which
leaves a zeroed filter fewer steps to regrow between two zeroings than the paper's epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..graph import ChannelGraph, unit_scores, zero_unit_rows
from .base import Masks, Pruner, filter_masks, filter_scores, hp, n_pruned, register, topk_mask


def asfp_rate(final: float, epoch: float, total_epochs: float) -> float:
    """ASFP's pruning rate at epoch t: P * (1 - 4^(-8 t / t_max)); P at and after t_max."""
    if total_epochs <= 0 or epoch >= total_epochs:
        return final
    return final * (1.0 - 4.0 ** (-8.0 * max(epoch, 0.0) / total_epochs))


@torch.no_grad()
def zero_filters(weight: torch.Tensor, rate: float, p: int = 2) -> torch.Tensor:
    """Zero (in place) exactly `n_pruned(filters, rate)` lowest-Lp-norm filters; return kept."""
    keep = topk_mask(filter_scores(weight, p), rate)
    weight.mul_(keep.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1))))
    return keep.bool()


def zero_unit(graph: ChannelGraph, model: nn.Module, root: str, rate: float,
              p: int = 2) -> torch.Tensor:
    """`zero_filters` for the channel group of `root`: one ranking (mean of the members' Lp
    row norms), the same channels zeroed in every member layer; returns the keep vector."""
    keep = topk_mask(unit_scores(graph, model, [root], p)[root], rate).bool()
    zero_unit_rows(graph, model, root, keep)
    return keep


@register
class ASFP(Pruner):
    """Soft filter pruning with an asymptotic (ASFP) or constant (SFP) rate."""

    name = "asfp"
    fixed_granularity = "filter"
    differences = (
        "the papers train from scratch for 200 epochs (or from pretrained at lr 0.01) while "
        "soft-pruning; here a few epochs from the pretrained dense net",
        "the papers use one rate P for every pruned layer; here each layer has its own target",
        "ASFP's curve (anchors 0, 3P/4 at t_max/8, P at t_max) is taken from a third-party "
        "re-implementation, not re-checked in the paper; ASFP's own code was never released",
    )

    @dataclasses.dataclass
    class Params:
        epochs: float = hp(10.0, 0.0, 1000.0, doc="epochs of soft pruning (t_max; paper: 200, "
                                                  "from scratch)",
                           search=(1.0, 3.0), length=True)
        asymptotic: bool = hp(True, doc="ASFP's rising rate (True) or SFP's constant rate",
                              search_choices=(False, True))
        norm: int = hp(2, choices=(1, 2), doc="filter importance: L1 or L2 norm (paper: L2)")
        min_events: int = hp(20, 1, 10000, doc="soft-pruning points per phase at least (paper: "
                                               "one per epoch, kept on long phases)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rates: dict[str, float] = {}  # the rate of the latest soft prune, per layer
        self._step = 0
        self._every = 1
        self._total = 1
        self._steps_per_epoch = 1


    def rate(self, layer: str, epoch: float) -> float:
        """The soft-pruning rate of `layer` at (possibly fractional) epoch `epoch`."""
        final = self.targets[layer]
        if not self.params.asymptotic:
            return final
        return asfp_rate(final, epoch, float(self.params.epochs))

    def _layers(self) -> list[str]:
        out = []
        for layer, s in self.targets.items():
            if n_pruned(self.model.get_submodule(layer).weight.shape[0], s) > 0:
                out.append(layer)
        return out

    def soft_prune(self, epoch: float) -> dict[str, torch.Tensor]:
        """Zero each layer's lowest-norm filters at the rate of `epoch`; return the keep masks."""
        self.rates = {layer: self.rate(layer, epoch) for layer in self._layers()}
        return {layer: zero_unit(self.graph, self.model, layer, r, self.params.norm)
                for layer, r in self.rates.items()}

    # -- training hooks ----------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       steps_per_epoch: int, epochs: float) -> None:
        """Soft prune at t = 0, then every `_every` steps (see the module docstring)."""
        self._steps_per_epoch = steps_per_epoch
        self._total = max(1, int(round(epochs * steps_per_epoch)))
        self._every = max(1, min(steps_per_epoch, self._total // self.params.min_events))
        self._step = 0
        self.soft_prune(0.0)

    def after_step(self, model: nn.Module) -> None:
        self._step += 1
        if self._step % self._every == 0 or self._step == self._total:
            self.soft_prune(self._step / self._steps_per_epoch)

    def final_masks(self) -> Masks:
        """Hard prune: the lowest-norm filters at the final rate, whole channels (bias, BN)."""
        scores = unit_scores(self.graph, self.model, self.targets, self.params.norm)
        return filter_masks(self.graph, self.model, self.targets, scores)
