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

from collections.abc import Iterable, Mapping
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

    def weight_slots(self) -> tuple[Slot, ...]:
        """The member layers' weight slices (dim 0), in `layers` order."""
        names = {f"{n}.weight" for n in self.layers}
        return tuple(s for s in self.producers if s.param in names and s.dim == 0)

    @property
    def regular(self) -> bool:
        """True when every member layer writes each group channel with exactly one row.

        That holds for a single layer and for layers tied by residual adds; it is what joint
        filter pruning needs (one keep vector of `size` entries masks every member alike).
        """
        for s in self.weight_slots():
            if len(s.target_idx) != self.size or \
                    not torch.equal(torch.sort(s.root_idx).values, torch.arange(self.size)):
                return False
        return len(self.weight_slots()) == len(self.layers)


@dataclass
class ChannelGraph:
    """Prunable layers of a model and their channel groups, traced once."""

    layers: dict[str, nn.Module]  # name -> conv/linear, in forward order
    groups: list[ChannelGroup]
    output_layer: str | None
    group_of: dict[str, ChannelGroup] = field(default_factory=dict)  # layer -> its out group
    by_root: dict[str, ChannelGroup] = field(default_factory=dict)  # root layer -> its group
    _rows: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for g in self.groups:
            self.by_root[g.root] = g
            for layer in g.layers:
                self.group_of[layer] = g

    def free_layers(self) -> list[str]:
        """Layers whose filters can be removed on their own (not coupled, not the logits)."""
        return [n for n, g in self.group_of.items() if g.removable and not g.coupled]

    def filter_units(self) -> list[str]:
        """Roots of the channel groups filter pruning may shrink, in forward order of the root.

        A filter target is keyed by its group's root layer: for an uncoupled layer that is the
        layer itself (so these include `free_layers()`), for layers tied by residual adds one
        member stands for all of them and a single keep vector masks every member's rows,
        biases and BatchNorms (as SFP and Torch-Pruning's DepGraph prune such channels).
        The logits layer's group and irregular groups (a member writing a channel twice or not
        at all) are left out.
        """
        order = {n: i for i, n in enumerate(self.layers)}
        roots = [g.root for g in self.groups if g.removable and g.regular]
        return sorted(roots, key=lambda r: order.get(r, len(order)))

    def unit(self, root: str) -> ChannelGroup:
        """The channel group whose root layer is `root` (KeyError for a non-root)."""
        return self.by_root[root]

    def member_rows(self, root: str, layer: str) -> torch.Tensor:
        """For member `layer` of `root`'s group: the group channel of each of its output rows."""
        rows = self._rows.get((root, layer))
        if rows is None:
            slot = next(s for s in self.unit(root).weight_slots() if s.param == f"{layer}.weight")
            rows = torch.empty(len(slot.target_idx), dtype=torch.long)
            rows[slot.target_idx] = slot.root_idx
            self._rows[(root, layer)] = rows
        return rows

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


# -- joint filter pruning of a channel group: rows of every member layer, one vector --------
def gather_rows(graph: ChannelGraph, root: str,
                tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(size, D) matrix whose row c concatenates every member layer's row for channel c.

    `tensors` maps each member layer to a tensor of its weight's shape (the weight, W + U, a
    gate-folded weight...). For an uncoupled layer this is the weight flattened to rows, so a
    filter projection or prox written for one weight applies unchanged to a coupled group:
    the group's joint Euclidean projection is the projection of this matrix. Differentiable.
    """
    g = graph.unit(root)
    parts = []
    for layer in g.layers:
        t = tensors[layer]
        order = torch.argsort(graph.member_rows(root, layer)).to(t.device)
        parts.append(t.flatten(1)[order] if t.dim() > 1 else t[order].unsqueeze(1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def scatter_rows(graph: ChannelGraph, root: str, mat: torch.Tensor,
                 like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `gather_rows`: per member layer, a tensor shaped like `like[layer]`."""
    out, start = {}, 0
    for layer in graph.unit(root).layers:
        ref = like[layer]
        width = ref[0].numel() if ref.dim() > 1 else 1
        rows = graph.member_rows(root, layer).to(mat.device)
        out[layer] = mat[rows, start:start + width].reshape(ref.shape)
        start += width
    return out


def group_scores(graph: ChannelGraph, root: str, tensors: Mapping[str, torch.Tensor],
                 p: int = 2, reduction: str = "mean") -> torch.Tensor:
    """Importance of each channel of `root`'s group from its member layers' rows.

    Per member layer the Lp norm of the channel's row, then over the members: "mean" or "sum"
    (Torch-Pruning's group importance reductions) or "joint" (the Lp norm of all the rows
    together: what the group's Euclidean projection ranks by). For an uncoupled layer every
    reduction equals `filter_scores(weight, p)`.
    """
    if reduction == "joint":
        return gather_rows(graph, root, tensors).detach().norm(p=p, dim=1)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean, sum or joint, got {reduction!r}")
    total = None
    layers = graph.unit(root).layers
    for layer in layers:
        t = tensors[layer].detach()
        norms = (t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)).norm(p=p, dim=1)
        order = torch.argsort(graph.member_rows(root, layer)).to(t.device)
        total = norms[order] if total is None else total + norms[order]
    return total / len(layers) if reduction == "mean" else total


def unit_scores(graph: ChannelGraph, model: nn.Module, roots: Iterable[str], p: int = 2,
                reduction: str = "mean") -> dict[str, torch.Tensor]:
    """`group_scores` of the model's current weights for each root in `roots`."""
    out = {}
    for root in roots:
        layers = graph.unit(root).layers
        out[root] = group_scores(graph, root, {n: model.get_submodule(n).weight for n in layers},
                                 p, reduction)
    return out


def unit_weight(graph: ChannelGraph, model: nn.Module, root: str) -> torch.Tensor:
    """The weights of `root`'s group as one tensor with a row per channel.

    The root's own weight for an uncoupled layer (shape unchanged, no copy), else `gather_rows`
    of the members' weights (differentiable): filter-level maths on dim 0 then acts on the
    whole group at once.
    """
    layers = graph.unit(root).layers
    if len(layers) == 1:
        return model.get_submodule(layers[0]).weight
    return gather_rows(graph, root, {n: model.get_submodule(n).weight for n in layers})


@torch.no_grad()
def zero_unit_rows(graph: ChannelGraph, model: nn.Module, root: str, keep: torch.Tensor) -> None:
    """Zero (in place) the weight rows of channels `~keep` in every member of `root`'s group.

    Weights only: biases and BatchNorms stay, as soft filter pruning wants (see asfp.py).
    """
    for layer in graph.unit(root).layers:
        w = model.get_submodule(layer).weight
        row_keep = keep.to(w.device)[graph.member_rows(root, layer).to(w.device)]
        w.mul_(row_keep.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))


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
