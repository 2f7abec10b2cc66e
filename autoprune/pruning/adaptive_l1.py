"""Multi-granularity pruning with adaptive L1 regularisation (after Liu & Chen, Acta Electronica
Sinica 51(8), 2023) -- a *reconstruction*.

The paper's full text could not be obtained (METHODS.md section 4): only its abstract (coarse to
fine granularities, adaptive L1, dimension-matched layers keep their channel counts) is known.
What follows is our design from those elements, not the authors' algorithm.

Groups, coarse to fine, for a conv weight W[o, c, kh, kw]:

* ``filter``: W[o]               (free layers only, see below)
* ``kernel``: W[o, c]
* ``stripe``: W[o, c, :, k]      (one kernel column; 4-D weights only)
* ``weight``: W[o, c, i, k]

A linear layer has ``filter`` (a row) and ``weight`` only. During the method's phase a group-L1
penalty ``sum_g lam_g ||W_g||_2`` is added at every enabled level, with adaptive coefficients
``lam_g = lam0 * mean_h ||W_h|| / ||W_g||`` (within the layer and level, recomputed at the start
and after every epoch): weak groups are pushed harder towards zero, like reweighted L1.

Layers whose output channels are tied to others (the last conv of a residual block, shortcut
convs: `graph.group_of[layer].coupled`) and the logits layer are not in `graph.free_layers()`:
they keep their filter count. No filter-level penalty or pruning there, and the finer levels
always leave each filter's largest weight in place (unless the target cannot be met otherwise).

Targets are fractions of each layer's *weights* (granularity "weight"). `final_masks` allocates
the k = n_pruned(weights, target) removals coarse to fine: whole filters first (lowest norm, at
most ``filter_share * k`` weights), then kernels of surviving filters (at most ``kernel_share`` of
what is left), then stripes of surviving kernels (at most ``stripe_share`` of what is left), and
single weights by |w| complete k exactly. A free layer's dropped filters also lose their bias and
BatchNorm entries (`channel_masks`), so the channel is dead for compaction and FLOPs.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..graph import ChannelGraph
from .base import Masks, Pruner, channel_masks, hp, n_pruned, register

LEVELS = ("filter", "kernel", "stripe", "weight")
LEVEL_CHOICES = tuple(",".join(c) for r in range(1, 5) for c in itertools.combinations(LEVELS, r))


# -- pure maths ------------------------------------------------------------------------------
def group_norms(weight: torch.Tensor, level: str) -> torch.Tensor:
    """L2 norm of every group of `level`, shaped like the group index (e.g. (O, C) for kernels)."""
    if level == "filter":
        return torch.linalg.vector_norm(weight.flatten(1), dim=1)
    if level == "kernel":
        return torch.linalg.vector_norm(weight.flatten(2), dim=2)
    if level == "stripe":
        return torch.linalg.vector_norm(weight, dim=2)  # W[o, c, :, k] -> (O, C, kw)
    return weight.abs()


def expand_group_mask(keep: torch.Tensor, level: str, shape: torch.Size) -> torch.Tensor:
    """A group-level keep mask broadcast to the weight's shape."""
    if level == "filter":
        keep = keep.view(-1, *([1] * (len(shape) - 1)))
    elif level == "kernel":
        keep = keep.view(*keep.shape, *([1] * (len(shape) - 2)))
    elif level == "stripe":
        keep = keep.unsqueeze(2)
    return keep.expand(shape)


def levels_of(weight: torch.Tensor, free: bool, enabled: tuple[str, ...]) -> list[str]:
    """Structured levels that apply to a weight: kernels need >= 3 dims, stripes 4."""
    ok = {"filter": free, "kernel": weight.dim() >= 3, "stripe": weight.dim() == 4}
    return [lv for lv in LEVELS[:3] if lv in enabled and ok[lv]]


def adaptive_coefficients(norms: torch.Tensor, lam0: float = 1.0,
                          floor: float = 1e-2) -> torch.Tensor:
    """lam_g = lam0 * mean_h ||W_h|| / ||W_g||, with ||W_g|| floored at `floor` * mean.

    The floor caps the coefficient of (almost) zero groups at lam0 / floor, so the penalty's
    gradient stays bounded; an all-zero layer gets lam0 everywhere.
    """
    norms = norms.detach()
    mean = norms.mean()
    if float(mean) == 0.0:
        return torch.full_like(norms, lam0)
    return lam0 * mean / norms.clamp_min(floor * mean)


def drop_lowest(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask (shape of `scores`) of the `n` lowest-scoring entries among `candidates`."""
    flat = scores.detach().flatten().float().masked_fill(~candidates.flatten(), float("inf"))
    out = torch.zeros_like(flat, dtype=torch.bool)
    n = min(n, int(candidates.sum()))
    if n > 0:
        out[torch.topk(flat, n, largest=False).indices] = True
    return out.view_as(scores)


def allocate(weight: torch.Tensor, sparsity: float, free: bool, enabled: tuple[str, ...],
             shares: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-to-fine removal of exactly n_pruned(weight.numel(), sparsity) weights.

    Returns (weight keep mask as float, bool vector of the whole filters dropped at the filter
    level). Each structured level removes whole groups of the weights still present, lowest
    norm first, up to its share of the removals left; single weights by |w| finish exactly. In a
    layer that is not `free`, every filter's largest weight is protected so no filter empties.
    """
    w = weight.detach()
    k = n_pruned(w.numel(), sparsity)
    # Plain contiguous masks, whatever the weight's memory format (channels_last on CUDA).
    keep = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    dropped = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
    protected = torch.zeros_like(keep)
    if not free:
        top = w.abs().flatten(1).argmax(dim=1)
        protected.view(w.shape[0], -1)[torch.arange(w.shape[0], device=w.device), top] = True
    removed = 0
    for level in levels_of(w, free, enabled):
        budget = int(shares[level] * (k - removed))
        norms = group_norms(w, level)
        gsize = w.numel() // norms.numel()
        # A group is a candidate when it is whole (nothing removed yet) and holds no protected
        # weight: finer groups always live inside surviving coarser ones. (The squared L2 norm
        # of a 0/1 mask counts its ones.)
        whole = group_norms(keep.float(), level).pow(2).round().long() == gsize
        clean = group_norms(protected.float(), level) == 0
        drop = drop_lowest(norms, whole & clean, budget // gsize)
        if level == "filter":
            dropped = drop
        keep &= ~expand_group_mask(drop, level, w.shape)
        removed = int((~keep).sum())
    left = k - removed
    if left > 0:
        cand = keep & ~protected
        if int(cand.sum()) < left:  # the target needs protected weights too
            cand = keep
        keep &= ~drop_lowest(w.abs(), cand, left)
    return keep.to(weight.dtype), dropped


# -- the method ------------------------------------------------------------------------------
@register
class AdaptiveL1(Pruner):
    """Multi-granularity group-L1 with adaptive coefficients, then coarse-to-fine pruning."""

    name = "adaptive_l1"
    differences = (
        "the paper's full text was not available: the algorithm is our reconstruction from its "
        "abstract (coarse-to-fine granularities, adaptive L1, dimension-matched layers)",
        "the coefficients are not scaled by each layer's FLOPs share, and groups are not zeroed "
        "by a norm threshold tau: an exact coarse-to-fine allocation meets the targets instead",
    )

    @dataclasses.dataclass
    class Params:
        lam0: float = hp(1e-4, 1e-6, 1e-2, doc="base group-L1 strength lambda_0 (log scale)",
                         search=(1e-5, 1e-3), log=True)
        filter_share: float = hp(0.5, 0.0, 1.0, doc="largest share of a layer's removals "
                                                    "taken as whole filters",
                                 search=(0.0, 0.8))
        kernel_share: float = hp(0.5, 0.0, 1.0, doc="largest share of the removals left "
                                                    "taken as whole kernels")
        stripe_share: float = hp(0.5, 0.0, 1.0, doc="largest share of the removals left "
                                                    "taken as kernel stripes")
        levels: str = hp("filter,kernel,stripe,weight", choices=LEVEL_CHOICES,
                         doc="enabled granularities, coarse to fine (single weights always "
                             "complete the target; 'weight' adds their L1 penalty)")
        epochs: float = hp(4.0, 0.0, 1000.0, doc="epochs of regularised training",
                           search=(1.0, 3.0))

    def __init__(self, model: nn.Module, targets: dict[str, float], graph: ChannelGraph,
                 **params: Any) -> None:
        super().__init__(model, targets, graph, **params)
        self.enabled = tuple(self.params.levels.split(","))
        if not set(self.enabled) <= set(LEVELS):  # guarded by choices; a clear error anyway
            raise UserError(f"adaptive_l1.levels must be a subset of {','.join(LEVELS)}")
        self.free = set(graph.free_layers())
        self.coef: dict[tuple[str, str], torch.Tensor] = {}  # (layer, level) -> lam_g

    @property
    def granularity(self) -> str:
        return "weight"

    def _penalised(self) -> list[tuple[str, str]]:
        out = []
        for layer, s in self.targets.items():
            w = self.model.get_submodule(layer).weight
            if n_pruned(w.numel(), s) == 0:
                continue
            levels = levels_of(w, layer in self.free, self.enabled)
            if "weight" in self.enabled:
                levels.append("weight")
            out.extend((layer, lv) for lv in levels)
        return out

    @torch.no_grad()
    def update_coefficients(self) -> None:
        """Recompute every lam_g from the current weights (start and end of each epoch)."""
        self.coef = {}
        for layer, level in self._penalised():
            norms = group_norms(self.model.get_submodule(layer).weight, level)
            self.coef[(layer, level)] = adaptive_coefficients(norms, self.params.lam0)

    # -- training hooks ----------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       steps_per_epoch: int, epochs: float) -> None:
        self.update_coefficients()

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        self.update_coefficients()

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """sum over layers and levels of sum_g lam_g ||W_g||_2 (lam_g constant within an epoch)."""
        total = None
        for (layer, level), coef in self.coef.items():
            w = model.get_submodule(layer).weight
            term = (coef * group_norms(w, level)).sum()
            total = term if total is None else total + term
        return total

    def final_masks(self) -> Masks:
        """Coarse-to-fine allocation meeting each layer's weight target exactly."""
        params = dict(self.model.named_parameters())
        p = self.params
        shares = {"filter": p.filter_share, "kernel": p.kernel_share, "stripe": p.stripe_share}
        masks: Masks = {}
        for layer, s in self.targets.items():
            w = self.model.get_submodule(layer).weight
            free = layer in self.free
            keep, dropped = allocate(w, s, free, self.enabled, shares)
            if free and bool(dropped.any()):
                # Kill the whole channel: bias and BN too (the weight rows are already 0).
                for name, m in channel_masks(self.graph, params, layer, ~dropped).items():
                    masks[name] = masks[name] * m if name in masks else m
            wname = f"{layer}.weight"
            masks[wname] = masks[wname] * keep if wname in masks else keep
        return masks
