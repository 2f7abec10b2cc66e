"""The `Pruner` interface, the method registry, and the masks every method ends with.

A method is one class in one file of this package: typed hyperparameters in a nested `Params`
dataclass (defaults from its paper, valid ranges and *search* ranges in field metadata, see
`hp`), optional hooks into the training loop (inherited from `TrainHook`), an optional
`calibrate(model, batches)` that sees training data before pruning (SNIP, Taylor, HRank), and
the one abstract method, `final_masks()`, which must meet the per-layer targets exactly.
Decorating it with `@register` is all it takes to make it usable by `prune` and `search`: the
built-in search spaces are generated from the declared search ranges (`search_space()`), and
`autoprune methods` shows its hyperparameters and its `differences` from the paper.

Targets are *sparsities*: for `granularity == "weight"` keyed by layer, the fraction of the
layer's weights removed; for `"filter"` keyed by a channel group's *root* layer (one of
`graph.filter_units()`), the fraction of the group's channels removed. For an uncoupled layer the
root is the layer itself; for layers tied by residual adds one keep vector masks the rows,
biases and BatchNorms of every member (`filter_masks`), scored jointly (`group_scores`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine import TrainHook
from ..errors import UserError
from ..graph import ChannelGraph
from .hparams import check_value, convert, hp, search_spec, stretch_lengths

Masks = dict[str, torch.Tensor]  # parameter name -> 0/1 float tensor of the parameter's shape

METHODS: dict[str, type[Pruner]] = {}


def register(cls: type[Pruner]) -> type[Pruner]:
    """Class decorator: make a method available under `cls.name`."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"pruning method '{cls.name}' registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Pruner]:
    from . import load_all

    load_all()
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method '{name}'; choose one of "
                        f"{', '.join(sorted(METHODS))}") from None


class Pruner(TrainHook, abc.ABC):
    """Base class of every pruning method: implement `final_masks`, override hooks as needed."""

    name: ClassVar[str] = ""
    # What the paper does that this implementation does not (shown by `autoprune methods`).
    differences: ClassVar[tuple[str, ...]] = ()
    # What the targets count when no `granularity` hyperparameter chooses it.
    fixed_granularity: ClassVar[str] = "weight"
    # Hand-tuned uses of the method that every search tries first (`orchestration.baselines`).
    baselines: ClassVar[tuple[dict[str, Any], ...]] = ()
    # Meaningless at filter granularity: flops= spaces don't sample them (`for_budget`).
    weight_only_params: ClassVar[tuple[str, ...]] = ()

    @dataclasses.dataclass
    class Params:
        epochs: float = hp(4.0, 0.0, 1000.0, doc="epochs of the method's own training phase",
                           length=True)

    def __init__(self, model: nn.Module, targets: dict[str, float], graph: ChannelGraph,
                 **params: Any) -> None:
        self.model = model
        self.graph = graph
        self.params = self.make_params(**params)
        self.targets = dict(targets)
        unknown = set(self.targets) - set(graph.layers)
        if unknown:
            raise UserError(f"targets name unknown layer(s): {', '.join(sorted(unknown))}")
        for layer, s in self.targets.items():
            if not 0.0 <= s < 1.0:
                raise UserError(f"target sparsity of {layer} must be in [0, 1), got {s}")
        if self.granularity == "filter":
            check_filter_targets(graph, self.targets)
            units = set(graph.filter_units())  # zero targets elsewhere mean nothing: drop them
            self.targets = {k: v for k, v in self.targets.items() if k in units}

    # -- what the runner needs -------------------------------------------------------------
    @property
    def granularity(self) -> str:
        """What the targets count: the `granularity` hyperparameter, or `fixed_granularity`."""
        return getattr(self.params, "granularity", self.fixed_granularity)

    @classmethod
    def granularities(cls) -> tuple[str, ...]:
        """Every granularity the method can prune at. Only 'filter' lowers the compacted model's
        FLOPs: a `flops=` budget keeps the methods offering it (`SearchSpace.for_budget`)."""
        f = {f.name: f for f in dataclasses.fields(cls.Params)}.get("granularity")
        return (cls.fixed_granularity,) if f is None else tuple(f.metadata.get("choices")
                                                                 or (f.default,))

    @property
    def prune_epochs(self) -> float:
        """Length of the method's own (regularised / scheduled) phase before fine-tuning."""
        return float(self.params.epochs)

    @classmethod
    def stretched(cls, params: dict[str, Any], factor: float) -> dict[str, Any]:
        """`params` with every hyperparameter declared a phase length (`hp(length=True)`)
        multiplied by `factor`, within its valid range: the same method run `factor` times
        as long (a finalist's schedule). Nothing else changes."""
        return stretch_lengths(cls.Params, params, factor)

    def calibrate(self, model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                  ) -> None:
        """Look at training data before pruning (default: nothing).

        The runner calls it once, before the method's own phase and before `final_masks`, with
        an endless iterator of shuffled training batches `(x, y)` on the model's device: a
        data-driven one-shot method (SNIP, Taylor, HRank) takes as many as it needs. Batches
        are drawn lazily, so a method that does not override this costs nothing.
        """

    @abc.abstractmethod
    def final_masks(self) -> Masks:
        """Masks meeting the targets exactly; called once after the method's phase."""

    # -- hyperparameters --------------------------------------------------------------------
    @classmethod
    def make_params(cls, **values: Any) -> Any:
        """Validated `Params`: unknown names and out-of-range values are `UserError`s."""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = set(values) - set(fields)
        if unknown:
            raise UserError(f"method '{cls.name}' has no hyperparameter(s) "
                            f"{', '.join(sorted(unknown))}; known: {', '.join(fields)}")
        for k, v in values.items():
            values[k] = check_value(cls.name, fields[k], v)
        return cls.Params(**values)

    @classmethod
    def parse_set(cls, items: list[str]) -> dict[str, Any]:
        """Parse CLI `--set key=value` items into typed hyperparameters."""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        out: dict[str, Any] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise UserError(f"--set expects key=value, got '{item}'")
            if key not in fields:
                raise UserError(f"method '{cls.name}' has no hyperparameter '{key}'; "
                                f"known: {', '.join(fields)}")
            out[key] = convert(cls.name, fields[key], raw.strip())
        cls.make_params(**out)
        return out

    @classmethod
    def search_space(cls) -> dict[str, dict[str, Any]]:
        """The declared search ranges, {hp: {low, high[, log]} | {choices: [...]}}.

        What the built-in spaces search for this method (`methods: declared`); every other
        hyperparameter stays at its paper default.
        """
        out = {}
        for f in dataclasses.fields(cls.Params):
            spec = search_spec(f)
            if spec is not None:
                out[f.name] = spec
        return out

    @classmethod
    def describe(cls) -> list[dict]:
        """Hyperparameters with defaults, valid and search ranges, for `methods` listings."""
        out = []
        for f in dataclasses.fields(cls.Params):
            d = {"name": f.name, "default": f.default}
            d.update({k: f.metadata[k] for k in ("low", "high", "choices", "doc")
                      if f.metadata.get(k) not in (None, "")})
            spec = search_spec(f)
            if spec is not None:
                d["search"] = spec
            if f.metadata.get("length"):
                d["length"] = True  # a phase length: finalists stretch it
            out.append(d)
        return out


# -- pure helpers every method uses ----------------------------------------------------------
def n_pruned(total: int, sparsity: float) -> int:
    """How many of `total` elements a sparsity removes: the one rounding rule of the project."""
    return min(total, max(0, int(round(sparsity * total))))


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask of `scores`' shape keeping exactly the largest `numel - n_pruned` entries."""
    flat = scores.detach().flatten()
    k = n_pruned(flat.numel(), sparsity)
    mask = torch.ones_like(flat)
    if k > 0:
        mask[torch.topk(flat, k, largest=False).indices] = 0.0
    return mask.view_as(scores)


def filter_scores(weight: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Lp norm of each output filter (dim 0)."""
    return weight.detach().flatten(1).norm(p=p, dim=1)


def check_filter_targets(graph: ChannelGraph, targets: dict[str, float]) -> None:
    """Filter targets must name group roots (`graph.filter_units()`); a clear error otherwise."""
    units = set(graph.filter_units())
    for layer in sorted(t for t, s in targets.items() if s > 0 and t not in units):
        g = graph.group_of.get(layer)
        if g is not None and g.removable and g.root in units:
            raise UserError(f"filter pruning: {layer} shares its channels with "
                            f"{', '.join(n for n in g.layers if n != layer)}; target the "
                            f"group by its root layer {g.root}")
        raise UserError(f"filter pruning cannot target the output layer or an irregular "
                        f"channel group: {layer}")


def channel_masks(graph: ChannelGraph, params: dict[str, torch.Tensor], layer: str,
                  keep: torch.Tensor) -> Masks:
    """Masks zeroing the output channels `~keep` of `layer` and everything producing them.

    Covers the weight rows, the bias and any BatchNorm entries of the layer's channel group, so
    the channel is dead in the sense of `graph.py` and compaction leaves the outputs unchanged.
    """
    group = graph.group_of[layer]
    masks: Masks = {}
    for s in group.producers:
        p = params[s.param]
        m = masks.get(s.param, torch.ones_like(p))
        drop = s.target_idx[~keep.cpu()[s.root_idx]].to(p.device)
        idx = [slice(None)] * p.dim()
        idx[s.dim] = drop
        m[tuple(idx)] = 0.0
        masks[s.param] = m
    return masks


def filter_masks(graph: ChannelGraph, model: nn.Module, targets: dict[str, float],
                 scores: dict[str, torch.Tensor]) -> Masks:
    """Per group root, drop exactly `n_pruned(size, target)` channels of lowest score.

    `targets` and `scores` are keyed by root (`graph.filter_units()`); `scores[root]` has one
    entry per group channel (`unit_scores`, `group_scores`). The dropped channels lose every
    member's weight rows, biases and BatchNorm entries: the whole group shrinks alike.
    """
    params = dict(model.named_parameters())
    masks: Masks = {}
    for layer, s in targets.items():
        keep = topk_mask(scores[layer], s).bool()
        masks.update(channel_masks(graph, params, layer, keep))
    return masks


def close_empty_channels(graph: ChannelGraph, params: dict[str, torch.Tensor],
                         masks: Masks) -> Masks:
    """`masks` plus the biases and BatchNorms of channels whose weight rows are all masked.

    A channel whose every producing weight row is pruned still emits a constant (its bias, or
    BN's beta - gamma * mean / std) unless those die too; masking them makes the channel dead,
    so compaction removes it and the FLOPs accountant credits its consumers' inputs.
    """
    out = dict(masks)
    for g in graph.groups:
        if not g.removable:
            continue
        alive = torch.zeros(g.size, dtype=torch.bool)
        for s in g.weight_slots():
            m = masks.get(s.param)
            if m is None:
                alive[:] = True
                break
            nz = (m != 0).flatten(1).any(dim=1).cpu() if m.dim() > 1 else (m != 0).cpu()
            alive[s.root_idx] |= nz[s.target_idx]
        if bool(alive.all()):
            continue
        for name, m in channel_masks(graph, params, g.root, alive).items():
            out[name] = out[name] * m if name in out else m
    return out


def weight_masks(model: nn.Module, targets: dict[str, float],
                 scores: dict[str, torch.Tensor] | None = None) -> Masks:
    """Per layer, keep exactly the highest-scoring weights (|w| by default)."""
    out: Masks = {}
    for layer, s in targets.items():
        w = model.get_submodule(layer).weight
        out[f"{layer}.weight"] = topk_mask(w.abs() if scores is None else scores[layer], s)
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    params = dict(model.named_parameters())
    for name, m in masks.items():
        params[name].mul_(m.to(params[name].device, params[name].dtype))


class MaskHook(TrainHook):
    """Masked fine-tuning: pruned weights stay exactly zero.

    Gradients are masked before the step and weights after it; optimiser state (momentum,
    Adam moments) is masked too, so weight decay or stale momentum can never revive a weight.
    """

    def __init__(self, masks: Masks) -> None:
        self.masks = masks
        self._pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, model, optimizer, steps_per_epoch, epochs) -> None:
        params = dict(model.named_parameters())
        self._pairs = [(params[n], m.to(params[n].device, params[n].dtype))
                       for n, m in self.masks.items()]
        self._optimizer = optimizer
        self.after_step(model)

    def before_step(self, model: nn.Module) -> None:
        for p, m in self._pairs:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for p, m in self._pairs:
            p.mul_(m)
            state = self._optimizer.state.get(p, {}) if self._optimizer else {}
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                buf = state.get(key)
                if buf is not None:
                    buf.mul_(m)
