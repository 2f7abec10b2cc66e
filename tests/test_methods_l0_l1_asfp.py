"""L0 gates, multi-granularity adaptive L1 and (A)SFP: formulas by hand, hooks, end to end.

End-to-end runs use `lenet-digits` on the 8x8 digits (about a second each): targets must be
met exactly per layer, pruned weights must still be exactly zero after masked fine-tuning, and
the structured methods must leave dead channels that the `Accountant` sees as saved FLOPs.
A random-init ResNet-20 on a handful of random images checks that adaptive L1 drops the
filters of layers coupled by a residual add jointly, as whole channels of the residual stream.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fresh_digits_lenet
from torch import nn
from torch.nn.utils import parametrize

from autoprune.data import TensorData, dataset_info
from autoprune.engine import Recipe, TrainHook, train
from autoprune.errors import UserError
from autoprune.flops import Accountant
from autoprune.graph import build_channel_graph
from autoprune.models import build_model
from autoprune.pruning import get_method
from autoprune.pruning.adaptive_l1 import (
    AdaptiveL1,
    adaptive_coefficients,
    allocate,
    group_norms,
)
from autoprune.pruning.asfp import ASFP, asfp_rate, zero_filters
from autoprune.pruning.base import n_pruned
from autoprune.pruning.l0 import (
    L0,
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    deterministic_gate,
    hard_concrete_sample,
    init_log_alpha,
    prob_nonzero,
    rank_lexicographic,
)
from autoprune.pruning.runner import prune_and_finetune

WEIGHT_TARGETS = {"conv1": 0.5, "conv2": 0.8, "fc1": 0.9, "fc2": 0.5}
FILTER_TARGETS = {"conv1": 0.5, "conv2": 0.25, "fc1": 0.5}  # the free layers of lenet-digits
PRUNE = Recipe(lr=0.05, batch_size=64)  # epochs are set by the runner to prune_epochs
FINETUNE = Recipe(epochs=1, lr=0.02, batch_size=64)
# lenet-digits MACs: conv1 16*9*64, conv2 32*16*9*16, fc1 128*64, fc2 64*10. With FILTER_TARGETS
# conv1 keeps 1/2, conv2 keeps 3/4 of its filters reading 1/2 of its inputs, fc1 keeps 1/2 of
# its rows reading 3/4 of its inputs, fc2 reads 1/2 of its inputs.
FILTER_FLOPS_FRAC = (9216 * 0.5 + 73728 * 0.75 * 0.5 + 8192 * 0.5 * 0.75 + 640 * 0.5) / 91776


# -- L0: pure formulas ------------------------------------------------------------------------
def test_hard_concrete_formulas_hand_values() -> None:
    # P(z != 0) at log alpha = 0 is sigmoid(beta * log(zeta / -gamma)) = sigmoid(2/3 * log 11).
    assert 2 / 3 * math.log(11) == pytest.approx(1.598597, abs=1e-6)
    p = prob_nonzero(torch.tensor([0.0, 1.0]))
    assert torch.allclose(p, torch.tensor([0.831822, 0.930771]), atol=1e-6)
    # Deterministic gate: sigmoid(la) * 1.2 - 0.1, clipped to [0, 1].
    la = torch.tensor([0.0, math.log(3), LOG_ALPHA_MAX, LOG_ALPHA_MIN])
    assert torch.allclose(deterministic_gate(la), torch.tensor([0.5, 0.8, 1.0, 0.0]))
    # Sample with given u: logit(u) shifts log alpha; u = 0.3 gives sigmoid(log(3/7) * 1.5).
    z = hard_concrete_sample(torch.tensor([0.0, 0.0, 0.0, math.log(3)]),
                             torch.tensor([0.5, 0.9, 0.3, 0.25]))
    assert torch.allclose(z, torch.tensor([0.5, 1.0, 0.162921, 0.5]), atol=1e-5)
    assert init_log_alpha(0.5) == 0.0 and init_log_alpha(0.2) == pytest.approx(math.log(4))


def test_hard_concrete_nonzero_frequency_matches_prob_nonzero() -> None:
    torch.manual_seed(0)
    la = torch.tensor([-2.0, 0.0, 0.7])
    z = hard_concrete_sample(la.expand(200_000, 3))
    freq = (z > 0).float().mean(0)
    assert torch.allclose(freq, prob_nonzero(la), atol=5e-3)
    assert float((z == 1).float().mean()) > 0.05  # exact ones occur too: a *hard* concrete


def test_rank_lexicographic_orders_by_primary_then_secondary() -> None:
    primary = torch.tensor([0.0, 1.0, 0.0, 0.5, 1.0])
    secondary = torch.tensor([3.0, 0.2, -1.0, 9.0, 0.1])
    assert torch.equal(rank_lexicographic(primary, secondary),
                       torch.tensor([1.0, 4.0, 0.0, 2.0, 3.0]))


# -- L0: hooks on a tiny model ----------------------------------------------------------------
@pytest.fixture()
def tiny() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = build_model("lenet-digits", 10, 1, 8)
    return model, build_channel_graph(model, torch.randn(1, 1, 8, 8))


def test_l0_gates_installed_penalised_clamped_and_folded(tiny) -> None:
    model, graph = tiny
    w0 = model.fc1.weight
    w0_values = w0.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)
    pr = L0(model, {"conv2": 0.5, "fc1": 0.9, "fc2": 0.0}, graph, lam=0.3, init_drop=0.2)
    pr.on_train_start(model, opt, 10, 1.0)
    assert set(pr.log_alpha) == {"conv2", "fc1"}  # a zero target gets no gates
    assert parametrize.is_parametrized(model.fc1, "weight")
    assert model.fc1.parametrizations.weight.original is w0  # the optimiser's Parameter
    la = pr.log_alpha["fc1"]
    assert la.shape == w0.shape
    assert float(la.detach().mean()) == pytest.approx(math.log(4), abs=5e-3)
    assert float(la.detach().std()) == pytest.approx(0.01, rel=0.1)
    # The gates have their own Adam at gate_lr; the weights' optimiser never sees them.
    assert pr.gate_optimizer is not None
    group = pr.gate_optimizer.param_groups[0]
    assert [id(q) for q in group["params"]] == [id(q) for q in pr.log_alpha.values()]
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.0
    in_opt = {id(q) for g in opt.param_groups for q in g["params"]}
    assert not in_opt & {id(q) for q in pr.log_alpha.values()}
    assert not {id(q) for q in model.parameters()} & {id(q) for q in pr.log_alpha.values()}
    # Eval mode: the forward sees W * deterministic gate.
    model.eval()
    assert torch.allclose(model.fc1.weight, w0_values * deterministic_gate(la.detach()))
    model.train()
    # Penalty: lam * sum_j P(z_j != 0) / M, M = gated weights (conv2 and fc1).
    m = model.conv2.parametrizations.weight.original.numel() + w0.numel()
    expected = 0.3 * float(prob_nonzero(pr.log_alpha["conv2"].detach()).sum()
                           + prob_nonzero(la.detach()).sum()) / m
    pen = pr.penalty(model)
    assert float(pen.detach()) == pytest.approx(expected, rel=1e-5)
    pen.backward()
    p = prob_nonzero(la.detach())
    assert torch.allclose(la.grad, 0.3 / m * p * (1 - p))
    # after_step: one Adam step of the gates (each moves by about gate_lr), then the clamp.
    la_before = la.detach().clone()
    pr.after_step(model)
    assert la.grad is None  # the gates' optimiser clears its own gradients
    assert torch.allclose(la.detach(), la_before - 0.05, atol=1e-3)  # first Adam step: lr*sign
    with torch.no_grad():
        la[0, 0], la[0, 1] = 50.0, -50.0
    pr.after_step(model)
    assert float(la[0, 0].detach()) == pytest.approx(LOG_ALPHA_MAX)
    assert float(la[0, 1].detach()) == pytest.approx(LOG_ALPHA_MIN)
    # Folding: plain module again, same Parameter, W * z in it.
    z = deterministic_gate(la.detach())
    masks = pr.final_masks()
    assert not parametrize.is_parametrized(model.fc1)
    assert type(model.fc1) is nn.Linear and model.fc1.weight is w0
    assert torch.allclose(model.fc1.weight, w0_values * z)
    assert model.fc1.weight[0, 1] == 0 and masks["fc1.weight"][0, 1] == 0  # closed gate pruned
    assert int((masks["fc1.weight"] == 0).sum()) == n_pruned(w0.numel(), 0.9)
    assert "fc2.weight" in masks and bool(masks["fc2.weight"].all())
    assert {n for n, _ in model.named_parameters()} == {
        f"{layer}.{k}" for layer in ("conv1", "conv2", "fc1", "fc2") for k in ("weight", "bias")}


def test_l0_rejects_filter_gates_on_output_layer(tiny) -> None:
    model, graph = tiny
    with pytest.raises(UserError, match="fc2"):
        get_method("l0")(model, {"fc2": 0.5}, graph, granularity="filter")
    with pytest.raises(UserError):
        get_method("l0")(model, {}, graph, granularity="kernel")
    with pytest.raises(UserError):
        get_method("l0")(model, {}, graph, lam=100.0)


# -- adaptive L1: pure formulas ---------------------------------------------------------------
def test_adaptive_coefficients_hand_values() -> None:
    c = adaptive_coefficients(torch.tensor([1.0, 2.0, 3.0, 0.0]), lam0=0.1)
    # mean 1.5; lam0 * 1.5 / norm, the zero group floored at 0.01 * mean.
    assert torch.allclose(c, torch.tensor([0.15, 0.075, 0.05, 10.0]))
    assert torch.equal(adaptive_coefficients(torch.zeros(3), 0.2), torch.full((3,), 0.2))


def test_group_norms_per_level() -> None:
    w = torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2)
    assert torch.allclose(group_norms(w, "filter"), w.flatten(1).norm(dim=1))
    assert group_norms(w, "kernel").shape == (2, 3)
    assert float(group_norms(w, "kernel")[1, 2]) == pytest.approx(
        math.sqrt(20**2 + 21**2 + 22**2 + 23**2))
    # Stripe W[o, c, :, k] is a kernel column: W[0, 0, :, 1] = (1, 3).
    assert group_norms(w, "stripe").shape == (2, 3, 2)
    assert float(group_norms(w, "stripe")[0, 0, 1]) == pytest.approx(math.sqrt(10))


def test_allocate_coarse_to_fine_hand_example() -> None:
    # 4 filters x 2 channels x 1 x 2 = 16 weights; target 0.75 removes 12.
    w = torch.tensor([[[[0.1, 0.1]], [[0.1, 0.1]]],   # weakest filter
                      [[[5.0, 5.0]], [[0.2, 0.3]]],   # one weak kernel
                      [[[4.0, 0.01]], [[3.0, 3.0]]],  # weak single weight
                      [[[2.0, 2.0]], [[2.0, 2.0]]]])
    shares = {"filter": 0.5, "kernel": 0.5, "stripe": 0.5}
    keep, dropped = allocate(w, 0.75, True, ("filter", "kernel", "stripe", "weight"), shares)
    assert int((keep == 0).sum()) == 12
    # Filters: budget 6 -> one whole filter (4 weights), the lowest-norm one.
    assert dropped.tolist() == [True, False, False, False]
    # Kernels: budget int(0.5 * 8) = 4 -> two kernels of 2: W[1, 1] and then W[3, 0] or W[3, 1].
    assert not keep[1, 1].any() and keep[1, 0].all()
    # Stripes (kh = 1: single weights here): budget 2; then single weights finish the count.
    assert keep[2, 0, 0, 1] == 0  # 0.01, the smallest weight left
    # Not free: no filter-level step, and every filter keeps its largest weight.
    keep, dropped = allocate(w, 0.75, False, ("filter", "kernel", "stripe", "weight"), shares)
    assert int((keep == 0).sum()) == 12 and not dropped.any()
    assert keep.flatten(1).sum(1).min() >= 1
    # The same on a channels_last weight (what the engine makes of convs on CUDA).
    keep_cl, _ = allocate(w.to(memory_format=torch.channels_last), 0.75, False,
                          ("filter", "kernel", "stripe", "weight"), shares)
    assert torch.equal(keep_cl, keep)
    # Only single weights: plain magnitude pruning.
    keep, dropped = allocate(w, 5 / 16, True, ("weight",), shares)
    assert int((keep == 0).sum()) == 5 and keep[0].sum() == 0 and keep[2, 0, 0, 1] == 0
    assert not dropped.any()  # an emptied filter is not a filter-level drop


def test_adaptive_l1_penalty_and_epoch_recompute(tiny) -> None:
    model, graph = tiny
    pr = AdaptiveL1(model, {"conv2": 0.5, "fc2": 0.5}, graph, lam0=1e-3)
    pr.on_train_start(model, torch.optim.SGD(model.parameters(), lr=0.1), 10, 1.0)
    # conv2 is free (all levels); fc2 is the logits layer: no filter level, and no kernels.
    assert set(pr.coef) == {("conv2", "filter"), ("conv2", "kernel"), ("conv2", "stripe"),
                            ("conv2", "weight"), ("fc2", "weight")}
    expected = 0.0
    for (layer, level), coef in pr.coef.items():
        norms = group_norms(model.get_submodule(layer).weight.detach(), level)
        mean = norms.mean()  # coefficient of a (near-)zero weight capped by the 1 % floor
        assert torch.allclose(coef, 1e-3 * mean / norms.clamp_min(0.01 * mean))
        expected += float((coef * norms).sum())
    assert float(pr.penalty(model).detach()) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        model.conv2.weight[0].mul_(0.1)  # a filter shrinks: its coefficient grows
    before = pr.coef[("conv2", "filter")][0].clone()
    pr.on_epoch_end(0, model)
    assert float(pr.coef[("conv2", "filter")][0]) > 9 * float(before)
    with pytest.raises(UserError):
        AdaptiveL1(model, {}, graph, levels="weight,filter")  # not coarse to fine


# -- ASFP: pure formulas ----------------------------------------------------------------------
def test_asfp_rate_reproduces_methods_md_example() -> None:
    rates = [asfp_rate(0.3, t, 200) for t in (0, 25, 50, 100)]
    assert rates == pytest.approx([0.0, 0.225, 0.28125, 0.3 * (1 - 4.0 ** -4)])
    assert [round(r, 3) for r in rates] == [0.0, 0.225, 0.281, 0.299]
    assert asfp_rate(0.3, 200, 200) == 0.3 and asfp_rate(0.3, 250, 200) == 0.3


def test_zero_filters_lowest_norm_exact() -> None:
    w = torch.tensor([[3.0, 0.0], [0.1, 0.1], [-2.0, 2.0], [0.0, 0.5]])
    keep = zero_filters(w, 0.5)
    assert keep.tolist() == [True, False, True, False]
    assert not w[1].any() and not w[3].any() and w[0, 0] == 3.0
    w = torch.tensor([[3.0, 0.0], [1.0, -1.0], [1.5, 0.0]])
    assert zero_filters(w.clone(), 1 / 3, p=1).tolist() == [True, True, False]  # L1: 3, 2, 1.5
    assert zero_filters(w.clone(), 1 / 3, p=2).tolist() == [True, False, True]  # L2: 1.41 < 1.5


# -- end to end on digits ---------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [
    ("l0", {"epochs": 1.0}),
    ("l0", {"epochs": 1.0, "init_drop": 0.1, "lam": 5.0}),
    ("adaptive_l1", {"epochs": 1.0, "lam0": 1e-3}),
    ("adaptive_l1", {"epochs": 1.0, "levels": "kernel,weight"}),
])
def test_weight_targets_exact_and_zeros_stay(digits, pretrained, method, params) -> None:
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    res = prune_and_finetune(model, digits, graph, method, WEIGHT_TARGETS, params,
                             PRUNE, FINETUNE)
    assert [r["phase"] for r in res.history] == ["prune", "finetune"]
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for layer, s in WEIGHT_TARGETS.items():
        w = model.get_submodule(layer).weight
        mask = res.masks[f"{layer}.weight"]
        assert int((mask == 0).sum()) == n_pruned(w.numel(), s), layer
        assert not w[mask == 0].any()  # still zero after fine-tuning
    assert res.history[-1]["val_accuracy"] > 0.5


def test_adaptive_l1_drops_filters_of_free_layers_as_dead_channels(digits, pretrained) -> None:
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    res = prune_and_finetune(model, digits, graph, "adaptive_l1", WEIGHT_TARGETS,
                             {"epochs": 0.5}, PRUNE, FINETUNE)
    dead = graph.dead_channels(dict(model.named_parameters()))
    for layer in ("conv1", "conv2", "fc1"):  # filter_share 0.5 of the target -> whole filters
        w = model.get_submodule(layer).weight
        k = n_pruned(w.numel(), WEIGHT_TARGETS[layer])
        # ... plus any filter the finer levels emptied: it dies with its bias as well
        assert int(dead[layer].sum()) >= int(0.5 * k) // w[0].numel(), layer
        assert torch.equal(dead[layer], res.masks[f"{layer}.weight"].flatten(1).eq(0).all(1))
        assert not model.get_submodule(layer).bias[dead[layer]].any()
    assert res.masks["fc2.weight"].flatten(1).sum(1).min() >= 1  # logits keep every row


@pytest.mark.parametrize("method,params", [
    ("asfp", {"epochs": 2.0}),
    ("asfp", {"epochs": 1.0, "asymptotic": False, "norm": 1}),
    ("l0", {"epochs": 1.0, "granularity": "filter"}),
    ("adaptive_l1", {"epochs": 1.0, "granularity": "filter"}),
])
def test_filter_methods_leave_dead_channels(digits, pretrained, method, params) -> None:
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    acct = Accountant(model, digits.example(), graph)
    res = prune_and_finetune(model, digits, graph, method, FILTER_TARGETS, params,
                             PRUNE, FINETUNE)
    assert res.pruner.granularity == "filter"
    dead = graph.dead_channels(dict(model.named_parameters()))
    for layer, s in FILTER_TARGETS.items():
        mod = model.get_submodule(layer)
        assert int(dead[layer].sum()) == n_pruned(mod.weight.shape[0], s), layer
        masked = res.masks[f"{layer}.weight"].flatten(1).eq(0).all(1)
        assert torch.equal(masked, dead[layer])  # exactly the masked filters, bias included
    # Dead channels also remove the next layer's inputs: at most the mask-implied FLOPs remain.
    assert acct.count(model).flops_frac <= FILTER_FLOPS_FRAC + 1e-9
    assert FILTER_FLOPS_FRAC == pytest.approx(0.3884, abs=1e-4)
    assert res.history[-1]["val_accuracy"] > 0.5


def test_adaptive_l1_filter_phase_shrinks_weak_channels_harder(digits, pretrained) -> None:
    """The structured part's penalty acts, and adaptively: against the same training with a
    negligible lambda_0, channels weaker than the median (dense norms) shrink more than strong
    ones. An inert phase would leave both ratios at 1."""
    targets = {"conv1": 0.5, "conv2": 0.5, "fc1": 0.5}
    dense = {n: group_norms(pretrained[f"{n}.weight"], "filter") for n in targets}
    after = {}
    for lam0 in (1e-6, 1e-2):
        torch.manual_seed(1)
        model = fresh_digits_lenet(pretrained)
        graph = build_channel_graph(model, digits.example())
        pr = AdaptiveL1(model, targets, graph, granularity="filter", lam0=lam0, epochs=2.0)
        train(model, digits, Recipe(epochs=2, lr=0.05, batch_size=64), hooks=[pr])
        after[lam0] = {n: group_norms(model.get_submodule(n).weight.detach(), "filter")
                       for n in targets}
    for n in targets:
        ratio = after[1e-2][n] / after[1e-6][n]
        weak = dense[n] < dense[n].median()
        assert float(ratio[weak].mean()) < 0.95, n
        assert float(ratio[weak].mean()) < float(ratio[~weak].mean()) - 0.02, n


class _ZeroSpy(TrainHook):
    """Records after every step which filters of `layer` are zero (placed before or after ASFP)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.weight = model.get_submodule(layer).weight
        self.zero: list[torch.Tensor] = []

    def after_step(self, model: nn.Module) -> None:
        self.zero.append(self.weight.detach().flatten(1).eq(0).all(1).clone())


def test_asfp_schedule_and_regrowth(digits, pretrained) -> None:
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    # min_events=4 on a 4-epoch phase: the paper's rhythm, one soft prune per epoch.
    pr = ASFP(model, {"conv2": 0.5, "fc1": 0.5}, graph, epochs=4.0, min_events=4)
    before, after = _ZeroSpy(model, "fc1"), _ZeroSpy(model, "fc1")
    train(model, digits, Recipe(epochs=4, lr=0.05, batch_size=64), hooks=[before, pr, after])
    spe = len(after.zero) // 4
    ends = [spe * t - 1 for t in range(1, 5)]  # the last step of each epoch: a soft prune
    # Zeroed filters at the end of epoch t follow the asymptotic rate exactly.
    counts = [int(after.zero[i].sum()) for i in ends]
    assert counts == [n_pruned(64, asfp_rate(0.5, t, 4)) for t in range(1, 5)]
    assert counts[-1] > counts[0] > 0
    # No gradient masking: filters zeroed at one epoch's end are nonzero before the next prune.
    regrown = sum(int((after.zero[a] & ~before.zero[b]).sum())
                  for a, b in zip(ends[:-1], ends[1:], strict=True))
    assert regrown > 0
    # The end of the phase sits at the final rate, and the hard prune picks exactly those.
    zero_now = model.fc1.weight.detach().flatten(1).eq(0).all(1)
    assert int(zero_now.sum()) == 32
    masks = pr.final_masks()
    assert torch.equal(masks["fc1.weight"].flatten(1).eq(0).all(1), zero_now)
    assert torch.equal(masks["fc1.bias"].eq(0), zero_now)


# -- ResNet-20: coupled layers drop filters jointly, per residual stream ----------------------
def test_resnet20_adaptive_l1_drops_filters_of_every_unit() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32)
    x = torch.randn(24, 3, 32, 32)
    y = torch.randint(0, 10, (24,))
    data = TensorData(dataset_info("cifar10"), x[:16], y[:16], x[16:], y[16:], x[16:], y[16:])
    graph = build_channel_graph(model, data.example())
    targets = {name: 0.6 for name in graph.layers}
    res = prune_and_finetune(model, data, graph, "adaptive_l1", targets,
                             {"epochs": 1.0, "filter_share": 1.0},
                             Recipe(lr=0.01, batch_size=16), Recipe(epochs=1, lr=0.01,
                                                                    batch_size=16))
    free = set(graph.free_layers())
    coupled = [n for n in graph.layers if graph.group_of[n].coupled]
    assert "layer1.0.conv2" in coupled and "layer1.0.conv1" in free
    for name in graph.layers:
        w = model.get_submodule(name).weight
        mask = res.masks[f"{name}.weight"]
        assert int((mask == 0).sum()) == n_pruned(w.numel(), 0.6), name
        empty = mask.flatten(1).eq(0).all(1)
        if name != graph.output_layer:  # free and coupled layers (filter_share 1): filters go
            assert empty.any(), name
        else:  # the logits layer: every output keeps a weight
            assert not empty.any(), name
    dead = graph.dead_channels(dict(model.named_parameters()))
    assert all(dead[graph.group_of[n].root].any() for n in coupled)  # the streams shrink
    bn = model.get_submodule("layer1.0.bn1")
    d = dead[graph.group_of["layer1.0.conv1"].root]
    assert d.any() and not bn.weight[d].any() and not bn.bias[d].any()
