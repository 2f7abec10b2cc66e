"""Multi-granularity pruning with adaptive L1 regularisation (after Liu & Chen, Acta Electronica
Sinica 51(8), 2023) -- a *reconstruction*.

The paper's full text could not be obtained (METHODS.md section 4): only its abstract (coarse to
fine granularities, adaptive L1, dimension-matched layers keep their channel counts) is known.
What follows is our design from those elements, not the authors' algorithm.

Groups, coarse to fine, for a conv weight W[o, c, kh, kw]:

* ``filter``: W[o]               (one channel of a filter unit, see below)
* ``kernel``: W[o, c]
* ``stripe``: W[o, c, :, k]      (one kernel column; 4-D weights only)
* ``weight``: W[o, c, i, k]

A linear layer has ``filter`` (a row) and ``weight`` only. During the method's phase a group-L1
penalty ``sum_g lam_g ||W_g||_2`` is added at every enabled level, with adaptive coefficients
``lam_g = lam0 * mean_h ||W_h|| / ||W_g||`` (within the layer and level, recomputed at the start
and after every epoch): weak groups are pushed harder towards zero, like reweighted L1.

The filter level works on *filter units* (`graph.filter_units()`): an uncoupled layer, or all
the layers tied by residual adds (the last convs of a stage's blocks and its shortcut conv),
whose channel c is dropped in every member at once, the "one shared filter mask across all
coupled layers" alternative of the paper's dimension-matched layers. A unit takes part only when
all its members are targeted; it drops the most whole channels that no member's filter budget
(``filter_share`` of its removals) is exceeded by. The logits layer has no filter level, and its
finer levels always leave each output row's largest weight in place.

BatchNorm makes a filter's group L1 useless: BN divides the filter's output by its own scale,
so shrinking W[o] changes nothing but the penalty, and the penalty can fall without selecting
any filter. Where BN follows a unit, the filter-level penalty is therefore on the BN scale, as
in network slimming (Liu et al., ICCV 2017): ``lam_c * ||gamma_c||`` (the L2 norm over the
unit's BNs; |gamma_c| for one BN), and channels are ranked by that norm at the end. Units
without BN keep the group L1 of their rows (jointly over the members).

Granularity "filter" is the structured part alone, for `flops=` budgets (single weights and
kernels inside live channels leave the compacted model's FLOPs whole): targets count each
unit's channels, only the filter-level penalty runs, and each unit then loses exactly its
target's lowest-norm channels (on the BN scales where BN follows: adaptive network slimming).
`filter_share`, `kernel_share`, `stripe_share` and `levels` mean nothing there and a `flops=`
space leaves them out (`weight_only_params`).

With granularity "weight" (the default), targets are fractions of each layer's *weights*:
`final_masks` allocates the k = n_pruned(weights, target) removals coarse to fine: whole filters
first (the unit's channels, as above), then kernels of surviving filters (at most
``kernel_share`` of what is left), then stripes of surviving kernels (at most ``stripe_share``
of what is left), and single weights by |w| complete k exactly. Dropped channels lose every
member's rows, biases and BatchNorm entries (`channel_masks`); so does any channel whose rows
the finer levels emptied in every member (`close_empty_channels`): dead for compaction and
credited by the FLOPs count.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..graph import ChannelGraph, gather_rows
from .base import (
    Masks,
    Pruner,
    channel_masks,
    close_empty_channels,
    filter_masks,
    hp,
    n_pruned,
    register,
)

LEVELS = ("filter", "kernel", "stripe", "weight")
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
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
             shares: dict[str, float],
             dropped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-to-fine removal of exactly n_pruned(weight.numel(), sparsity) weights.

    Returns (weight keep mask as float, bool vector of the whole filters dropped at the filter
    level). Each structured level removes whole groups of the weights still present, lowest
    norm first, up to its share of the removals left; single weights by |w| finish exactly. In a
    layer that is not `free`, every filter's largest weight is protected so no filter empties.
    `dropped`, when given, is the filter level decided for the layer's whole unit (at most the
    layer's filter budget): those filters go first and the layer's own filter level is skipped.
    """
    w = weight.detach()
    k = n_pruned(w.numel(), sparsity)
    # Plain contiguous masks, whatever the weight's memory format (channels_last on CUDA).
    keep = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    protected = torch.zeros_like(keep)
    if not free:
        top = w.abs().flatten(1).argmax(dim=1)
        protected.view(w.shape[0], -1)[torch.arange(w.shape[0], device=w.device), top] = True
    if dropped is None:
        dropped = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
        levels = levels_of(w, free, enabled)
    else:
        dropped = dropped.to(w.device)
        keep &= ~expand_group_mask(dropped, "filter", w.shape)
        levels = levels_of(w, False, enabled)
    removed = int((~keep).sum())
    for level in levels:
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


def bn_scales(graph: ChannelGraph, model: nn.Module, root: str) -> torch.Tensor | None:
    """BN scales gamma of `root`'s channel group, (size, number of BNs); None without BN."""
    g = graph.unit(root)
    cols = []
    for slot in g.producers:
        module, _, pname = slot.param.rpartition(".")
        if pname != "weight" or module in g.layers or len(slot.target_idx) != g.size:
            continue
        bn = model.get_submodule(module)
        if isinstance(bn, BATCHNORMS):
            order = torch.argsort(slot.root_idx)
            cols.append(bn.weight[slot.target_idx[order].to(bn.weight.device)])
    return torch.stack(cols, dim=1) if cols else None


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
        "granularity=filter (ours, for flops= budgets) keeps only the filter level: adaptive "
        "group L1 on channels (BN scales where BN follows), then each unit's weakest channels",
    )
    weight_only_params = ("filter_share", "kernel_share", "stripe_share", "levels")

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
                           search=(1.0, 3.0), length=True)
        granularity: str = hp("weight", choices=("weight", "filter"),
                              doc="weight: targets count a layer's weights, removed coarse to "
                                  "fine; filter: targets count channels, filter level only "
                                  "(what a flops= budget needs)")

    def __init__(self, model: nn.Module, targets: dict[str, float], graph: ChannelGraph,
                 **params: Any) -> None:
        super().__init__(model, targets, graph, **params)
        self.enabled = tuple(self.params.levels.split(","))
        if not set(self.enabled) <= set(LEVELS):  # guarded by choices; a clear error anyway
            raise UserError(f"adaptive_l1.levels must be a subset of {','.join(LEVELS)}")
        if self.granularity == "filter":  # the structured part alone
            self.enabled = ("filter",)
        # layer -> the root of its filter unit (uncoupled layers are their own root)
        self.unit_of = {n: r for r in graph.filter_units() for n in graph.unit(r).layers}
        # (layer, level) -> lam_g; (root, "filter") for a unit's channels
        self.coef: dict[tuple[str, str], torch.Tensor] = {}


    def _removals(self, layer: str) -> int:
        return n_pruned(self.model.get_submodule(layer).weight.numel(),
                        self.targets.get(layer, 0.0))

    def _filter_units(self) -> list[str]:
        """Units with a filter level: enabled, and every member layer has removals to make."""
        if self.granularity == "filter":  # targets are keyed by unit root, count channels
            return [r for r, s in self.targets.items() if n_pruned(self.graph.unit(r).size, s)]
        if "filter" not in self.enabled:
            return []
        return [r for r in dict.fromkeys(self.unit_of.values())
                if all(self._removals(n) > 0 for n in self.graph.unit(r).layers)]

    def _penalised(self) -> list[tuple[str, str]]:
        out = [(root, "filter") for root in self._filter_units()]
        if self.granularity == "filter":
            return out
        for layer in self.targets:
            if self._removals(layer) == 0:
                continue
            levels = levels_of(self.model.get_submodule(layer).weight, False, self.enabled)
            if "weight" in self.enabled:
                levels.append("weight")
            out.extend((layer, lv) for lv in levels)
        return out

    def norms(self, model: nn.Module, layer: str, level: str) -> torch.Tensor:
        """The group norms the penalty weighs: per group of `level` in `layer`, or per channel
        of the unit rooted at `layer` for "filter": ||gamma_c|| over its BNs where BN follows
        (scale-invariant W otherwise), else the norm of the channel's rows in every member."""
        if level != "filter":
            return group_norms(model.get_submodule(layer).weight, level)
        gamma = bn_scales(self.graph, model, layer)
        if gamma is not None:
            return gamma.abs().squeeze(1) if gamma.shape[1] == 1 else \
                torch.linalg.vector_norm(gamma, dim=1)
        members = self.graph.unit(layer).layers
        if len(members) == 1:
            return group_norms(model.get_submodule(layer).weight, "filter")
        rows = gather_rows(self.graph, layer, {n: model.get_submodule(n).weight for n in members})
        return torch.linalg.vector_norm(rows, dim=1)

    @torch.no_grad()
    def update_coefficients(self) -> None:
        """Recompute every lam_g from the current weights (start and end of each epoch)."""
        self.coef = {}
        for layer, level in self._penalised():
            norms = self.norms(self.model, layer, level)
            self.coef[(layer, level)] = adaptive_coefficients(norms, self.params.lam0)

    # -- training hooks ----------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       steps_per_epoch: int, epochs: float) -> None:
        self.update_coefficients()

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        self.update_coefficients()

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """sum over layers and levels of sum_g lam_g ||W_g||_2 (lam_g constant within an epoch);
        a unit followed by BN contributes sum_c lam_c ||gamma_c|| instead."""
        total = None
        for (layer, level), coef in self.coef.items():
            term = (coef * self.norms(model, layer, level)).sum()
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def unit_drop(self, root: str) -> torch.Tensor:
        """The unit's filter level: as many lowest-norm channels as every member's filter budget
        (filter_share of its removals, in whole rows) allows; bool per group channel."""
        share = self.params.filter_share
        n = min(int(share * self._removals(m)) // self.model.get_submodule(m).weight[0].numel()
                for m in self.graph.unit(root).layers)
        scores = self.norms(self.model, root, "filter")
        return drop_lowest(scores, torch.ones_like(scores, dtype=torch.bool), n)

    def final_masks(self) -> Masks:
        """Coarse-to-fine allocation meeting each layer's weight target exactly; at filter
        granularity, each unit's lowest-norm channels, exactly its target's count."""
        if self.granularity == "filter":
            scores = {r: self.norms(self.model, r, "filter") for r in self.targets}
            return filter_masks(self.graph, self.model, self.targets, scores)
        params = dict(self.model.named_parameters())
        p = self.params
        shares = {"filter": p.filter_share, "kernel": p.kernel_share, "stripe": p.stripe_share}
        masks: Masks = {}
        joint: dict[str, torch.Tensor] = {}  # member layer -> its rows dropped by its unit
        for root in self._filter_units():
            drop = self.unit_drop(root)
            for name in self.graph.unit(root).layers:
                joint[name] = drop[self.graph.member_rows(root, name).to(drop.device)]
            if bool(drop.any()):  # the whole channel dies: every member's rows, biases, BNs
                for name, m in channel_masks(self.graph, params, root, ~drop).items():
                    masks[name] = masks[name] * m if name in masks else m
        for layer, s in self.targets.items():
            w = self.model.get_submodule(layer).weight
            free = layer in self.unit_of
            dropped = joint.get(layer, torch.zeros(w.shape[0], dtype=torch.bool,
                                                   device=w.device)) if free else None
            keep, _ = allocate(w, s, free, self.enabled, shares, dropped)
            wname = f"{layer}.weight"
            masks[wname] = masks[wname] * keep if wname in masks else keep
        # Channels the finer levels emptied in every member die with their biases and BNs.
        return close_empty_channels(self.graph, params, masks)
