"""From a sampled allocation to per-layer sparsities that meet a FLOPs/params budget: pure maths.

The search samples *where* to prune (a relative preference per layer, `allocation`) and *how
hard* (`target`, a fraction of the budget); this module turns the pair into exact per-layer
sparsities. One global shift `s` moves every layer along its own sigmoid,

    sparsity_l = clip(sigmoid(logit(a_l) + s), 0, cap_l),

so the preferences keep their order and the budget is met by construction: bisection on `s`
finds the least pruning whose cost is at most `target` times the budget. Trials therefore spend
their time on accuracy, never on missing the budget.

The cost model (`CostTable`, `fractions`) is the `Accountant`'s counting done on numbers instead
of tensors, using the project's one rounding rule (`n_pruned`), so a prediction equals what
`Accountant.count` measures on a model masked with `weight_masks` / `filter_masks`: bit for bit
for filter pruning; for weight pruning too, unless a whole output row of a layer without bias or
BatchNorm happens to die, which can only lower the real count.

Filter sparsities are keyed by channel-group root (`ChannelGraph.filter_units()`): an uncoupled
layer is its own root; layers tied by residual adds form one unit, and a removed channel of it
costs every member's output row, its BN/bias entries and every consumer's input columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..flops import Accountant
from ..pruning.base import n_pruned

GRANULARITIES = ("weight", "filter")
KINDS = ("flops", "sparse_flops", "params", "weights")  # budget kinds (budget.KEYS), all predicted
_BISECT_ITERS = 60
_SHIFT_RANGE = 40.0  # sigmoid(logit(a) +- 40) is ~0 / ~1 for every a in [1e-6, 1 - 1e-6]
_ALLOC_EPS = 1e-6
PRIOR_STRENGTH = 0.5  # size_prior's default strength (the ADMM paper's LeNet-5 shape)


@dataclass(frozen=True)
class LayerCost:
    """What pruning one conv/linear layer can save."""

    name: str
    macs: int  # dense MACs
    weights: int  # weight tensor numel
    filters: int  # output channels (weight.shape[0])
    in_cols: int  # weight.shape[1]: input channels (conv) or input features (linear)
    extra_per_filter: int  # bias + BatchNorm entries of the whole group that die per channel
    free: bool  # filters removable on their own (graph.free_layers())
    prunable: bool  # in the table's prunable set (after the space's exclusions)
    # filter units (group roots) whose channels feed this layer's input columns:
    # (root, columns per channel)
    inputs: tuple[tuple[str, int], ...] = ()
    unit: str = ""  # root of the filter unit whose channels are this layer's rows ("" if none)

    @property
    def kernel(self) -> int:
        """Weights per (output row, input column) pair: kh*kw for convs, 1 for linear layers."""
        return self.weights // (self.filters * self.in_cols)


@dataclass(frozen=True)
class CostTable:
    """Dense costs of every prunable layer, in the accountant's (forward) order."""

    layers: dict[str, LayerCost]
    fixed_macs: int
    dense_macs: int
    dense_params: int
    units: dict[str, tuple[str, ...]] = field(default_factory=dict)  # root -> member layers

    @classmethod
    def from_accountant(cls, acc: Accountant, layers: list[str] | None = None) -> CostTable:
        """Read the costs off a traced dense model; `layers` limits which may be pruned."""
        graph = acc.graph
        prunable = set(graph.layers if layers is None else layers)
        unknown = prunable - set(graph.layers)
        if unknown:
            raise ValueError(f"layers not in the model: {', '.join(sorted(unknown))}")
        free = set(graph.free_layers())
        units = {r: graph.unit(r).layers for r in graph.filter_units()}
        unit_of = {n: r for r, members in units.items() for n in members}
        weight_params = {f"{n}.weight" for n in graph.layers}
        # Which unit's channels feed which layer's input columns (a consumer slot).
        inputs: dict[str, dict[str, int]] = {n: {} for n in graph.layers}
        for root in units:
            g = graph.unit(root)
            for slot in g.consumers:
                consumer = slot.param.rsplit(".", 1)[0]
                if slot.param not in weight_params or slot.dim != 1:
                    continue
                # flatten -> linear maps one channel to H*W columns; conv -> conv to one
                per_channel = len(slot.target_idx) // g.size
                inputs[consumer][root] = inputs[consumer].get(root, 0) + per_channel
        table: dict[str, LayerCost] = {}
        for name, module in graph.layers.items():
            w = module.weight
            group = graph.group_of[name]
            extra = sum(len(s.target_idx) for s in group.producers
                        if s.param not in weight_params) // group.size
            table[name] = LayerCost(
                name=name, macs=int(acc.layer_macs[name]), weights=w.numel(),
                filters=int(w.shape[0]), in_cols=int(w.shape[1]) if w.dim() > 1 else 1,
                extra_per_filter=int(extra), free=name in free, prunable=name in prunable,
                inputs=tuple(inputs[name].items()), unit=unit_of.get(name, ""))
        return cls(table, int(acc.fixed_macs), int(acc.dense_macs), int(acc.dense_params),
                   units)

    def candidates(self, granularity: str) -> list[str]:
        """What a granularity may prune: prunable layers, or for filters the roots of units
        whose members are all prunable (excluding one member of a group protects the group)."""
        _check_granularity(granularity)
        if granularity == "weight":
            return [n for n, c in self.layers.items() if c.prunable]
        return [r for r, members in self.units.items()
                if all(self.layers[n].prunable for n in members)]

    def cap(self, layer: str, granularity: str, max_sparsity: float) -> float:
        """Highest usable sparsity of a layer: max_sparsity, but at least one weight/filter kept."""
        c = self.layers[layer]
        n = c.weights if granularity == "weight" else c.filters
        s = min(max_sparsity, (n - 1) / n)
        while s > 0 and n_pruned(n, s) >= n:  # guard against round() landing on n
            s -= 0.5 / n
        return max(s, 0.0)


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def fractions(table: CostTable, sparsities: dict[str, float],
              granularity: str) -> dict[str, float]:
    """The four kept fractions of the dense model at these per-layer sparsities (`KINDS`).

    `flops` is the compacted model's (1.0 for weight pruning: zeros inside live channels save no
    dense-hardware MACs), `sparse_flops` the nonzero weights' MACs. Mirrors `Accountant.count`
    operation for operation (same sums in the same order), so the result is equal to the
    measurement, not merely close to it.
    """
    _check_granularity(granularity)
    allowed = set(table.candidates(granularity))
    bad = [n for n, s in sparsities.items() if s > 0 and n not in allowed]
    if bad:
        raise ValueError(f"{granularity} sparsity given for layer(s) it cannot prune: "
                         f"{', '.join(sorted(bad))}")
    macs = float(table.fixed_macs)
    removed = 0  # parameters
    all_weights = sum(c.weights for c in table.layers.values())
    if granularity == "weight":
        for name, c in table.layers.items():
            kept = c.weights - n_pruned(c.weights, sparsities.get(name, 0.0))
            macs += c.macs * kept / c.weights
            removed += c.weights - kept
        # zeros inside live channels: the compacted model keeps every MAC
        return {"flops": 1.0, "sparse_flops": macs / table.dense_macs,
                "params": (table.dense_params - removed) / table.dense_params,
                "weights": (all_weights - removed) / all_weights}
    else:
        # Removed channels per unit; every member loses those rows, every consumer the columns.
        dead = {r: n_pruned(table.layers[r].filters, sparsities.get(r, 0.0)) for r in table.units}
        removed_weights = 0
        for name, c in table.layers.items():
            d = dead.get(c.unit, 0)
            rows = c.filters - d
            cols = c.in_cols - sum(per * dead[p] for p, per in c.inputs)
            kept = rows * cols * c.kernel
            macs += c.macs * kept / c.weights
            removed_weights += c.weights - kept
            removed += c.weights - kept + (d * c.extra_per_filter if name == c.unit else 0)
    return {"flops": macs / table.dense_macs, "sparse_flops": macs / table.dense_macs,
            "params": (table.dense_params - removed) / table.dense_params,
            "weights": (all_weights - removed_weights) / all_weights}


def _logit(a: float) -> float:
    a = min(max(float(a), _ALLOC_EPS), 1.0 - _ALLOC_EPS)
    return math.log(a / (1.0 - a))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def budget_share(fracs: dict[str, float], limits: dict[str, float]) -> float:
    """The share of the budget a model uses: its largest kept fraction over that kind's limit
    (1.0 at the budget; a trial's `target` once projected)."""
    return max(fracs[k] / v for k, v in limits.items())


def size_prior(table: CostTable, layers: list[str] | None = None,
               granularity: str = "weight", strength: float = PRIOR_STRENGTH
               ) -> dict[str, float]:
    """Per-layer preference from size alone: larger layers are pruned harder.

    logit(p_l) = strength * (log weights_l - mean log weights). At the default 0.5 this gives
    on LeNet-5 the shape of the ADMM paper's hand-set ratios (conv1 least, fc1 most) without
    hand-setting anything; 0 is the uniform split, and larger strengths spare the small layers
    more, which is what the highest compressions want (the search samples it: one number that
    moves every layer coherently, where the per-layer offsets are one number each).
    It is the default split of a budget (`autoprune prune`) and the centre the search's
    sampled allocation moves around (`with_prior`). For filter granularity the preferences are
    those of the unit roots, each sized by all its member layers.
    """
    names = [n for n in (layers if layers is not None else table.layers) if n in table.layers
             and (granularity == "weight" or n in table.units)]
    if not names:
        return {}

    def size(n: str) -> int:  # a filter unit's size is that of all its member layers
        members = table.units[n] if granularity == "filter" else (n,)
        return sum(table.layers[m].weights for m in members)

    logs = {n: math.log(size(n)) for n in names}
    mean = sum(logs.values()) / len(logs)
    return {n: _sigmoid(strength * (v - mean)) for n, v in logs.items()}


def with_prior(allocation: dict[str, float], prior: dict[str, float]) -> dict[str, float]:
    """Sampled preferences taken as offsets from a prior: sigmoid(logit(a) + logit(p)).

    An allocation of 0.5 everywhere gives the prior itself; the search then explores splits
    around a sensible one instead of around "every layer alike", which at high compression
    (LeNet-5 at 71x) wastes most trials on splits that strip the small first layers bare.
    Layers without a prior keep their sampled value.
    """
    return {n: _sigmoid(_logit(a) + _logit(prior[n])) if n in prior else a
            for n, a in allocation.items()}


def project(table: CostTable, allocation: dict[str, float], limits: dict[str, float],
            target: float, granularity: str, max_sparsity: float = 0.99) -> dict[str, float]:
    """Per-layer sparsities following `allocation` whose cost is just within target * limits.

    Layers missing from `allocation`, not prunable in the table, or (for filter pruning) not
    unit roots stay dense and are left out of the result. If even the caps everywhere cannot
    reach the target, the capped allocation is returned: check `min_reachable` first to refuse
    a budget.
    """
    _check_granularity(granularity)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if not limits or any(k not in KINDS or not v > 0 for k, v in limits.items()):
        raise ValueError(f"limits must map {'/'.join(KINDS)} to positive fractions, got {limits}")
    layers = [n for n in table.candidates(granularity) if n in allocation]
    logits = {n: _logit(allocation[n]) for n in layers}
    caps = {n: table.cap(n, granularity, max_sparsity) for n in layers}

    def at(shift: float) -> dict[str, float]:
        return {n: min(_sigmoid(logits[n] + shift), caps[n]) for n in layers}

    def ok(shift: float) -> bool:
        return budget_share(fractions(table, at(shift), granularity), limits) <= target

    lo, hi = -_SHIFT_RANGE, _SHIFT_RANGE
    if ok(lo):
        return at(lo)
    if not ok(hi):
        return {n: caps[n] for n in layers}
    return at(least_passing(ok, lo, hi))


def least_passing(ok: Callable[[Any], bool], lo: float, hi: float, *,
                  integer: bool = False) -> Any:
    """Bisection for the edge of a monotone test: given `ok(hi)` and not `ok(lo)`, the
    smallest passing value to within 1 (`integer`) or `_BISECT_ITERS` halvings. A budget's
    cost only falls as pruning grows, so every "how much to prune" search here is one."""
    if integer:
        lo, hi = int(lo), int(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def reachable_target(target: float, floor: float, table: CostTable, limits: dict[str, float],
                     granularity: str, max_sparsity: float = 0.99) -> float:
    """Map a sampled target in [floor, 1] onto the part of that range the model can reach.

    At extreme budgets (LeNet-5 at params=0.014 with every layer capped at 99 %, the smallest
    reachable params fraction is 0.0113, i.e. 0.81 of the budget) every target below the
    reachable ratio projects to the same plan, every layer at its cap, and such trials waste the
    search. The range [floor, 1] is therefore stretched linearly onto [max(floor, reach), 1]:
    the sampled value keeps its order and meaning ("how far below the budget"), and no two
    targets collapse onto one plan. A budget out of reach entirely (reach > 1) is left alone.
    """
    reach = budget_share(min_reachable(table, granularity, max_sparsity), limits)
    if reach <= floor or reach >= 1.0 or floor >= 1.0:
        return target
    return reach + (target - floor) * (1.0 - reach) / (1.0 - floor)


def min_reachable(table: CostTable, granularity: str,
                  max_sparsity: float = 0.99) -> dict[str, float]:
    """The smallest FLOPs and params fractions the space can reach: every candidate at its cap."""
    caps = {n: table.cap(n, granularity, max_sparsity) for n in table.candidates(granularity)}
    return fractions(table, caps, granularity)
