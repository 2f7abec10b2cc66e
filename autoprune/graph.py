"""Which parameters share a channel: the structure behind structured pruning and FLOPs accounting.

Torch-Pruning's dependency graph traces the model once and couples every output channel of a
conv/linear with everything that must shrink with it: its bias, the BatchNorm after it, layers
joined to it by a residual add or concatenation, and the input channels of the layers that read it
(through flattens and concats, with the index remapping those imply). We keep only that index
structure, as plain tensors, so mask-aware counting and compaction never re-trace the model.

A channel is *dead* when every parameter that produces it (the weight rows of all coupled
convs/linears, their biases, BN gamma and beta) is zero under the masks: only then does removing it
leave the network's function unchanged, which is exactly when compaction removes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

PRUNABLE_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear)


@dataclass(frozen=True)
class Slot:
    """One parameter slice tied to a group: `param[..., target_idx, ...]` along `dim`."""

    param: str
    dim: int
    target_idx: torch.Tensor  # indices along `dim`
    root_idx: torch.Tensor  # the group channel each target index belongs to


@dataclass(frozen=True)
class ChannelGroup:
    """The channels of one root layer and every slot coupled to them."""

    root: str
    size: int
    layers: tuple[str, ...]  # conv/linear layers whose output channels are in this group
    producers: tuple[Slot, ...]
    consumers: tuple[Slot, ...]
    removable: bool  # False for the logits layer: its outputs are the model's outputs

    @property
    def coupled(self) -> bool:
        """True when several layers' outputs are tied (residual add, concat)."""
        return len(self.layers) > 1


@dataclass
class ChannelGraph:
    """Prunable layers of a model and their channel groups, traced once."""

    layers: dict[str, nn.Module]  # name -> conv/linear, in forward order
    groups: list[ChannelGroup]
    output_layer: str | None
    group_of: dict[str, ChannelGroup] = field(default_factory=dict)  # layer -> its out group

    def __post_init__(self) -> None:
        for g in self.groups:
            for layer in g.layers:
                self.group_of[layer] = g

    def free_layers(self) -> list[str]:
        """Layers whose filters can be removed on their own (not coupled, not the logits)."""
        return [n for n, g in self.group_of.items() if g.removable and not g.coupled]

    def dead_channels(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per group root: a bool vector of channels whose producers are all zero."""
        out = {}
        for g in self.groups:
            alive = torch.zeros(g.size, dtype=torch.bool)
            for s in g.producers:
                p = params[s.param]
                dims = [d for d in range(p.dim()) if d != s.dim]
                nz = (p != 0).any(dim=dims) if dims else (p != 0)
                alive[s.root_idx] |= nz.cpu()[s.target_idx]
            out[g.root] = ~alive if g.removable else torch.zeros(g.size, dtype=torch.bool)
        return out

    def effective_masks(self, params: dict[str, torch.Tensor],
                        structural: bool = False) -> dict[str, torch.Tensor]:
        """Which entries of every parameter the pruned model still has (bool, on CPU).

        A zero in a prunable layer's weight is pruned; a zero elsewhere (a BatchNorm beta at
        initialisation, say) is just a value. Dead channels take their producers' slices and the
        consumers' matching inputs with them: that is what the compacted model no longer has.
        With `structural=True` only dead channels count as removed (zeros inside live channels
        are kept): exactly the entries of the physically compacted model.
        """
        weights = set() if structural else {f"{n}.weight" for n in self.layers}
        eff = {n: (p != 0).cpu() if n in weights else torch.ones(p.shape, dtype=torch.bool)
               for n, p in params.items()}
        dead = self.dead_channels(params)
        for g in self.groups:
            d = dead[g.root]
            if not bool(d.any()):
                continue
            for s in (*g.producers, *g.consumers):
                sel = s.target_idx[d[s.root_idx]]
                idx = [slice(None)] * eff[s.param].dim()
                idx[s.dim] = sel
                eff[s.param][tuple(idx)] = False
        return eff


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Conv/linear layers in the order a forward pass first runs them (last = the logits)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    seen: dict[str, None] = {}
    for n in order:
        seen.setdefault(n)
    return list(seen)


def build_channel_graph(model: nn.Module, example: torch.Tensor) -> ChannelGraph:
    """Trace `model` on `example` with Torch-Pruning and keep the channel coupling as indices."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        order = forward_order(model, example)
        names = {m: n for n, m in model.named_modules()}
        output_layer = order[-1] if order else None
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        groups = []
        seen_roots: set[str] = set()
        for grp in dg.get_all_groups(root_module_types=PRUNABLE_TYPES):
            producers, consumers, layers = [], [], []
            for item in grp.items:
                mod = item.dep.target.module
                name = names.get(mod)
                if name is None or not item.idxs:
                    continue
                handler = getattr(item.dep.handler, "__name__", "")
                tgt = torch.tensor([int(i) for i in item.idxs], dtype=torch.long)
                root = torch.tensor([int(r) for r in item.root_idxs], dtype=torch.long)
                is_out = handler == "prune_out_channels"
                if isinstance(mod, PRUNABLE_TYPES):
                    if is_out:
                        layers.append(name)
                        producers.append(Slot(f"{name}.weight", 0, tgt, root))
                        if mod.bias is not None:
                            producers.append(Slot(f"{name}.bias", 0, tgt, root))
                    else:
                        consumers.append(Slot(f"{name}.weight", 1, tgt, root))
                else:  # BatchNorm, LayerNorm, ...: per-channel affine parameters
                    for pname, p in mod.named_parameters(recurse=False):
                        if p.dim() == 1 and p.numel() > int(tgt.max()):
                            producers.append(Slot(f"{name}.{pname}", 0, tgt, root))
            if not layers:
                continue
            root_name = names[grp[0].dep.target.module]
            if root_name in seen_roots:
                continue
            seen_roots.add(root_name)
            size = int(max(int(s.root_idx.max()) for s in producers)) + 1
            groups.append(ChannelGroup(
                root=root_name, size=size, layers=tuple(dict.fromkeys(layers)),
                producers=tuple(producers), consumers=tuple(consumers),
                removable=output_layer not in layers))
        layers_map = {n: model.get_submodule(n) for n in order}
        return ChannelGraph(layers=layers_map, groups=groups, output_layer=output_layer)
    finally:
        model.train(was_training)
