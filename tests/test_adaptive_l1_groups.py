"""Adaptive L1 on BatchNorm nets and residual groups (network slimming's BN-scale penalty).

A conv followed by BatchNorm is scale-invariant: BN undoes any shrink of the filter, so a group
L1 on the filter can fall without selecting anything. The filter level must therefore penalise
and rank the BN scale gamma. Filters emptied by the finer levels must die with their bias/BN so
the FLOPs count credits them, and residual streams drop channels jointly in every member.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.data import TensorData, dataset_info
from autoprune.engine import Recipe
from autoprune.flops import Accountant, count_dense
from autoprune.graph import build_channel_graph
from autoprune.models import build_model
from autoprune.pruning.adaptive_l1 import AdaptiveL1, bn_scales
from autoprune.pruning.base import apply_masks, n_pruned
from autoprune.pruning.compaction import compact
from autoprune.pruning.runner import prune_and_finetune

STREAM2 = "layer2.0.shortcut.0"


def _resnet20() -> tuple[nn.Module, torch.Tensor, object]:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32)
    x = torch.randn(24, 3, 32, 32)
    return model, x, build_channel_graph(model, x[:1])


def _start(pr: AdaptiveL1, model: nn.Module) -> None:
    pr.on_train_start(model, torch.optim.SGD(model.parameters(), lr=0.1), 10, 1.0)


def test_filter_penalty_is_on_the_bn_scale_not_the_scale_invariant_filter() -> None:
    model, _, g = _resnet20()
    with torch.no_grad():
        model.layer1[0].bn1.weight.uniform_(0.5, 1.5)
    pr = AdaptiveL1(model, {"layer1.0.conv1": 0.5}, g, levels="filter", lam0=1e-3)
    _start(pr, model)
    assert set(pr.coef) == {("layer1.0.conv1", "filter")}
    p0 = float(pr.penalty(model).detach())
    gamma = model.layer1[0].bn1.weight.detach()
    coef = pr.coef[("layer1.0.conv1", "filter")]
    assert p0 == pytest.approx(float((coef * gamma.abs()).sum()), rel=1e-6)
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(3.0)  # BN undoes this: the function is unchanged
    assert float(pr.penalty(model).detach()) == p0
    model.zero_grad()
    pr.penalty(model).backward()
    assert model.layer1[0].bn1.weight.grad.abs().sum() > 0
    assert model.layer1[0].conv1.weight.grad is None
    with torch.no_grad():
        model.layer1[0].bn1.weight.mul_(0.5)
    assert float(pr.penalty(model).detach()) < p0


def test_filter_level_drops_the_smallest_bn_scales() -> None:
    model, _, g = _resnet20()
    with torch.no_grad():  # filter norms rise with the channel, BN scales fall
        conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
        conv.weight.copy_(torch.linspace(0.1, 2.0, 16).view(16, 1, 1, 1) *
                          torch.ones_like(conv.weight))
        bn.weight.copy_(torch.linspace(2.0, 0.1, 16))
    # 0.25 of 16 x 144 weights = 576 = four whole filters at filter_share 1
    pr = AdaptiveL1(model, {"layer1.0.conv1": 0.25}, g, levels="filter,weight", filter_share=1.0)
    masks = pr.final_masks()
    dropped = masks["layer1.0.conv1.weight"].flatten(1).eq(0).all(1)
    assert dropped.nonzero().flatten().tolist() == [12, 13, 14, 15]  # lowest gamma, largest W
    assert masks["layer1.0.bn1.weight"][12:].eq(0).all()
    assert masks["layer1.0.bn1.bias"][12:].eq(0).all()


def test_filters_emptied_by_finer_levels_die_with_their_bias() -> None:
    torch.manual_seed(0)
    model = build_model("lenet-digits", 10, 1, 8)
    x = torch.randn(1, 1, 8, 8)
    g = build_channel_graph(model, x)
    acc = Accountant(model, x, g)
    with torch.no_grad():
        model.conv1.weight[:3].mul_(1e-4)  # three filters of tiny weights
        model.conv1.bias.fill_(0.1)
    # 27 of 144 weights: single-weight pruning empties exactly those three filters
    pr = AdaptiveL1(model, {"conv1": 27 / 144}, g, levels="weight")
    masks = pr.final_masks()
    assert masks["conv1.weight"].flatten(1)[:3].eq(0).all()
    assert masks["conv1.bias"].tolist() == [0.0] * 3 + [1.0] * 13
    apply_masks(model, masks)
    dead = g.dead_channels(dict(model.named_parameters()))["conv1"]
    assert dead.nonzero().flatten().tolist() == [0, 1, 2]
    # conv2 no longer reads those inputs: the count credits 3/16 of conv2's MACs too
    counts = acc.count(model)
    assert counts.layers["conv2"].sparsity == 3 / 16
    assert count_dense(compact(model, x, g), x)[0] == counts.macs


def test_bn_scales_of_a_residual_stream() -> None:
    model, _, g = _resnet20()
    gamma = bn_scales(g, model, STREAM2)
    assert gamma.shape == (32, 4)  # the shortcut's BN and three bn2s
    assert bn_scales(build_channel_graph(build_model("lenet-digits", 10, 1, 8),
                                         torch.randn(1, 1, 8, 8)),
                     build_model("lenet-digits", 10, 1, 8), "conv1") is None


def test_resnet20_coupled_channels_drop_jointly_and_compact_exactly() -> None:
    model, x, g = _resnet20()
    y = torch.randint(0, 10, (24,))
    data = TensorData(dataset_info("cifar10"), x[:16], y[:16], x[16:], y[16:], x[16:], y[16:])
    targets = {name: 0.6 for name in g.layers}
    res = prune_and_finetune(model, data, g, "adaptive_l1", targets,
                             {"epochs": 1.0, "filter_share": 1.0},
                             Recipe(lr=0.01, batch_size=16), Recipe(epochs=1, lr=0.01,
                                                                    batch_size=16))
    for name in g.layers:  # weight targets exact, coupled or not
        w = model.get_submodule(name).weight
        assert int((res.masks[f"{name}.weight"] == 0).sum()) == n_pruned(w.numel(), 0.6), name
    assert res.masks["fc.weight"].flatten(1).sum(1).min() >= 1  # the logits keep every row
    dead = g.dead_channels(dict(model.named_parameters()))
    members = g.unit(STREAM2).layers
    d = dead[STREAM2]
    assert d.any()  # the stream loses channels ...
    for name in members:  # ... in every member at once, BN included
        assert model.get_submodule(name).weight[d].eq(0).all(), name
    assert not model.layer2[2].bn2.weight[d].any() and not model.layer2[2].bn2.bias[d].any()
    model.eval()
    small = compact(model, x[:1], g).eval()
    assert small.layer2[1].conv2.out_channels == 32 - int(d.sum())
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)


# -- granularity "filter": the structured part alone, what a flops= budget needs -------------
def test_filter_granularity_penalises_and_ranks_only_channels() -> None:
    model, _, g = _resnet20()
    with torch.no_grad():  # as above: filter norms rise with the channel, BN scales fall
        model.layer1[0].conv1.weight.copy_(torch.linspace(0.1, 2.0, 16).view(16, 1, 1, 1) *
                                           torch.ones_like(model.layer1[0].conv1.weight))
        model.layer1[0].bn1.weight.copy_(torch.linspace(2.0, 0.1, 16))
    # Targets count channels: 0.25 of 16 = 4; every finer level and filter_share are ignored.
    pr = AdaptiveL1(model, {"layer1.0.conv1": 0.25, STREAM2: 0.5}, g, granularity="filter",
                    levels="filter,kernel,stripe,weight", filter_share=0.0)
    _start(pr, model)
    assert set(pr.coef) == {("layer1.0.conv1", "filter"), (STREAM2, "filter")}
    masks = pr.final_masks()
    dropped = masks["layer1.0.conv1.weight"].flatten(1).eq(0).all(1)
    assert dropped.nonzero().flatten().tolist() == [12, 13, 14, 15]  # lowest gamma
    assert masks["layer1.0.bn1.bias"][12:].eq(0).all()
    kept = masks["layer1.0.conv1.weight"].flatten(1)[:12]
    assert kept.eq(1).all()  # no weight inside a live channel is touched
    stream = masks[f"{STREAM2}.weight"].flatten(1).eq(0).all(1)
    assert int(stream.sum()) == 16  # half the residual stream's 32 channels ...
    for name in g.unit(STREAM2).layers:  # ... in every member at once
        assert torch.equal(masks[f"{name}.weight"].flatten(1).eq(0).all(1), stream), name


def test_filter_granularity_meets_channel_targets_and_compacts_a_resnet() -> None:
    model, x, g = _resnet20()
    y = torch.randint(0, 10, (24,))
    data = TensorData(dataset_info("cifar10"), x[:16], y[:16], x[16:], y[16:], x[16:], y[16:])
    acc = Accountant(model, x[:1], g)
    targets = {root: 0.5 for root in g.filter_units()}
    res = prune_and_finetune(model, data, g, "adaptive_l1", targets,
                             {"epochs": 1.0, "granularity": "filter", "lam0": 1e-2},
                             Recipe(lr=0.01, batch_size=16), Recipe(epochs=1, lr=0.01,
                                                                    batch_size=16))
    dead = g.dead_channels(dict(model.named_parameters()))
    for root in targets:
        assert int(dead[root].sum()) == n_pruned(g.unit(root).size, 0.5), root
    counts = acc.count(model)
    assert counts.compact_flops_frac < 0.4  # about a quarter of the MACs are left
    model.eval()
    small = compact(model, x[:1], g).eval()
    assert count_dense(small, x[:1])[0] == counts.compact_macs  # real on dense hardware
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)
    assert res.pruner.granularity == "filter"
