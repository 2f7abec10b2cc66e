"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma, ICLR 2018), with the
fine-grained, one-gate-per-weight variant of Xie et al. (ECAI 2019).

Every targeted layer's weight is multiplied by gates z in [0, 1] with learnable locations
log alpha. During training a gate is a *hard-concrete* sample, a stretched and clipped binary
concrete variable, so that z is exactly 0 or 1 with non-zero probability while the expected L0
norm, sum_j P(z_j != 0), stays differentiable in log alpha. At test time the gate is the
deterministic ``clamp(sigmoid(log alpha) * (zeta - gamma) + gamma, 0, 1)``.

Granularity: ``"weight"`` (default) gives every weight its own gate, as in Xie et al. 2019; their
paper was not readable (only its abstract, METHODS.md section 3b), so this variant is a
*reconstruction*: the Louizos machinery applied per weight. ``"filter"`` gates whole output
filters/neurons, the structured setting of the reference code; a target keyed by the root of a
residual-coupled channel group gets one gate per group channel, shared by every member layer.

Implementation notes (the *why*):

* The gates are a ``torch.nn.utils.parametrize`` parametrisation of ``weight``: every forward
  pass sees ``W * z`` while the optimiser keeps updating the original ``W`` (same Parameter
  object), and removing the parametrisation restores the plain module class.
* One gate sample per mini-batch (per-example noise is impossible for per-weight gates).
* The log alpha tensors join the engine's optimiser as their own group (no weight decay). The
  engine drives every group's lr by one schedule, so ``gate_lr_mult`` scales the log alpha
  gradients before the step instead: with SGD that is a larger gate learning rate, needed
  because per-weight gate gradients are tiny. The default 1000 makes an SGD step of log alpha
  (lr 0.05 x ~1e-5 x 1000) about the size of the paper's Adam step (lr 1e-3).
* Penalty normalisation: ``lam * sum_j P(z_j != 0) * |g_j| / M`` with ``M`` the number of gated
  weights, i.e. ``lam`` times the expected fraction of weights kept. The paper's
  ``(lam_paper / N) * sum_j P_j |g_j|`` equals this with ``lam = lam_paper * M / N``, which is
  about 0.7 for both of its settings (LeNet-5/MNIST: 0.1 * 431k / 60k; WRN-28-10/CIFAR: 0.001 *
  36.5M / 50k), so the default 0.7 reproduces both and carries over across model sizes. The
  paper's gate-weighted L2 term is left to the recipe's ordinary weight decay.
* With BatchNorm after a conv, a filter gate in (0, 1] is normalised away, so its only force is
  the penalty; filter gates are most meaningful on BN-free layers (a known property of the
  structured method, not of this code).

At the end (``final_masks``) the deterministic gates are folded into the weights (W *= z), the
parametrisation is removed, and each layer's target is met exactly by pruning the smallest
*folded* magnitudes |W * z| first (for filters: the norm of the folded filter), ties -- e.g. all
gates at 0 -- broken by log alpha, most confidently closed first. Once the gates have
saturated at 0 or 1 this is "gate value first, |W| among open gates"; while they are still
undecided (short phases, small `gate_lr_mult`) it degrades to magnitude pruning of the test-time
network instead of ranking by gate noise.

Starting point: the paper trains from scratch with p = 0.5 (the default here). From a
pretrained network, p = 0.5 halves every weight at the start (E[z] = 0.5) and injects heavy
multiplicative noise; on digits p = 0.1 kept the pretrained function and ended clearly better,
so `init_drop` is worth searching low.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..graph import ChannelGraph, unit_scores
from .base import Masks, Pruner, filter_masks, hp, n_pruned, register, weight_masks

BETA = 2.0 / 3.0  # temperature of the binary concrete
GAMMA = -0.1  # stretch interval (gamma, zeta), then clipped to [0, 1]
ZETA = 1.1
LOG_ALPHA_MIN = math.log(1e-2)  # clamp of the reference code, after every step
LOG_ALPHA_MAX = math.log(1e2)


# -- pure maths ------------------------------------------------------------------------------
def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """z = clamp(sigmoid((log u - log(1-u) + log alpha) / beta) * (zeta - gamma) + gamma, 0, 1).

    `u` ~ U(0, 1) is drawn when not given (tests pass it to check the formula).
    """
    if u is None:
        eps = 1e-6
        u = torch.rand_like(log_alpha).clamp(eps, 1.0 - eps)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """Test-time gate: clamp(sigmoid(log alpha) * (zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) = sigmoid(log alpha - beta * log(-gamma / zeta)): the expected L0 per gate."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def init_log_alpha(drop: float) -> float:
    """Mean of the log alpha initialisation for an initial drop rate p: log((1 - p) / p)."""
    return math.log((1.0 - drop) / drop)


def rank_lexicographic(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Float ranks 0..n-1 (shape of `primary`) ordering by `primary`, ties by `secondary`.

    Feeding the ranks to `topk_mask` prunes the lowest (primary, secondary) pairs exactly.
    """
    p = primary.detach().flatten()
    s = secondary.detach().flatten().to(p.device)
    order = torch.argsort(s, stable=True)
    order = order[torch.argsort(p[order], stable=True)]
    ranks = torch.empty_like(p)
    ranks[order] = torch.arange(p.numel(), device=p.device, dtype=p.dtype)
    return ranks.view_as(primary)


class HardConcreteGate(nn.Module):
    """Parametrisation W -> W * z: sampled gates in train mode, deterministic ones in eval.

    For a coupled channel group every member layer gets one of these around the same log alpha:
    `rows` maps the member's output rows to group channels, and `shared` holds the step's one
    training sample so all members see the same z (cleared by `L0.after_step`).
    """

    def __init__(self, log_alpha: nn.Parameter, weight_dim: int, rows: torch.Tensor | None = None,
                 shared: dict | None = None) -> None:
        super().__init__()
        self.log_alpha = log_alpha
        self.weight_dim = weight_dim
        self.rows = rows
        self.shared = shared

    def gate(self) -> torch.Tensor:
        if not self.training:
            z = deterministic_gate(self.log_alpha)
        elif self.shared is None:
            z = hard_concrete_sample(self.log_alpha)
        else:
            z = self.shared.get("z")
            if z is None:
                z = self.shared["z"] = hard_concrete_sample(self.log_alpha)
        if self.rows is not None:
            z = z[self.rows]
        if z.dim() == 1 and self.weight_dim > 1:  # one gate per output filter
            z = z.view(-1, *([1] * (self.weight_dim - 1)))
        return z

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate().to(weight.dtype)


# -- the method ------------------------------------------------------------------------------
@register
class L0(Pruner):
    """Hard-concrete L0 gates on weights (Xie et al.) or filters (Louizos et al.)."""

    name = "l0"

    @dataclasses.dataclass
    class Params:
        lam: float = hp(0.7, 1e-3, 10.0, doc="L0 strength per expected fraction of weights "
                                             "kept (0.7 = paper's 0.1/N on MNIST; log scale)")
        init_drop: float = hp(0.5, 0.05, 0.95, doc="initial gate drop rate p: log alpha ~ "
                                                   "N(log((1-p)/p), 0.01)")
        epochs: float = hp(4.0, 0.0, 1000.0, doc="epochs of gated training")
        granularity: str = hp("weight", choices=("weight", "filter"),
                              doc="one gate per weight (Xie 2019) or per filter (Louizos 2018)")
        gate_lr_mult: float = hp(1000.0, 1.0, 1e5, doc="gradient scale of log alpha (an lr "
                                                       "multiplier under SGD; log scale)")

    def __init__(self, model: nn.Module, targets: dict[str, float], graph: ChannelGraph,
                 **params: Any) -> None:
        super().__init__(model, targets, graph, **params)
        self.log_alpha: dict[str, nn.Parameter] = {}
        self._gate_count = 1  # M, the number of gated weights (penalty normalisation)
        self._scores: dict[str, torch.Tensor] = {}  # rank scores, set when gates are folded
        self._shared: list[dict] = []  # per coupled filter group: the step's gate sample

    @property
    def granularity(self) -> str:
        return self.params.granularity

    def _gated_layers(self) -> list[str]:
        out = []
        for layer, s in self.targets.items():
            w = self.model.get_submodule(layer).weight
            units = w.shape[0] if self.granularity == "filter" else w.numel()
            if n_pruned(units, s) > 0:
                out.append(layer)
        return out

    def _group_size(self, layer: str) -> int:
        """|g_j|: weights per gate (a filter gate of a coupled group covers every member's row)."""
        if self.granularity != "filter":
            return 1
        total = 0
        for n in self.graph.unit(layer).layers:
            mod = self.model.get_submodule(n)  # the raw weight's shape: no gate sample drawn
            w = mod.parametrizations.weight.original if parametrize.is_parametrized(
                mod, "weight") else mod.weight
            total += w[0].numel()
        return total

    def _members(self, layer: str) -> tuple[str, ...]:
        """Layers gated by `layer`'s gates: its channel group's members for filter gates."""
        return self.graph.unit(layer).layers if self.granularity == "filter" else (layer,)

    def _install(self, model: nn.Module, layer: str) -> None:
        """Parametrise the weights gated by `layer`'s log alpha (one sample per step if shared)."""
        la, members = self.log_alpha[layer], self._members(layer)
        shared = {} if len(members) > 1 else None
        for name in members:
            mod = model.get_submodule(name)
            rows = None if shared is None else self.graph.member_rows(layer, name).to(la.device)
            parametrize.register_parametrization(
                mod, "weight", HardConcreteGate(la, mod.weight.dim(), rows, shared))
        if shared is not None:
            self._shared.append(shared)

    # -- training hooks ----------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       steps_per_epoch: int, epochs: float) -> None:
        """Create the gates on the weights' device, install them, hand log alpha to `optimizer`."""
        p = self.params
        mean = init_log_alpha(p.init_drop)
        for layer in self._gated_layers():
            mod = model.get_submodule(layer)
            if parametrize.is_parametrized(mod, "weight"):
                continue  # a second training run with the same pruner keeps its gates
            w = mod.weight
            shape = (w.shape[0],) if self.granularity == "filter" else tuple(w.shape)
            if layer not in self.log_alpha:
                la = torch.empty(shape, device=w.device, dtype=torch.float32)
                self.log_alpha[layer] = nn.Parameter(la.normal_(mean, 1e-2))
            self._install(model, layer)
        self._gate_count = max(1, sum(self.log_alpha[n].numel() * self._group_size(n)
                                      for n in self.log_alpha))
        if self.log_alpha:
            optimizer.add_param_group({"params": list(self.log_alpha.values()),
                                       "lr": optimizer.param_groups[0]["lr"],
                                       "weight_decay": 0.0})

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """lam * sum_j P(z_j != 0) * |g_j| / M: lam times the expected kept fraction."""
        total = None
        for layer, la in self.log_alpha.items():
            term = prob_nonzero(la).sum() * self._group_size(layer)
            total = term if total is None else total + term
        return None if total is None else self.params.lam * total / self._gate_count

    def before_step(self, model: nn.Module) -> None:
        for la in self.log_alpha.values():
            if la.grad is not None:
                la.grad.mul_(self.params.gate_lr_mult)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for shared in self._shared:
            shared.clear()  # the next step draws a new sample
        for la in self.log_alpha.values():
            la.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    # -- the end ---------------------------------------------------------------------------------
    def gates(self) -> dict[str, torch.Tensor]:
        """Deterministic gate values per gated layer (shape of log alpha)."""
        return {layer: deterministic_gate(la.detach()) for layer, la in self.log_alpha.items()}

    @torch.no_grad()
    def fold_gates(self) -> None:
        """W *= z with the deterministic gates, then remove the parametrisation (idempotent).

        Records the rank scores of every gated layer: folded magnitude first, log alpha next.
        """
        for layer, z in self.gates().items():
            if not parametrize.is_parametrized(self.model.get_submodule(layer), "weight"):
                continue
            members = self._members(layer)
            for name in members:
                mod = self.model.get_submodule(name)
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
                w = mod.weight
                zm = z if len(members) == 1 else z[self.graph.member_rows(layer, name).to(z.device)]
                zz = zm.view(-1, *([1] * (w.dim() - 1))) if zm.dim() == 1 and w.dim() > 1 else zm
                w.mul_(zz.to(w.dtype))
            mag = self._magnitude(layer)
            self._scores[layer] = rank_lexicographic(mag, self.log_alpha[layer])

    def _magnitude(self, layer: str) -> torch.Tensor:
        """|W| per weight, or per filter / group channel the norm of all its (folded) rows."""
        if self.granularity == "filter":
            return unit_scores(self.graph, self.model, [layer], reduction="joint")[layer]
        return self.model.get_submodule(layer).weight.detach().abs()

    def final_masks(self) -> Masks:
        """Fold the gates, then prune each layer to its target exactly by (|W z|, log alpha)."""
        self.fold_gates()
        scores = {}
        for layer in self.targets:
            if layer in self._scores:
                scores[layer] = self._scores[layer]
            else:  # an ungated layer (zero target, or no gated training): plain magnitude
                scores[layer] = self._magnitude(layer)
        if self.granularity == "filter":
            return filter_masks(self.graph, self.model, self.targets, scores)
        return weight_masks(self.model, self.targets, scores)
