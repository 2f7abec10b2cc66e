"""Filter pruning of residual-coupled channel groups: one mask per group, keyed by its root.

A ResNet's residual stream is written by a stage's shortcut conv and every block's last conv;
filter methods used to leave it at full width. Here each filter method is run on ResNet-20 at
flops=0.4 (projected on the group-aware cost table), and the residual groups must shrink after
compaction, alike in every member, with the compacted model computing what the masked one does
and meeting the budget. Random weights and a handful of random images keep it to seconds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.data import TensorData, dataset_info
from autoprune.engine import Recipe
from autoprune.errors import UserError
from autoprune.flops import Accountant, count_dense
from autoprune.graph import (
    build_channel_graph,
    gather_rows,
    group_scores,
    scatter_rows,
    unit_scores,
    unit_weight,
)
from autoprune.models import build_model
from autoprune.orchestration.projection import CostTable, fractions, project, size_prior
from autoprune.pruning import get_method
from autoprune.pruning.admm import ADMM
from autoprune.pruning.asfp import ASFP
from autoprune.pruning.base import filter_scores, n_pruned
from autoprune.pruning.compaction import compact
from autoprune.pruning.l0 import L0
from autoprune.pruning.runner import prune_and_finetune

STREAM2 = "layer2.0.shortcut.0"  # root of stage 2's residual stream
STREAM2_MEMBERS = {STREAM2, "layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32)
    x = torch.randn(24, 3, 32, 32)
    graph = build_channel_graph(model, x[:1])
    return model, x, graph


def _data(x: torch.Tensor) -> TensorData:
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    return TensorData(dataset_info("cifar10"), x[:16], y[:16], x[16:], y[16:], x[16:], y[16:])


def _fresh(model: nn.Module) -> nn.Module:
    out = build_model("resnet20", 10, 3, 32)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():  # BN with non-trivial statistics, so a wrongly kept channel shows
        gen = torch.Generator().manual_seed(2)
        for m in out.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
    return out


# -- the graph's group helpers --------------------------------------------------------------
def test_filter_units_are_group_roots(resnet) -> None:
    model, _, g = resnet
    units = g.filter_units()
    assert set(g.free_layers()) <= set(units)
    assert {"conv1", STREAM2, "layer3.0.shortcut.0"} <= set(units)  # the three streams
    assert "fc" not in units and "layer2.1.conv2" not in units
    assert set(g.unit(STREAM2).layers) == STREAM2_MEMBERS
    # Member rows: which group channel each output row of a member writes (identity here).
    assert torch.equal(g.member_rows(STREAM2, "layer2.2.conv2"), torch.arange(32))


def test_gather_scatter_and_group_scores(resnet) -> None:
    model, _, g = resnet
    weights = {n: model.get_submodule(n).weight.detach() for n in g.unit(STREAM2).layers}
    mat = gather_rows(g, STREAM2, weights)
    # 1x1 shortcut (16 inputs) + three 3x3 convs on 32 inputs, one row per channel
    assert mat.shape == (32, 16 + 3 * 32 * 9)
    back = scatter_rows(g, STREAM2, mat, weights)
    assert all(torch.equal(back[n], w) for n, w in weights.items())
    norms = torch.stack([filter_scores(w) for w in weights.values()])
    torch.testing.assert_close(group_scores(g, STREAM2, weights), norms.mean(0))
    torch.testing.assert_close(group_scores(g, STREAM2, weights, reduction="sum"), norms.sum(0))
    torch.testing.assert_close(group_scores(g, STREAM2, weights, reduction="joint"),
                               norms.pow(2).sum(0).sqrt())
    # An uncoupled layer: every reduction is its filter norm, and its unit weight is itself.
    w = model.layer2[1].conv1.weight
    for red in ("mean", "sum", "joint"):
        s = unit_scores(g, model, ["layer2.1.conv1"], reduction=red)["layer2.1.conv1"]
        torch.testing.assert_close(s, filter_scores(w))
    assert unit_weight(g, model, "layer2.1.conv1") is w
    assert unit_weight(g, model, STREAM2).shape == mat.shape


def test_filter_targets_name_group_roots(resnet) -> None:
    model, _, g = resnet
    with pytest.raises(UserError, match=f"layer2.1.conv2.*root layer {STREAM2}"):
        ADMM(model, {"layer2.1.conv2": 0.5}, g, granularity="filter")
    with pytest.raises(UserError, match="fc"):
        ASFP(model, {"fc": 0.5}, g)
    ASFP(model, {STREAM2: 0.5, "layer2.1.conv1": 0.5}, g)  # roots are fine
    # A zero target on a member or the logits means "leave it": accepted, and ignored.
    pr = ADMM(_fresh(model), {"layer2.1.conv2": 0.0, "fc": 0.0, STREAM2: 0.25}, g,
              granularity="filter")
    assert set(pr.targets) == {STREAM2}
    assert int(pr.final_masks()["layer2.1.bn2.weight"].eq(0).sum()) == 8


# -- every filter method shrinks the residual streams ----------------------------------------
FILTER_METHODS = [
    ("admm", {"admm_iters": 1, "epochs_per_iter": 1.0, "granularity": "filter"}),
    ("radmm", {"admm_iters": 1, "epochs_per_iter": 1.0, "granularity": "filter"}),
    ("l0", {"epochs": 1.0, "granularity": "filter"}),
    ("asfp", {"epochs": 1.0}),
]


@pytest.mark.parametrize("method,params", FILTER_METHODS)
def test_filter_method_prunes_residual_channels_at_flops_04(resnet, method, params) -> None:
    dense, x, g = resnet
    model = _fresh(dense)
    acc = Accountant(model, x[:1], g)
    table = CostTable.from_accountant(acc)
    targets = project(table, size_prior(table, list(g.layers), "filter"), {"flops": 0.4}, 1.0,
                      "filter")
    assert STREAM2 in targets and targets[STREAM2] > 0
    predicted = fractions(table, targets, "filter")
    res = prune_and_finetune(model, _data(x), g, method, targets, params,
                             Recipe(lr=0.01, batch_size=16),
                             Recipe(epochs=1, lr=0.01, batch_size=16))
    model.eval()
    small = compact(model, x[:1], g).eval()
    # The stage-2 stream lost exactly its target's channels, in every member alike.
    width = 32 - n_pruned(32, targets[STREAM2])
    assert width < 32
    for name in STREAM2_MEMBERS:
        assert small.get_submodule(name).out_channels == width, name
    assert small.layer2[1].bn2.num_features == width and small.layer3[0].conv1.in_channels == width
    assert int(res.masks["layer2.1.bn2.weight"].eq(0).sum()) == 32 - width
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)
    # The budget holds on the compacted model, and the projection predicted it exactly.
    macs, params_ = count_dense(small, x[:1])
    counts = acc.count(model)
    assert macs == counts.macs and params_ == counts.params
    assert macs / acc.dense_macs <= 0.4
    assert counts.flops_frac == predicted["flops"]


def test_admm_projects_a_group_jointly(resnet) -> None:
    dense, _, g = resnet
    model = _fresh(dense)
    pr = ADMM(model, {STREAM2: 0.5}, g, granularity="filter")
    pr.on_train_start(model, torch.optim.SGD(model.parameters(), lr=0.1), 10, 1.0)
    z = pr.Z[STREAM2]  # Z^0 = proj(W^0) over the rows of all four member convs
    kept = z.ne(0).any(dim=1)
    assert z.shape == (32, 16 + 3 * 288) and int(kept.sum()) == 16
    joint = unit_scores(g, model, [STREAM2], reduction="joint")[STREAM2]
    assert set(joint.topk(16).indices.tolist()) == set(kept.nonzero().flatten().tolist())
    pen = pr.penalty(model)
    assert pen is not None and float(pen.detach()) > 0


def test_asfp_soft_zeroes_the_same_channels_in_every_member(resnet) -> None:
    dense, _, g = resnet
    model = _fresh(dense)
    keep = ASFP(model, {STREAM2: 0.25}, g, asymptotic=False).soft_prune(0)[STREAM2]
    assert int((~keep).sum()) == 8
    for name in STREAM2_MEMBERS:
        zero = model.get_submodule(name).weight.flatten(1).eq(0).all(1)
        assert torch.equal(zero, ~keep), name
    assert model.layer2[1].bn2.weight[~keep].all()  # soft: BN untouched, the filter can regrow


def test_l0_group_gate_is_one_sample_shared_by_the_members(resnet) -> None:
    dense, _, g = resnet
    model = _fresh(dense)
    pr = L0(model, {STREAM2: 0.5}, g, granularity="filter")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pr.on_train_start(model, opt, 10, 1.0)
    assert pr.log_alpha[STREAM2].shape == (32,)
    model.train()
    gates = {n: model.get_submodule(n).parametrizations.weight[0].gate().flatten()
             for n in STREAM2_MEMBERS}
    first = gates[STREAM2]
    assert ((first > 0) & (first < 1)).any()  # a real sample, not all 0/1
    assert all(torch.equal(z, first) for z in gates.values())
    pr.after_step(model)  # the next step draws anew
    again = model.get_submodule(STREAM2).parametrizations.weight[0].gate().flatten()
    assert not torch.equal(again, first)
    # |g_j| of a group gate: the rows of all four members
    assert pr._group_size(STREAM2) == 16 + 3 * 288
    masks = pr.final_masks()
    dead = masks["layer2.0.shortcut.1.weight"].eq(0)
    assert int(dead.sum()) == 16
    for name in STREAM2_MEMBERS:
        assert torch.equal(masks[f"{name}.weight"].flatten(1).eq(0).all(1), dead), name


def test_method_get_by_name_accepts_roots(resnet) -> None:
    _, _, g = resnet
    model = _fresh(resnet[0])
    pr = get_method("asfp")(model, {"conv1": 0.5}, g)  # the stem conv roots stage 1's stream
    masks = pr.final_masks()
    assert {"layer1.2.conv2.weight", "layer1.0.bn2.bias", "bn1.weight"} <= set(masks)
