"""Physical removal of dead channels: turn a masked model into a smaller dense one.

Masked pruning only zeroes parameters, so a pruned model is as slow as the dense one. Compaction
deletes every *dead* channel (see `graph.py`: all its producers are zero, so it carries nothing
but zeros, and its consumers' matching inputs read zeros) and shrinks the tensors that touch it.
The surgery is Torch-Pruning's: its dependency graph already knows how a channel propagates
through BatchNorm, residual adds, concatenations and flattens, and slices BN running statistics,
so the result keeps the module classes and works in both eval and train mode.

The channels removed are exactly those `ChannelGraph.dead_channels` reports, the same definition
the `Accountant` uses; hence the compacted model's dense counts equal the masked model's
accounted counts whenever no unstructured zeros remain inside the kept weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..flops import count_dense
from ..graph import ChannelGraph, build_channel_graph


def compact(model: nn.Module, example: torch.Tensor,
            graph: ChannelGraph | None = None) -> nn.Module:
    """A deep copy of `model` with every dead channel removed; `model` itself is untouched.

    `graph` may be the channel graph of `model` (or of any model of the same architecture, since
    only parameter and module names are used); it is traced on the copy when omitted. A group
    whose channels are all dead keeps one (zero) channel: Torch-Pruning refuses to empty a layer,
    and a zero-width tensor would break the layers reading it.
    """
    import torch_pruning as tp

    out = copy.deepcopy(model)
    device = next(out.parameters()).device
    example = example[:1].to(device)
    was_training = out.training
    requires_grad = {n: p.requires_grad for n, p in out.named_parameters()}
    # Tracing needs autograd on every parameter, and eval mode so BN statistics stay put.
    out.eval()
    for p in out.parameters():
        p.requires_grad_(True)
    try:
        graph = graph or build_channel_graph(out, example)
        params = {n: p.detach() for n, p in out.named_parameters()}
        # Deadness is decided on the masked weights before any surgery: pruning one group never
        # renumbers another group's root channels, so these indices stay valid throughout.
        dead = graph.dead_channels(params)
        todo = [(g.root, dead[g.root].nonzero().flatten().tolist()) for g in graph.groups]
        todo = [(root, idxs) for root, idxs in todo if idxs]
        if todo:
            dg = tp.DependencyGraph().build_dependency(out, example_inputs=example,
                                                       verbose=False)
            for root, idxs in todo:
                module = out.get_submodule(root)
                if len(idxs) >= _out_channels(module):
                    idxs = idxs[1:]  # keep one all-zero channel rather than an empty layer
                if not idxs:
                    continue
                fn = (tp.prune_linear_out_channels if isinstance(module, nn.Linear)
                      else tp.prune_conv_out_channels)
                dg.get_pruning_group(module, fn, idxs=idxs).prune()
    finally:
        for n, p in out.named_parameters():
            p.requires_grad_(requires_grad.get(n, True))
        out.train(was_training)
    return out


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def compact_counts(model: nn.Module, example: torch.Tensor,
                   graph: ChannelGraph | None = None) -> tuple[int, int]:
    """(MACs, params) of the compacted model: what a deployment would actually run."""
    return count_dense(compact(model, example, graph), example)
