"""Parameter and FLOPs counts against the published figures, and exact mask-aware counting."""

from __future__ import annotations

import pytest
import torch

from autoprune.flops import Accountant, count_dense
from autoprune.models import build_model

PUBLISHED = [  # model, input, params, MACs (tolerance)
    ("lenet5", (1, 1, 28, 28), 431_080, 2.29e6, 0.005),
    ("resnet56", (1, 3, 32, 32), 0.85e6, 125e6, 0.02),
    ("vgg16", (1, 3, 32, 32), 14.7e6, 313e6, 0.01),
    ("torchvision:resnet18", (1, 3, 224, 224), 11.69e6, 1.81e9, 0.01),
    ("lenet300", (1, 1, 28, 28), 266_610, 266_200, 0.0),
]


@pytest.mark.parametrize("name,shape,params,macs,tol", PUBLISHED)
def test_counts_match_published_figures(name, shape, params, macs, tol):
    classes = 1000 if name.startswith("torchvision") else 10
    model = build_model(name, classes, shape[1], shape[2])
    got_macs, got_params = count_dense(model, torch.randn(shape))
    assert got_params == pytest.approx(params, rel=tol)
    assert got_macs == pytest.approx(macs, rel=tol)


def test_lenet5_exact_counts():
    model = build_model("lenet5")
    assert count_dense(model, torch.randn(1, 1, 28, 28)) == (2_293_000, 431_080)


def test_unstructured_mask_scales_layer_macs_exactly():
    model = build_model("lenet5")
    acc = Accountant(model, torch.randn(1, 1, 28, 28))
    with torch.no_grad():
        w = model.fc1.weight
        flat = w.view(-1)
        flat[: flat.numel() // 4] = 0  # 25 % of fc1's weights, scattered over rows
    c = acc.count(model)
    assert c.layers["fc1"].macs == pytest.approx(400_000 * 0.75)
    assert c.macs == pytest.approx(2_293_000 - 100_000)
    assert c.params == 431_080 - 100_000
    assert c.layer_sparsity()["fc1"] == pytest.approx(0.25)


def test_zeroed_filters_remove_next_layers_inputs():
    model = build_model("lenet5")
    acc = Accountant(model, torch.randn(1, 1, 28, 28))
    with torch.no_grad():
        model.conv1.weight[:5] = 0
        model.conv1.bias[:5] = 0  # 5 of 20 conv1 channels dead
        model.conv2.weight[:10] = 0
        model.conv2.bias[:10] = 0  # 10 of 50 conv2 channels dead
    c = acc.count(model)
    assert c.layers["conv1"].macs == pytest.approx(288_000 * 15 / 20)
    # conv2 keeps 40 filters reading 15 live input channels
    assert c.layers["conv2"].macs == pytest.approx(1_600_000 * (40 / 50) * (15 / 20))
    assert c.layers["fc1"].macs == pytest.approx(400_000 * 40 / 50)  # 16 inputs per channel
    dense_params = 431_080
    removed = 5 * 26 + 10 * (20 * 25 + 1) + 40 * 5 * 25 + 10 * 16 * 500
    assert c.params == dense_params - removed


def test_bias_keeps_a_zeroed_filter_alive():
    """A filter with zero weights but a nonzero bias still feeds a constant: not removable."""
    model = build_model("lenet5")
    acc = Accountant(model, torch.randn(1, 1, 28, 28))
    with torch.no_grad():
        model.conv1.weight[:5] = 0
        model.conv1.bias[:5] = 1.0
    c = acc.count(model)
    assert c.layers["conv2"].macs == pytest.approx(1_600_000)


def test_residual_coupled_channel_dies_only_when_all_producers_are_zero():
    model = build_model("resnet20", 10, 3, 32).eval()
    acc = Accountant(model, torch.randn(1, 3, 32, 32))
    group = acc.graph.group_of["layer1.0.conv2"]
    assert group.coupled and "conv1" in group.layers
    with torch.no_grad():
        model.layer1[0].conv2.weight[3] = 0  # one producer of channel 3 only
    before = acc.count(model)
    assert before.layers["layer1.1.conv1"].macs == pytest.approx(
        acc.layer_macs["layer1.1.conv1"])
    with torch.no_grad():
        for slot in group.producers:
            p = model.get_parameter(slot.param)
            p[slot.target_idx[slot.root_idx == 3]] = 0
    after = acc.count(model)
    assert after.layers["layer1.1.conv1"].macs == pytest.approx(
        acc.layer_macs["layer1.1.conv1"] * 15 / 16)


def _kill_channels(model, graph, root: str, idxs: list[int]) -> None:
    """Zero every producer of channels `idxs` of `root`'s group (filters, biases, BN)."""
    group = graph.group_of[root]
    with torch.no_grad():
        for slot in group.producers:
            p = model.get_parameter(slot.param)
            sel = slot.target_idx[torch.isin(slot.root_idx, torch.tensor(idxs))]
            idx = [slice(None)] * p.dim()
            idx[slot.dim] = sel
            p[tuple(idx)] = 0


@pytest.mark.parametrize("name,shape,kills", [
    ("lenet5", (1, 1, 28, 28), {"conv1": [0, 3, 7], "conv2": list(range(0, 50, 3)),
                                "fc1": list(range(0, 500, 4))}),
    ("resnet20", (1, 3, 32, 32), {"layer1.0.conv1": [1, 2, 5], "layer1.0.conv2": [0, 9],
                                  "layer2.0.conv2": [4, 5, 6, 30]}),
])
def test_compact_counts_equal_physical_compaction(name, shape, kills):
    """`flops=` budgets are judged on the compacted model: the counted fraction must be exact."""
    from autoprune.pruning.compaction import compact

    model = build_model(name, 10, shape[1], shape[-1]).eval()
    x = torch.randn(*shape)
    acc = Accountant(model, x)
    for root, idxs in kills.items():
        _kill_channels(model, acc.graph, root, idxs)
    with torch.no_grad():  # scattered zeros inside live channels: sparse, not compactable
        w = model.get_parameter(f"{acc.graph.output_layer}.weight")
        w.view(-1)[::3] = 0
    c = acc.count(model)
    macs, params = count_dense(compact(model, x, acc.graph), x)
    assert c.compact_macs == pytest.approx(macs)
    assert c.compact_params == params
    assert c.compact_flops_frac < 1.0
    assert c.sparse_flops_frac < c.compact_flops_frac  # the scattered zeros count only there
    fr = c.fractions()
    assert set(fr) == {"flops", "sparse_flops", "params", "weights"}
    assert fr["flops"] == pytest.approx(macs / acc.dense_macs)


def test_unstructured_zeros_leave_compact_flops_whole():
    model = build_model("lenet5")
    acc = Accountant(model, torch.randn(1, 1, 28, 28))
    with torch.no_grad():
        for m in (model.conv1, model.conv2, model.fc1, model.fc2):
            m.weight.view(-1)[::2] = 0  # half of every layer's weights, no channel emptied
    c = acc.count(model)
    assert c.compact_flops_frac == pytest.approx(1.0)
    assert c.sparse_flops_frac == pytest.approx(0.5, abs=0.01)
    assert c.weights_frac == pytest.approx(0.5, abs=0.01)
    assert c.params_frac > c.weights_frac  # biases are kept
