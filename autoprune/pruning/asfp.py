"""Soft Filter Pruning (He et al., IJCAI 2018) and its asymptotic schedule (ASFP, He et al.,
IEEE TCYB 2020).

Filters are never removed during training: at the start and at the end of every epoch the
lowest-norm filters of each targeted layer are set to zero, and training then continues with
*no* gradient masking, so a zeroed filter can regrow and a different set may be zeroed next
time. Because the network keeps its full capacity while the choice is being made, the final
hard prune (lowest-norm filters at the final rate, exactly) costs less accuracy than a one-shot
prune.

ASFP raises the rate asymptotically instead of using P from epoch 0:
P_t = P * (1 - 4^(-8 t / t_max)), our closed form of the paper's exponential fitted through
(0, 0), (t_max/8, 3P/4) and (t_max, P) (see METHODS.md section 5; the anchor points are recalled,
not re-checked). `asymptotic=False` gives plain SFP (constant P). Here P is each layer's own
target (the search allocates per-layer rates; the paper uses one rate for every layer), and
t counts epochs of this method's phase, so t_max = `epochs`.

Soft zeroing touches the filter weights only, as SFP's code does. We deliberately leave the
bias and BatchNorm gamma/beta alone: zeroing gamma too would cut every gradient into the
zeroed filter (BN output gamma * x_hat, with x_hat = 0 when the filter is 0), so it could never
regrow, which is the point of the method. The hard prune in `final_masks` then masks the
filter rows, bias and BN entries through `channel_masks`, so the channel is dead and compaction
and FLOPs accounting see it removed; masked fine-tuning absorbs the BN shift that causes.
"""

from __future__ import annotations

import dataclasses

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

    @dataclasses.dataclass
    class Params:
        epochs: float = hp(10.0, 0.0, 1000.0, doc="epochs of soft pruning (t_max; paper: 200, "
                                                  "from scratch)")
        asymptotic: bool = hp(True, doc="ASFP's rising rate (True) or SFP's constant rate")
        norm: int = hp(2, choices=(1, 2), doc="filter importance: L1 or L2 norm (paper: L2)")

    @property
    def granularity(self) -> str:
        return "filter"

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
        return {layer: zero_unit(self.graph, self.model, layer, self.rate(layer, epoch),
                                 self.params.norm)
                for layer in self._layers()}

    # -- training hooks ----------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self.soft_prune(epoch)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        self.soft_prune(epoch + 1)

    def final_masks(self) -> Masks:
        """Hard prune: the lowest-norm filters at the final rate, whole channels (bias, BN)."""
        scores = unit_scores(self.graph, self.model, self.targets, self.params.norm)
        return filter_masks(self.graph, self.model, self.targets, scores)
