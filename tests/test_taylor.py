"""Group Taylor filter pruning: the score by hand, the BatchNorm case, data-driven choices."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_digits_lenet
from torch import nn

from autoprune.data import TensorData, dataset_info
from autoprune.engine import Recipe
from autoprune.graph import build_channel_graph
from autoprune.models import build_model
from autoprune.pruning import get_method
from autoprune.pruning.base import filter_scores, n_pruned
from autoprune.pruning.runner import calibration_batches, prune_and_finetune
from autoprune.pruning.taylor import channel_taylor

TARGETS = {"conv1": 0.5, "conv2": 0.25, "fc1": 0.5}


def test_channel_taylor_sums_g_times_w_over_the_producers():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    graph = build_channel_graph(model, torch.zeros(1, 2))
    params = dict(model.named_parameters())
    grads = {k: torch.full_like(v, 2.0) for k, v in params.items()}
    with torch.no_grad():
        params["0.weight"].copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]))
        params["0.bias"].copy_(torch.tensor([0.5, 0.0, -1.0]))
    got = channel_taylor(graph.group_of["0"], params, grads)
    # row sums of 2*w plus 2*b: (3 + 0.5) * 2, (-1 + 0) * 2, (3.5 - 1) * 2
    assert got.tolist() == pytest.approx([7.0, -2.0, 5.0])


def test_with_batchnorm_the_score_is_the_bn_gate_criterion():
    """In train mode the conv's own terms cancel: Taylor FO on BN (gamma, beta) remains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    graph = build_channel_graph(model, torch.zeros(1, 2, 6, 6))
    x, y = torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    got = channel_taylor(graph.group_of["0"], params, grads)
    bn = (grads["1.weight"] * params["1.weight"] + grads["1.bias"] * params["1.bias"]).detach()
    assert got.tolist() == pytest.approx(bn.tolist(), rel=1e-3)  # BN eps: not exact
    conv_only = (grads["0.weight"] * params["0.weight"]).flatten(1).sum(1)
    assert conv_only.abs().max() < 1e-3 * bn.abs().max()


def test_calibrate_scores_without_changing_the_network(digits, pretrained):
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    pruner = get_method("taylor")(model, TARGETS, graph, batches=3, rounds=1)
    with pytest.raises(RuntimeError, match="before calibrate"):
        pruner.final_masks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    pruner.calibrate(model, calibration_batches(digits, 64, 0))
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(model.get_parameter(k).grad is None for k in before if "weight" in k)
    for layer in TARGETS:
        s = pruner.scores[layer]
        assert s.shape == (model.get_submodule(layer).weight.shape[0],) and (s >= 0).all()
        assert s.max() > 0


def test_a_large_but_useless_filter_is_pruned_where_magnitude_keeps_it(digits, pretrained):
    """Data, not norms, decide: conv1's largest filter feeds nothing, so its Taylor score is 0."""
    model = fresh_digits_lenet(pretrained)
    with torch.no_grad():
        model.conv1.weight[0].mul_(50.0)
        model.conv2.weight[:, 0].zero_()  # nobody reads channel 0
    graph = build_channel_graph(model, digits.example())
    assert filter_scores(model.conv1.weight).argmax() == 0
    pruner = get_method("taylor")(model, {"conv1": 0.25}, graph, batches=4, rounds=1)
    pruner.calibrate(model, calibration_batches(digits, 64, 0))
    assert pruner.scores["conv1"][0] == 0.0
    masks = pruner.final_masks()
    assert not masks["conv1.weight"][0].any() and not masks["conv1.bias"][0]


def test_rounds_prune_in_steps_and_meet_the_targets(digits, pretrained):
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    res = prune_and_finetune(model, digits, graph, "taylor", TARGETS,
                             {"batches": 2, "rounds": 3}, Recipe(lr=0.05, batch_size=64),
                             Recipe(epochs=0))
    assert res.pruner.prune_epochs == 0 and res.history == []
    dead = graph.dead_channels(dict(model.named_parameters()))
    for layer, s in TARGETS.items():
        n = n_pruned(model.get_submodule(layer).weight.shape[0], s)
        assert int(dead[layer].sum()) == n, layer
        # the channels of the last intermediate step are among the final ones, and scored lowest
        early = res.pruner._dead[layer]
        assert 0 < int(early.sum()) < n and bool(dead[layer][early].all()), layer
        assert bool((res.pruner.scores[layer][early] == -1.0).all())


def test_resnet20_with_batchnorm_scores_and_keeps_running_stats() -> None:
    """On a BN network: targets met, dead channels include BN, running stats untouched."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32)
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    data = TensorData(dataset_info("cifar10"), x[:16], y[:16], x[16:], y[16:], x[16:], y[16:])
    graph = build_channel_graph(model, data.example())
    targets = dict.fromkeys(graph.free_layers(), 0.5)
    stats = {k: v.clone() for k, v in model.named_buffers()}
    pruner = get_method("taylor")(model, targets, graph, batches=2, rounds=2)
    pruner.calibrate(model, calibration_batches(data, 8, 0))
    assert all(torch.equal(stats[k], v) for k, v in model.named_buffers())
    masks = pruner.final_masks()
    for layer in targets:
        dropped = masks[f"{layer}.weight"].flatten(1).eq(0).all(1)
        assert int(dropped.sum()) == n_pruned(dropped.numel(), 0.5), layer
    dropped = masks["layer1.0.conv1.weight"].flatten(1).eq(0).all(1)
    assert not masks["layer1.0.bn1.weight"][dropped].any()  # the whole channel: BN too
    assert not masks["layer1.0.bn1.bias"][dropped].any()
