"""Compaction removes exactly the dead channels and leaves the network's function unchanged.

Each case zeroes whole channel groups (with `channel_masks`, so BN gamma/beta go too), gives the
BatchNorms random statistics and affine parameters (with the defaults, beta = 0 and mean = 0,
a wrongly kept or wrongly dropped channel could go unnoticed), compacts, and checks the outputs and
the counts against the masked model and the `Accountant`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.flops import Accountant, count_dense
from autoprune.graph import ChannelGraph
from autoprune.models import build_model
from autoprune.pruning.base import apply_masks, channel_masks
from autoprune.pruning.compaction import compact, compact_counts

SHAPES = {  # model -> (num_classes, in_channels, image_size)
    "resnet20": (10, 3, 32),
    "vgg16": (10, 3, 32),
    "lenet5": (10, 1, 28),
    "torchvision:resnet18": (10, 3, 64),
}


def _setup(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, Accountant]:
    torch.manual_seed(seed)
    classes, chans, size = SHAPES[name]
    model = build_model(name, classes, chans, size)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(3, chans, size, size)
    return model, x, Accountant(model, x)


def _zero_free_channels(model: nn.Module, graph: ChannelGraph, frac: float, seed: int,
                        layers: list[str] | None = None) -> dict[str, int]:
    """Zero a random `frac` of the filters of each free layer; returns removed count per layer."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    removed = {}
    for layer in layers or graph.free_layers():
        size = graph.group_of[layer].size
        keep = torch.ones(size, dtype=torch.bool)
        keep[torch.randperm(size, generator=gen)[: int(frac * size)]] = False
        apply_masks(model, channel_masks(graph, params, layer, keep))
        removed[layer] = int((~keep).sum())
    return removed


def _zero_unstructured(model: nn.Module, graph: ChannelGraph, frac: float, seed: int) -> None:
    """Zero a random `frac` of the entries of every prunable weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in graph.layers:
            w = model.get_submodule(layer).weight
            w.mul_((torch.rand(w.shape, generator=gen) >= frac).to(w.dtype))


def _prunable_zeros(model: nn.Module, graph: ChannelGraph) -> int:
    return sum(int((model.get_submodule(n).weight == 0).sum()) for n in graph.layers)


def _width(model: nn.Module, layer: str) -> int:
    m = model.get_submodule(layer)
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "lenet5"])
def test_compacted_matches_masked_outputs_and_counts(name: str) -> None:
    model, x, acc = _setup(name)
    g = acc.graph
    removed = _zero_free_channels(model, g, 0.4, seed=1)
    if name == "resnet20":
        # A residual group zeroed across all its producers (shortcut conv + three conv2s + BNs).
        keep = torch.ones(32, dtype=torch.bool)
        keep[[3, 7, 8, 20]] = False
        apply_masks(model, channel_masks(g, dict(model.named_parameters()), "layer2.0.conv2", keep))
    small = compact(model, x, g)

    assert type(small) is type(model)
    assert not small.training
    for layer, n in removed.items():
        assert _width(small, layer) == _width(model, layer) - n
    if name == "resnet20":
        for layer in g.group_of["layer2.0.conv2"].layers:  # the whole coupled group shrank
            assert _width(small, layer) == 28
        assert small.layer2[1].bn2.running_mean.shape == (28,)
    _assert_same_outputs(model, small, x)

    counts = acc.count(model)
    macs, params = count_dense(small, x)
    assert macs == counts.macs
    assert params == counts.params
    assert compact_counts(model, x) == (macs, params)
    assert macs < acc.dense_macs


@pytest.mark.parametrize("name", ["resnet20", "lenet5"])
def test_unstructured_zeros_stay_and_are_counted(name: str) -> None:
    model, x, acc = _setup(name)
    g = acc.graph
    _zero_free_channels(model, g, 0.3, seed=2)
    structured_macs = acc.count(model).macs
    _zero_unstructured(model, g, 0.3, seed=3)
    small = compact(model, x)  # graph traced on the copy this time
    _assert_same_outputs(model, small, x)

    counts = acc.count(model)
    macs, params = count_dense(small, x)
    # Compaction only removes channels: the dense MACs are those of the structured pruning,
    # the remaining zeros are still in the weights and the accountant discounts them.
    assert macs == structured_macs
    assert counts.macs < macs
    zeros = _prunable_zeros(small, g)
    assert zeros > 0
    assert params - zeros == counts.params


def test_partially_zeroed_coupled_group_is_kept() -> None:
    model, x, acc = _setup("resnet20")
    g = acc.graph
    params = dict(model.named_parameters())
    # Channel 5 of stage 2 zeroed in one block's conv2 + bn2 only: the shortcut and the other
    # blocks still write it, so it is alive.
    with torch.no_grad():
        params["layer2.1.conv2.weight"][5] = 0
        params["layer2.1.bn2.weight"][5] = 0
        params["layer2.1.bn2.bias"][5] = 0
        # A free filter zeroed without its BN: BN's beta still feeds the next conv, so alive.
        params["layer1.0.conv1.weight"][2] = 0
    assert not g.dead_channels(params)["layer2.0.shortcut.0"].any()
    small = compact(model, x, g)
    for layer in g.group_of["layer2.0.conv2"].layers:
        assert _width(small, layer) == 32
    assert _width(small, "layer1.0.conv1") == 16
    _assert_same_outputs(model, small, x)
    assert count_dense(small, x) == count_dense(model, x)


def test_train_mode_matches_and_original_untouched() -> None:
    model, x, acc = _setup("resnet20")
    _zero_free_channels(model, acc.graph, 0.5, seed=4)
    before = {n: p.clone() for n, p in model.named_parameters()}
    small = compact(model, x, acc.graph)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    # Train mode: BN uses batch statistics; a dead channel normalises to exactly zero, so the
    # outputs still agree, and the (sliced) running statistics update in step.
    model.train()
    small.train()
    xb = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(small(xb), model(xb), rtol=0, atol=1e-5)
    bn_small, bn_big = small.layer3[0].bn1, model.layer3[0].bn1
    alive = bn_big.weight != 0
    torch.testing.assert_close(bn_small.running_mean, bn_big.running_mean[alive])
    small(xb).square().mean().backward()
    assert small.layer3[0].conv1.weight.grad.shape == small.layer3[0].conv1.weight.shape


def test_fully_dead_group_keeps_one_channel() -> None:
    model, x, acc = _setup("lenet5")
    g = acc.graph
    apply_masks(model, channel_masks(g, dict(model.named_parameters()), "conv2",
                                     torch.zeros(50, dtype=torch.bool)))
    small = compact(model, x, g)
    assert _width(small, "conv2") == 1
    assert small.fc1.in_features == 16  # one channel x 4 x 4 after the flatten
    _assert_same_outputs(model, small, x)


def test_torchvision_resnet18_small_input() -> None:
    model, x, acc = _setup("torchvision:resnet18")
    g = acc.graph
    assert "layer2.1.conv1" in g.free_layers()
    removed = _zero_free_channels(model, g, 0.5, seed=5, layers=["layer2.1.conv1"])
    small = compact(model, x, g)
    assert _width(small, "layer2.1.conv1") == 128 - removed["layer2.1.conv1"]
    assert small.layer2[1].conv2.in_channels == 128 - removed["layer2.1.conv1"]
    _assert_same_outputs(model, small, x)
    assert count_dense(small, x) == (acc.count(model).macs, acc.count(model).params)


def test_fresh_model_params_equal_dense_count() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32)  # BN bias = 0 at initialisation
    x = torch.randn(1, 3, 32, 32)
    acc = Accountant(model, x)
    assert count_dense(compact(model, x), x)[1] == acc.count(model).params
