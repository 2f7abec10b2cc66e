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
* The log alpha tensors have their own Adam optimiser (no weight decay) with learning rate
  ``gate_lr``, stepped by this hook right after the engine's step and following the engine's lr
  schedule (scaled by its current/initial lr); the recipe's optimiser and lr stay for the
  weights. Why not a group of the engine's optimiser: per-weight gate gradients are about 1e-6
  (lam / M per gate), so under SGD a gate lr would have to be ~1e3-1e5 times the weights' while
  under Adam (scale-free) ~1, and no single ``gate_lr`` could mean the same thing under both;
  and scaling gradients (the former ``gate_lr_mult``) does nothing under Adam. Adam is what the
  paper uses for gates and weights alike. The paper runs 200 epochs at lr 1e-3; a search gives
  a few epochs, hence the larger default (0.05 moves log alpha from 0 to the closing point
  -2.4 in about 50 steps when the penalty dominates). The gates are not registered as
  parameters of the model, so the engine's optimiser never sees them.
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
undecided (short phases, small `gate_lr`) it degrades to magnitude pruning of the test-time
network instead of ranking by gate noise.

Starting point: the paper trains from scratch with p = 0.5 (the default here). From a
pretrained network, p = 0.5 halves every weight at the start (E[z] = 0.5) and injects heavy
multiplicative noise; on digits p = 0.1 kept the pretrained function and ended clearly better,
so `init_drop` is worth searching low.

Differences from the paper: the gates' own Adam lr (``gate_lr``) is larger than the paper's
1e-3 for short phases; no EMA of the parameters; the gate-weighted L2 term is the recipe's plain
weight decay; one gate sample per mini-batch.
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
        self._log_alpha = (log_alpha,)  # a tuple: not a parameter of the model (own optimiser)
        self.weight_dim = weight_dim
        self.rows = rows
        self.shared = shared

    @property
    def log_alpha(self) -> nn.Parameter:
        return self._log_alpha[0]

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
    differences = (
        "the paper trains from scratch (200 epochs, Adam 1e-3 on MNIST); here gates are learnt "
        "for a few epochs on the pretrained dense net",
        "the paper keeps every group whose test-time gate is nonzero (no fixed target); here "
        "each layer meets its target exactly, ranked by |W z| then log alpha",
        "the paper's gate-weighted L2 term is replaced by the recipe's plain weight decay, and "
        "no parameter EMA is used for evaluation",
        "the reference code samples filter gates per example; here one sample per mini-batch",
        "Xie et al. 2019 could not be read: the per-weight variant is the Louizos machinery "
        "applied per weight",
    )

    @dataclasses.dataclass
    class Params:
        lam: float = hp(0.7, 1e-3, 10.0, doc="L0 strength per expected fraction of weights "
                                             "kept (0.7 = paper's 0.1/N on MNIST; log scale)",
                        search=(0.05, 5.0), log=True)
        init_drop: float = hp(0.5, 0.05, 0.95, doc="initial gate drop rate p: log alpha ~ "
                                                   "N(log((1-p)/p), 0.01)",
                              search=(0.05, 0.5))
        epochs: float = hp(4.0, 0.0, 1000.0, doc="epochs of gated training",
                           search=(1.0, 3.0), length=True)
        granularity: str = hp("weight", choices=("weight", "filter"),
                              doc="one gate per weight (Xie 2019) or per filter (Louizos 2018)",
                              search_choices=("weight", "filter"))
        gate_lr: float = hp(0.05, 1e-4, 1.0, doc="Adam lr of the gates' own optimiser (paper: "
                                                 "1e-3 over 200 epochs; log scale)",
                            search=(0.01, 0.3), log=True)

    def __init__(self, model: nn.Module, targets: dict[str, float], graph: ChannelGraph,
                 **params: Any) -> None:
        super().__init__(model, targets, graph, **params)
        self.log_alpha: dict[str, nn.Parameter] = {}
        self._gate_count = 1  # M, the number of gated weights (penalty normalisation)
        self._scores: dict[str, torch.Tensor] = {}  # rank scores, set when gates are folded
        self.gate_optimizer: torch.optim.Adam | None = None
        self._weight_optimizer: torch.optim.Optimizer | None = None
        self._shared: list[dict] = []  # per coupled filter group: the step's gate sample

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
        """Create the gates on the weights' device, install them, give them their own Adam."""
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
        self._weight_optimizer = optimizer
        self.gate_optimizer = None
        if self.log_alpha:
            self.gate_optimizer = torch.optim.Adam(list(self.log_alpha.values()), lr=p.gate_lr,
                                                   weight_decay=0.0)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """lam * sum_j P(z_j != 0) * |g_j| / M: lam times the expected kept fraction."""
        total = None
        for layer, la in self.log_alpha.items():
            term = prob_nonzero(la).sum() * self._group_size(layer)
            total = term if total is None else total + term
        return None if total is None else self.params.lam * total / self._gate_count

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Step the gates (lr following the engine's schedule), then clamp log alpha."""
        if self.gate_optimizer is not None:
            opt = self._weight_optimizer
            scale = opt.param_groups[0]["lr"] / opt.defaults["lr"] if opt is not None else 1.0
            for group in self.gate_optimizer.param_groups:
                group["lr"] = self.params.gate_lr * scale
            self.gate_optimizer.step()
            self.gate_optimizer.zero_grad(set_to_none=True)
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
