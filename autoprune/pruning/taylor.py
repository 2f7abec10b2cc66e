"""Group Taylor filter pruning (Molchanov, Mallya, Tyree, Frosio & Kautz, CVPR 2019,
"Importance Estimation for Neural Network Pruning") -- one-shot, data-driven, structured.

The importance of a channel is the first-order Taylor estimate of the loss change when every
parameter that produces it is set to zero: for the group S of those parameters (the filter's
weight rows, its bias, the BatchNorm gamma and beta after it),

    I_S = ( sum_{s in S} g_s * w_s )^2,

with g the loss gradient of one mini-batch, averaged over `batches` mini-batches (the paper's
"Taylor FO" with squared group contribution). Gradients are taken in train mode, as during
training in the paper, so BatchNorm uses batch statistics; there, scaling a filter does not
change the BN output and the filter's own terms cancel (sum_s g_s w_s = 0 over the conv rows),
which leaves gamma*dL/dgamma + beta*dL/dbeta: the paper's recommended "Taylor FO on BN" gate
criterion falls out of the group sum. BN running statistics are restored afterwards: scoring
must not change the network.

`rounds > 1` prunes in steps, as the paper does iteratively: after each round of scoring the
lowest channels up to `r / rounds` of each layer's target are zeroed, and the next round scores
the partly pruned network (Molchanov et al. fine-tune between steps; we do not, see
`differences`). The final round meets every layer's target exactly through `filter_masks`.

Everything happens in `calibrate` (the runner gives it training batches before pruning), so the
method has no training phase of its own; masked fine-tuning follows as for every method.

Scores go through one function, `channel_taylor`, per channel group of the graph: it already
sums over all producers of a group, so when filter targets are keyed by group roots (coupled
residual channels) only the loop over targeted groups changes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..graph import ChannelGraph, ChannelGroup
from .base import Masks, Pruner, apply_masks, filter_masks, hp, n_pruned, register, topk_mask


def channel_taylor(group: ChannelGroup, params: dict[str, torch.Tensor],
                   grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_{s in S_c} g_s * w_s for every channel c of `group`, over all its producers.

    The signed first-order Taylor term of zeroing channel c (the parameters `channel_masks`
    zeroes); squared and averaged over batches it is the paper's importance.
    """
    out = torch.zeros(group.size, device=next(iter(params.values())).device)
    for s in group.producers:
        gw = (grads[s.param] * params[s.param]).detach()
        dims = [d for d in range(gw.dim()) if d != s.dim]
        per = gw.sum(dim=dims) if dims else gw
        out.index_add_(0, s.root_idx.to(out.device), per[s.target_idx.to(out.device)])
    return out


@register
class GroupTaylor(Pruner):
    """Filters of lowest group first-order Taylor importance, scored on training batches."""

    name = "taylor"
    fixed_granularity = "filter"
    differences = (
        "the paper ranks all neurons globally and removes a fixed number per step; here each "
        "layer loses exactly its searched/projected share of filters",
        "the paper fine-tunes between pruning steps (prunes every few mini-batches of "
        "training); here the `rounds` steps only re-score the partly pruned net, then one "
        "masked fine-tune follows",
        "importance is averaged over `batches` mini-batches once per round, not over a "
        "running pruning interval during training",
    )

    @dataclasses.dataclass
    class Params:
        batches: int = hp(32, 1, 100000, doc="mini-batches whose Taylor importance is averaged "
                                             "per round", search=(4, 64))
        rounds: int = hp(4, 1, 100, doc="pruning steps, each re-scoring the partly pruned net "
                                        "(paper: iterative)", search=(1, 4))

    def __init__(self, model: nn.Module, targets: dict[str, float], graph: ChannelGraph,
                 **params: Any) -> None:
        super().__init__(model, targets, graph, **params)
        self.scores: dict[str, torch.Tensor] | None = None  # per targeted layer, set by calibrate
        self._dead: dict[str, torch.Tensor] = {}  # channels zeroed by earlier rounds


    @property
    def prune_epochs(self) -> float:
        return 0.0

    def _layers(self) -> list[str]:
        return [layer for layer, s in self.targets.items()
                if n_pruned(self.graph.group_of[layer].size, s) > 0]

    def importance(self, model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                   layers: list[str]) -> dict[str, torch.Tensor]:
        """Mean over `batches` mini-batches of channel_taylor(...)^2, per layer of `layers`."""
        params = dict(model.named_parameters())
        groups = {layer: self.graph.group_of[layer] for layer in layers}
        names = sorted({s.param for g in groups.values() for s in g.producers})
        acc = {layer: torch.zeros(g.size, device=params[names[0]].device)
               for layer, g in groups.items()}
        n = 0
        for x, y in itertools.islice(batches, self.params.batches):
            loss = nn.functional.cross_entropy(model(x), y)
            grads = dict(zip(names, torch.autograd.grad(loss, [params[p] for p in names]),
                             strict=True))
            for layer, g in groups.items():
                acc[layer] += channel_taylor(g, params, grads).pow(2)
            n += 1
        return {layer: a / max(n, 1) for layer, a in acc.items()}

    def calibrate(self, model: nn.Module,
                  batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers = self._layers()
        self.scores = {}
        if not layers:
            return
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        was_training = model.training
        model.train()
        try:
            for r in range(1, self.params.rounds + 1):
                scores = self.importance(model, batches, layers)
                # Channels zeroed in earlier rounds stay pruned: they rank below everything.
                for layer, dead in self._dead.items():
                    scores[layer] = scores[layer].masked_fill(dead.to(scores[layer].device), -1.0)
                self.scores = scores
                if r < self.params.rounds:
                    step = {layer: self.targets[layer] * r / self.params.rounds
                            for layer in layers}
                    self._dead = {layer: ~topk_mask(scores[layer], s).bool()
                                  for layer, s in step.items()}
                    apply_masks(model, filter_masks(self.graph, model, step, scores))
        finally:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
            model.train(was_training)

    def final_masks(self) -> Masks:
        """The lowest-importance filters of each layer, exactly `n_pruned` of them."""
        if self.scores is None:
            raise RuntimeError("taylor: final_masks() before calibrate(); the runner calls it")
        scores = {layer: self.scores.get(layer, torch.zeros(self.graph.group_of[layer].size))
                  for layer in self.targets}
        return filter_masks(self.graph, self.model, self.targets, scores)
