"""The "global" split of a budget: one importance ranking over all layers, as Torch-Pruning's
global pruning (`MetaPruner(global_pruning=True)`) and `torch.nn.utils.prune.global_unstructured`
do it.

The sampled split (`projection.project`) follows a per-layer preference the search samples.
The global split has no such parameter: every unit (an output channel of a filter unit, or a
single weight) gets one importance from the dense weights, the scores of all layers are pooled
and sorted, and the least-important units are removed, lowest first, until the budget is met.
How much each layer loses then follows from the weights alone; it is the hand baseline a user
would try with Torch-Pruning (filters) or `global_unstructured` (weights) instead of a search.

The result is a per-layer sparsity like `project`'s, with the same contract (the least pruning
whose cost is at most `target` times the budget, every layer capped by `CostTable.cap`), and it
is exact under the project's rounding rule: a layer with `k` of its `n` units below the threshold
gets sparsity `k / n`, and `n_pruned(n, k / n) == k`, so a method ranking the layer's units by the
same score removes exactly the units the global ranking chose.

Scores (`dense_scores`):
* filters: the channel group's Lp norm (`graph.unit_scores`, what magnitude's filter criterion
  ranks by, so within a layer both orders agree), raised to the power p and divided by the
  unit's mean. Torch-Pruning 1.6's `GroupMagnitudeImportance` scores a channel by sum |w|^p
  (no root) and normalises each group by its mean (`normalizer="mean"`, its default), which is
  what makes layers of different sizes comparable; we mirror both.
* weights: |w|, raw, as `global_unstructured` with `L1Unstructured` ranks them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..graph import ChannelGraph, unit_scores
from ..pruning.base import n_pruned
from .projection import KINDS, CostTable, _check_granularity, budget_share, fractions, least_passing

if TYPE_CHECKING:
    from ..pipeline import Workbench
    from .space import TrialPlan


def dense_scores(graph: ChannelGraph, model: nn.Module, candidates: list[str],
                 granularity: str, p: int = 2) -> dict[str, torch.Tensor]:
    """Importance per unit of each candidate (unit root or layer) from the model's weights.

    `p` must be the norm the method ranks filters by (magnitude's `norm`), so that the
    method's own choice inside a layer is the global ranking's.
    """
    _check_granularity(granularity)
    if granularity == "weight":
        return {n: model.get_submodule(n).weight.detach().abs().flatten().cpu()
                for n in candidates}
    out = {}
    for root, s in unit_scores(graph, model, candidates, p=p).items():
        s = s.detach().cpu().double() ** p
        mean = s.mean()
        out[root] = s / mean if mean > 0 else s  # an all-zero unit is pruned first anyway
    return out


def global_targets(table: CostTable, scores: dict[str, torch.Tensor], limits: dict[str, float],
                   target: float, granularity: str,
                   max_sparsity: float = 0.99) -> dict[str, float]:
    """Per-layer sparsities removing the globally lowest-scored units, just within the budget.

    `scores[name]` has one entry per unit of a candidate (`table.candidates(granularity)`):
    per channel of a filter unit root, per weight of a layer. Names that are not candidates
    are left out (they stay dense). The lowest `m` units of the pooled ranking are removed,
    each layer at most up to its cap, and `m` is the least that brings every kept fraction
    within `target * limits` (bisection; the cost only falls as `m` grows). If even every cap
    cannot reach the target, the caps are returned, as `project` does.
    """
    _check_granularity(granularity)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if not limits or any(k not in KINDS or not v > 0 for k, v in limits.items()):
        raise ValueError(f"limits must map {'/'.join(KINDS)} to positive fractions, got {limits}")
    names = [n for n in table.candidates(granularity) if n in scores]
    if not names:
        return {}
    sizes = []
    for n in names:
        c = table.layers[n]
        size = c.weights if granularity == "weight" else c.filters
        if scores[n].numel() != size:
            raise ValueError(f"scores of {n} have {scores[n].numel()} entries, expected {size}")
        sizes.append(size)
    kmax = torch.tensor([n_pruned(s, table.cap(n, granularity, max_sparsity))
                         for n, s in zip(names, sizes, strict=True)])
    pooled = torch.cat([scores[n].detach().flatten().double().cpu() for n in names])
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
    # stable: ties keep model order, so the ranking (and the result) is deterministic
    owner = owner[torch.sort(pooled, stable=True).indices]
    total = int(pooled.numel())

    def at(m: int) -> dict[str, float]:
        k = torch.minimum(torch.bincount(owner[:m], minlength=len(names)), kmax)
        return {n: int(ki) / s for n, ki, s in zip(names, k.tolist(), sizes, strict=True)}

    def ok(m: int) -> bool:
        return budget_share(fractions(table, at(m), granularity), limits) <= target

    if ok(0):
        return at(0)
    if not ok(total):
        return at(total)  # every layer at its cap
    return at(least_passing(ok, 0, total, integer=True))


def global_plan(wb: Workbench, plan: TrialPlan, granularity: str, limits: dict[str, float],
                target: float, max_sparsity: float = 0.99) -> dict[str, float]:
    """A trial's per-layer sparsities under split "global": `global_targets` on the dense
    model's `dense_scores`, over the layers the space leaves prunable.

    Filters are scored with the method's own `norm` where it has one (magnitude's Lp filter
    criterion), else L2 as Torch-Pruning's default `GroupMagnitudeImportance(p=2)`.
    """
    from ..pruning import get_method

    table = CostTable.from_accountant(wb.accountant, plan.prunable)
    candidates = table.candidates(granularity)
    p = int(getattr(get_method(plan.method).make_params(**plan.params), "norm", 2))
    scores = dense_scores(wb.accountant.graph, wb.fresh_model(), candidates, granularity, p)
    return global_targets(table, scores, limits, target, granularity, max_sparsity)
