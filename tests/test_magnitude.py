"""Magnitude pruning: the AGP schedule, gradual mode's masking, and filter granularity.

Gradual runs use `lenet-digits` on the 8x8 digits (a second or so each) with a spy hook that
watches every step: the sparsity must only rise and reach the targets exactly on the ramp's last
step, pruned weights must get no gradient and no momentum between mask updates. Filter runs
check whole channels (bias, BatchNorm) die and that compaction reproduces the masked model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_digits_lenet
from torch import nn

from autoprune.data import TensorData, dataset_info
from autoprune.engine import Recipe, TrainHook, train
from autoprune.errors import UserError
from autoprune.flops import Accountant
from autoprune.graph import build_channel_graph
from autoprune.models import build_model
from autoprune.pruning import apply_masks, get_method
from autoprune.pruning.base import n_pruned
from autoprune.pruning.compaction import compact
from autoprune.pruning.magnitude import Magnitude, agp_sparsity
from autoprune.pruning.runner import prune_and_finetune

WEIGHT_TARGETS = {"conv1": 0.5, "conv2": 0.8, "fc1": 0.9, "fc2": 0.5}
FILTER_TARGETS = {"conv1": 0.5, "conv2": 0.25, "fc1": 0.5}  # the free layers of lenet-digits
FINETUNE = Recipe(epochs=1, lr=0.02, batch_size=64)


# -- the schedule ------------------------------------------------------------------------------
def test_agp_sparsity_hand_values() -> None:
    assert agp_sparsity(0.8, 0.0) == 0.0
    assert agp_sparsity(0.8, 0.5) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # 0.7
    assert agp_sparsity(0.8, 1.0) == pytest.approx(0.8)
    assert agp_sparsity(0.8, 1.7) == pytest.approx(0.8)  # held after the ramp
    assert agp_sparsity(0.8, -0.2) == 0.0
    assert agp_sparsity(0.0, 0.5) == 0.0
    # Rising, fastest at the start (cubic): each step of progress adds less than the one before.
    values = [agp_sparsity(0.9, t / 10) for t in range(11)]
    gains = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert all(g > 0 for g in gains) and all(a > b for a, b in zip(gains, gains[1:],
                                                                   strict=False))


# -- hyperparameters ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = build_model("lenet-digits", 10, 1, 8)
    return model, build_channel_graph(model, torch.randn(1, 1, 8, 8))


def test_filter_granularity_is_accepted_and_checked(tiny) -> None:
    model, graph = tiny
    assert Magnitude.parse_set(["granularity=filter", "norm=2"]) == {"granularity": "filter",
                                                                     "norm": 2}
    assert Magnitude(model, {}, graph, granularity="filter").granularity == "filter"
    with pytest.raises(UserError, match="norm"):
        Magnitude.parse_set(["norm=3"])
    with pytest.raises(UserError, match="fc2"):  # logits: not a free layer
        get_method("magnitude")(model, {"fc2": 0.5}, graph, granularity="filter")


def test_filter_norm_l1_and_l2_rank_differently(tiny) -> None:
    """Row 0 spreads small values (L1 large, L2 small), row 1 is one spike (the opposite)."""
    model, graph = tiny
    w = model.fc1.weight
    n_in = w.shape[1]  # 128
    with torch.no_grad():
        w.fill_(1.0)
        w[0].fill_(0.1)  # L1 12.8, L2 1.13
        w[1].zero_()
        w[1, 0] = 5.0  # L1 5, L2 5
    targets = {"fc1": 1 / w.shape[0]}  # exactly one filter
    assert 0.1 * n_in > 5.0 > 0.1 * n_in ** 0.5
    for norm, dropped in ((1, 1), (2, 0)):
        masks = Magnitude(model, targets, graph, granularity="filter", norm=norm).final_masks()
        rows = masks["fc1.weight"].eq(0).all(dim=1)
        assert rows.nonzero().flatten().tolist() == [dropped], norm
        assert masks["fc1.bias"][dropped] == 0 and int(masks["fc1.bias"].eq(0).sum()) == 1


# -- one-shot ----------------------------------------------------------------------------------
def test_one_shot_weight_keeps_largest(tiny) -> None:
    model, graph = tiny
    masks = Magnitude(model, WEIGHT_TARGETS, graph).final_masks()
    for layer, s in WEIGHT_TARGETS.items():
        w, m = model.get_submodule(layer).weight.detach(), masks[f"{layer}.weight"]
        assert int((m == 0).sum()) == n_pruned(w.numel(), s)
        assert float(w[m == 1].abs().min()) >= float(w[m == 0].abs().max())


def test_one_shot_filter_on_digits_compacts_exactly(digits, pretrained) -> None:
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    acct = Accountant(model, digits.example(), graph)
    res = prune_and_finetune(model, digits, graph, "magnitude", FILTER_TARGETS,
                             {"granularity": "filter"}, Recipe(), FINETUNE)
    assert [r["phase"] for r in res.history] == ["finetune"]  # one-shot: no prune phase
    _assert_dead_filters(model, FILTER_TARGETS)
    counts = acct.count(model)
    # conv2 loses 1/4 of its filters and half of its inputs (conv1's dead channels): 5/8.
    assert counts.layers["conv2"].sparsity == pytest.approx(1 - 0.75 * 0.5)
    small = compact(model, digits.example(), graph)
    assert small.conv1.out_channels == 8 and small.conv2.out_channels == 24
    with torch.no_grad():
        torch.testing.assert_close(small(digits.val_x), model(digits.val_x), rtol=0, atol=1e-5)
    assert res.history[-1]["val_accuracy"] > 0.8


def _conv_bn_net() -> nn.Module:
    """Two conv-BN-ReLU blocks and a classifier: BatchNorm channels in seconds, not a ResNet."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_one_shot_filter_kills_batchnorm_channels() -> None:
    model = _conv_bn_net()
    x = torch.randn(4, 3, 8, 8)
    model(x)  # BatchNorm statistics that are not the identity
    model.eval()
    graph = build_channel_graph(model, x)
    targets = {"0": 0.25, "3": 0.5}
    masks = Magnitude(model, targets, graph, granularity="filter", norm=2).final_masks()
    apply_masks(model, masks)
    _assert_dead_filters(model, targets)
    for conv, bn in (("0", "1"), ("3", "4")):
        dead = model.get_submodule(conv).weight.flatten(1).eq(0).all(dim=1)
        assert not model.get_submodule(bn).weight[dead].any()
        assert not model.get_submodule(bn).bias[dead].any()
    small = compact(model, x, graph)
    assert small[0].out_channels == 6 and small[3].out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)


# -- gradual (AGP) -----------------------------------------------------------------------------
class _Spy(TrainHook):
    """Runs after the pruner's hooks; records what each step did to the targeted weights."""

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        self.params = {name: model.get_submodule(name).weight for name in layers}
        self.zeros: list[dict[str, torch.Tensor]] = []
        self.grad_leaks = 0
        self.momentum_leaks = 0

    def on_train_start(self, model, optimizer, steps_per_epoch, epochs) -> None:
        self.optimizer = optimizer

    def before_step(self, model) -> None:
        for p in self.params.values():  # a weight pruned before this step gets no gradient
            self.grad_leaks += int(p.grad[p.detach() == 0].ne(0).sum())

    def after_step(self, model) -> None:
        self.zeros.append({n: p.detach() == 0 for n, p in self.params.items()})
        for p in self.params.values():
            buf = self.optimizer.state[p].get("momentum_buffer")
            if buf is not None:
                self.momentum_leaks += int(buf[p.detach() == 0].ne(0).sum())


@pytest.mark.parametrize("ramp", [0.6, 1.0])
def test_gradual_agp_masks_between_updates(digits, pretrained, ramp) -> None:
    sub = digits.subset(train=320)  # 5 steps per epoch at batch 64
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    pr = Magnitude(model, WEIGHT_TARGETS, graph, gradual=True, epochs=4.0, ramp=ramp,
                   frequency=3)
    spy = _Spy(model, list(WEIGHT_TARGETS))
    before = {n: p.detach().clone() for n, p in spy.params.items()}
    train(model, sub, Recipe(epochs=pr.prune_epochs, lr=0.05, batch_size=64, weight_decay=5e-4),
          hooks=[pr, spy])
    steps, ramp_steps = len(spy.zeros), round(20 * ramp)
    assert steps == 20
    assert spy.grad_leaks == 0 and spy.momentum_leaks == 0
    for layer, s in WEIGHT_TARGETS.items():
        counts = [int(z[layer].sum()) for z in spy.zeros]
        assert counts[0] == 0  # the first update (step 3) has not happened yet
        assert counts == sorted(counts) and len(set(counts)) > 3, layer  # rises in stages
        # On target exactly from the ramp's last step on, then the masks stay put.
        target = n_pruned(spy.params[layer].numel(), s)
        assert counts[ramp_steps - 1] == target and counts[-1] == target, layer
        for a, b in zip(spy.zeros, spy.zeros[1:], strict=False):
            assert not (a[layer] & ~b[layer]).any(), layer  # a pruned weight stays zero
    # The final masks are those in force at the end of the phase (no last-minute jump) ...
    masks = pr.final_masks()
    for layer in WEIGHT_TARGETS:
        assert torch.equal(masks[f"{layer}.weight"] == 0, spy.zeros[-1][layer])
        # ... and the survivors were trained, not frozen.
        kept = ~spy.zeros[-1][layer]
        assert not torch.equal(spy.params[layer].detach()[kept], before[layer][kept])


def test_gradual_filter_keeps_whole_channels_dead() -> None:
    model = _conv_bn_net()
    x, y = torch.randn(24, 3, 8, 8), torch.randint(0, 10, (24,))
    data = TensorData(dataset_info("cifar10"), x[:16], y[:16], x[16:], y[16:], x[16:], y[16:])
    graph = build_channel_graph(model, data.example())
    targets = {"0": 0.5, "3": 0.5}
    pr = Magnitude(model, targets, graph, granularity="filter", gradual=True, epochs=4.0,
                   ramp=1.0, frequency=2)
    dead_counts: list[int] = []

    class BnSpy(TrainHook):
        def after_step(self, model) -> None:
            dead = model[0].weight.flatten(1).eq(0).all(dim=1)
            assert not model[0].bias[dead].any()
            assert not model[1].weight[dead].any() and not model[1].bias[dead].any()
            dead_counts.append(int(dead.sum()))

    train(model, data, Recipe(epochs=4.0, lr=0.01, batch_size=4), hooks=[pr, BnSpy()])
    assert dead_counts == sorted(dead_counts) and dead_counts[0] == 0
    assert dead_counts[-1] == n_pruned(8, 0.5) and len(set(dead_counts)) > 2
    apply_masks(model, pr.final_masks())
    _assert_dead_filters(model, targets)
    model.eval()
    small = compact(model, x, graph)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)


def _assert_dead_filters(model: nn.Module, targets: dict[str, float]) -> None:
    for layer, s in targets.items():
        mod = model.get_submodule(layer)
        dead = mod.weight.detach().flatten(1).eq(0).all(dim=1)
        assert int(dead.sum()) == n_pruned(mod.weight.shape[0], s), layer
        assert mod.bias is None or not mod.bias[dead].any(), layer
