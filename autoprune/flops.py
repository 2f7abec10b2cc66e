"""Parameters and FLOPs of a model, dense and mask-aware, per layer and in total.

Convention (that of the pruning papers): **FLOPs are multiply-accumulates (MACs)** of convolution
and linear layers, i.e. half of what `torch.utils.flop_counter` reports; BatchNorm, activations,
pooling and residual adds are not counted. ResNet-56 on CIFAR-10 is about 125 M MACs, LeNet-5
(Caffe) 2.29 M. Dense per-module counts come from `FlopCounterMode`, never from a hand table.

Mask-aware: a pruned weight is a weight equal to zero. A conv/linear layer's MACs scale with the
fraction of its weights that are still effective, where a weight stops being effective when it is
zero or when it reads or writes a *dead channel* (see `graph.py`). So zeroing whole filters also
removes the matching input channels of the following layers, exactly as compaction would. Params
are counted the same way: all parameters, minus zeros in prunable weights, minus the biases and
BatchNorm entries of dead channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .graph import ChannelGraph, build_channel_graph


@dataclass(frozen=True)
class LayerCount:
    """One prunable layer's counts under the current weights."""

    name: str
    dense_macs: int
    macs: float
    weights: int
    nonzero: int  # effective nonzero weights

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.weights if self.weights else 0.0


@dataclass(frozen=True)
class Counts:
    """Totals of a model, with the dense reference they are measured against."""

    macs: float  # MACs of nonzero weights (the papers' sparse count)
    params: int  # nonzero parameters, biases and BatchNorm included
    dense_macs: int
    dense_params: int
    layers: dict[str, LayerCount]
    compact_macs: float = 0.0  # MACs once dead channels are removed (what dense hardware runs)
    compact_params: int = 0  # parameters of that compacted model

    @property
    def flops_frac(self) -> float:
        return self.macs / self.dense_macs

    @property
    def sparse_flops_frac(self) -> float:
        """MACs of nonzero weights / dense MACs: the ADMM and multi-granularity papers' FLOPs."""
        return self.macs / self.dense_macs

    @property
    def compact_flops_frac(self) -> float:
        """MACs of the compacted model / dense MACs: Torch-Pruning's, NNI's and NNCF's FLOPs."""
        return self.compact_macs / self.dense_macs

    @property
    def weights_frac(self) -> float:
        """Nonzero conv/linear weights / all of them (the ADMM paper's 71.2x is 1/0.01405)."""
        return (sum(lc.nonzero for lc in self.layers.values())
                / sum(lc.weights for lc in self.layers.values()))

    def fractions(self) -> dict[str, float]:
        """The four kept fractions, keyed as budget kinds are (see `budget.KEYS`)."""
        return {"flops": self.compact_flops_frac, "sparse_flops": self.sparse_flops_frac,
                "params": self.params_frac, "weights": self.weights_frac}

    @property
    def params_frac(self) -> float:
        return self.params / self.dense_params

    @property
    def weight_compression(self) -> float:
        """Dense prunable weights / nonzero prunable weights (the ADMM paper's '71x')."""
        nz = sum(lc.nonzero for lc in self.layers.values())
        return sum(lc.weights for lc in self.layers.values()) / max(nz, 1)

    def layer_sparsity(self) -> dict[str, float]:
        return {n: round(lc.sparsity, 6) for n, lc in self.layers.items()}


def module_macs(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], int]:
    """Dense MACs per module name, and the model total, from one forward pass."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    per_module: dict[str, int] = {}
    total = 0
    for key, ops in counter.get_flop_counts().items():
        flops = int(sum(ops.values()))
        if key == "Global":
            total = flops // 2
        elif "." in key:  # "ClassName.sub.module" -> "sub.module"
            per_module[key.split(".", 1)[1]] = flops // 2
    return per_module, total


class Accountant:
    """Counts a model of one architecture, traced once, against its dense reference.

    Build it from the dense model; `count(model)` then measures any pruned copy of the same
    architecture (masked, not compacted) in a few tensor ops, which the budget projection and
    every trial rely on.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor,
                 graph: ChannelGraph | None = None) -> None:
        example = example[:1].to(next(model.parameters()).device)
        self.graph = graph or build_channel_graph(model, example)
        per_module, total = module_macs(model, example)
        self.layer_macs = {n: per_module.get(n, 0) for n in self.graph.layers}
        # MACs outside conv/linear modules (e.g. attention matmuls) are counted but never pruned.
        self.fixed_macs = total - sum(self.layer_macs.values())
        self.dense_macs = total
        self.dense_params = sum(p.numel() for p in model.parameters())

    def count(self, model: nn.Module) -> Counts:
        params = {n: p.detach() for n, p in model.named_parameters()}
        eff = self.graph.effective_masks(params)
        layers = {}
        macs = float(self.fixed_macs)
        for name in self.graph.layers:
            mask = eff[f"{name}.weight"]
            nz, numel = int(mask.sum()), mask.numel()
            lm = self.layer_macs[name] * nz / numel
            macs += lm
            layers[name] = LayerCount(name, self.layer_macs[name], lm, numel, nz)
        n_params = sum(int(m.sum()) for m in eff.values())
        struct = self.graph.effective_masks(params, structural=True)
        c_macs = float(self.fixed_macs)  # summed in the order the projection predicts it
        for n in self.graph.layers:
            mask = struct[f"{n}.weight"]
            c_macs += self.layer_macs[n] * int(mask.sum()) / mask.numel()
        c_params = sum(int(m.sum()) for m in struct.values())
        return Counts(macs, n_params, self.dense_macs, self.dense_params, layers, c_macs,
                      c_params)


def count_dense(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) of a model as it is, e.g. a compacted one: no mask logic involved."""
    _, total = module_macs(model, example[:1])
    return total, sum(p.numel() for p in model.parameters())
