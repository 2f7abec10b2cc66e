"""ADMM and reweighted ADMM: the formulas against hand-computed values, then end to end.

End-to-end runs use `lenet-digits` on the 8x8 digits (a second or so each): the targets must be
met exactly after the prune phase, and pruned weights must still be exactly zero after masked
fine-tuning. Filter granularity is checked on whole filters, on the `Accountant`'s FLOPs, and on
a ResNet-20 where only the free (uncoupled) convs may be targeted.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import fresh_digits_lenet
from torch import nn

from autoprune.data import TensorData, dataset_info
from autoprune.engine import Recipe, TrainHook, cycle_progress, evaluate, train
from autoprune.errors import UserError
from autoprune.flops import Accountant
from autoprune.graph import build_channel_graph
from autoprune.models import build_model
from autoprune.pruning import apply_masks, get_method
from autoprune.pruning.admm import (
    ADMM,
    iteration_boundaries,
    project_filters,
    project_sparse,
    rho_at,
)
from autoprune.pruning.base import n_pruned
from autoprune.pruning.radmm import (
    ReweightedADMM,
    group_soft_threshold,
    reweight,
    reweighted_projection,
    soft_threshold,
)
from autoprune.pruning.runner import prune_and_finetune

WEIGHT_TARGETS = {"conv1": 0.5, "conv2": 0.8, "fc1": 0.9, "fc2": 0.5}
FILTER_TARGETS = {"conv1": 0.5, "conv2": 0.25, "fc1": 0.5}  # the free layers of lenet-digits
PRUNE = Recipe(lr=0.05, batch_size=64)  # epochs are set by the runner to prune_epochs
FINETUNE = Recipe(epochs=1, lr=0.02, batch_size=64)


# -- pure formulas ----------------------------------------------------------------------------
def test_project_sparse_is_the_euclidean_projection() -> None:
    v = torch.tensor([0.3, -1.2, 0.05, 0.9, -0.4, 2.0, -0.01])
    for sparsity in (0.0, 0.3, 0.5, 0.7, 0.99):
        k_zero = n_pruned(v.numel(), sparsity)
        z = project_sparse(v, sparsity)
        assert int((z == 0).sum()) == k_zero
        # Brute force over every support of the allowed size: the nearest point keeps v there.
        keep = v.numel() - k_zero
        best = min(float((v - v * _support(v.numel(), s)).pow(2).sum())
                   for s in itertools.combinations(range(v.numel()), keep))
        assert float((v - z).pow(2).sum()) == pytest.approx(best)
        # The kept entries are the unchanged largest-|v| ones.
        nz = z != 0
        assert torch.equal(z[nz], v[nz])
        if k_zero and keep:
            assert float(v[nz].abs().min()) >= float(v[~nz].abs().max())


def _support(n: int, idx: tuple[int, ...]) -> torch.Tensor:
    m = torch.zeros(n)
    m[list(idx)] = 1.0
    return m


def test_project_sparse_hand_values() -> None:
    v = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
    assert torch.equal(project_sparse(v, 0.5), torch.tensor([[0.0, -3.0], [0.0, 2.0]]))


def test_project_filters_keeps_largest_norm_filters() -> None:
    v = torch.zeros(4, 2, 1, 1)
    v[0, :, 0, 0] = torch.tensor([3.0, 4.0])   # norm 5
    v[1, :, 0, 0] = torch.tensor([1.0, 0.0])   # norm 1
    v[2, :, 0, 0] = torch.tensor([0.0, -2.0])  # norm 2
    v[3, :, 0, 0] = torch.tensor([6.0, 0.0])   # norm 6
    z = project_filters(v, 0.5)
    assert torch.equal(z[[0, 3]], v[[0, 3]])
    assert torch.equal(z[[1, 2]], torch.zeros(2, 2, 1, 1))
    # Also the projection onto "2 nonzero filters": no other pair of filters is closer.
    best = min(float((v - v * _support(4, s).view(-1, 1, 1, 1)).pow(2).sum())
               for s in itertools.combinations(range(4), 2))
    assert float((v - z).pow(2).sum()) == pytest.approx(best)
    # Works for linear weights too (2-D).
    w = torch.tensor([[1.0, 1.0], [0.1, 0.1], [2.0, 0.0]])
    assert torch.equal(project_filters(w, 1 / 3), torch.tensor([[1.0, 1.0], [0.0, 0.0],
                                                                [2.0, 0.0]]))


def test_soft_threshold_and_reweight_hand_values() -> None:
    v = torch.tensor([1.5, -0.2, -2.0, 0.3, 0.0])
    t = torch.tensor([0.5, 0.5, 1.0, 0.1, 0.2])
    assert torch.allclose(soft_threshold(v, t), torch.tensor([1.0, 0.0, -1.0, 0.2, 0.0]))
    assert torch.allclose(soft_threshold(v, 0.25), torch.tensor([1.25, 0.0, -1.75, 0.05, 0.0]))
    z = torch.tensor([0.0, -0.5, 2.0])
    assert torch.allclose(reweight(z, 1e-3), torch.tensor([1000.0, 1 / 0.501, 1 / 2.001]))


def test_group_soft_threshold_hand_values() -> None:
    v = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0]])  # norms 5, 1, 0
    z = group_soft_threshold(v, torch.tensor([1.0, 2.0, 1.0]))
    assert torch.allclose(z, torch.tensor([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]]))


def test_rho_schedule_multiplies_and_caps() -> None:
    assert rho_at(1e-4, 1.0, 1.0, 7) == 1e-4
    assert [rho_at(1e-3, 10.0, 0.5, k) for k in range(4)] == pytest.approx([1e-3, 1e-2, 0.1, 0.5])
    assert rho_at(0.3, 2.0, 0.1, 3) == 0.3  # a cap below the start never lowers rho


def test_iteration_boundaries_split_the_phase() -> None:
    assert iteration_boundaries(3, 15) == [5, 10, 15]
    assert iteration_boundaries(3, 14) == [5, 9, 14]  # near-equal shares, last = the phase's end
    assert iteration_boundaries(2, 3) == [2, 3]
    assert iteration_boundaries(4, 2) == [1, 2, 2, 2]  # too few steps: the rest end at the last


def test_cycle_progress_restarts() -> None:
    assert [cycle_progress(s, 4) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    got = [cycle_progress(s, 10, [4, 7]) for s in range(10)]
    assert got == pytest.approx([0, 0.25, 0.5, 0.75, 0, 1 / 3, 2 / 3, 0, 1 / 3, 2 / 3])
    assert cycle_progress(10, 10, [4, 7]) == 1.0


# Phases whose float step count rounds differently from the old per-iteration boundaries
# (e.g. 3 x 0.3 epochs x 15 steps: the engine runs 13 steps, the old last boundary was 14),
# and one with fewer steps than iterations.
AWKWARD = [(3, 0.3, 15), (3, 0.15, 30), (5, 0.1, 29), (5, 0.45, 26), (3, 1.1, 25), (10, 0.05, 3)]


@pytest.mark.parametrize("iters,epochs_per_iter,steps_per_epoch", AWKWARD)
def test_number_of_zu_updates_is_admm_iters(tiny, iters, epochs_per_iter,
                                            steps_per_epoch) -> None:
    model, graph = tiny
    pr = ADMM(model, {"fc1": 0.5}, graph, admm_iters=iters, epochs_per_iter=epochs_per_iter)
    epochs = pr.prune_epochs  # what the runner gives the engine
    steps = max(1, int(round(epochs * steps_per_epoch)))  # the engine's own count
    pr.on_train_start(model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch, epochs)
    for _ in range(steps):
        pr.after_step(model)
    assert pr.iteration == iters


def test_zu_updates_and_lr_restarts_in_the_engine(digits, pretrained) -> None:
    """Through `train`: 3 iterations x 0.3 epochs x 15 steps (13 steps in all) make 3 Z/U
    updates, and every iteration's W-step starts the cosine schedule at the recipe's lr."""
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    pr = ADMM(model, {"fc1": 0.5}, graph, admm_iters=3, epochs_per_iter=0.3)
    spy = _LrSpy(pr)
    recipe = Recipe(epochs=pr.prune_epochs, lr=0.05, batch_size=1, schedule="cosine")
    train(model, digits.subset(train=15), recipe, hooks=[pr, spy])
    assert len(spy.lrs) == 13 and pr.iteration == 3
    starts = [i for i, k in enumerate(spy.iteration) if i == 0 or k != spy.iteration[i - 1]]
    assert len(starts) == 3
    for a, b in zip(starts, [*starts[1:], len(spy.lrs)], strict=True):
        cycle = spy.lrs[a:b]
        assert cycle[0] == pytest.approx(0.05)  # restarted, not a slice of one long decay
        assert all(x > y for x, y in itertools.pairwise(cycle))  # cosine within each


class _LrSpy(TrainHook):
    """Records the learning rate of every step and the ADMM iteration it belongs to."""

    def __init__(self, pruner: ADMM) -> None:
        self.pruner, self.lrs, self.iteration = pruner, [], []

    def on_train_start(self, model, optimizer, steps_per_epoch, epochs) -> None:
        self.optimizer = optimizer

    def before_step(self, model) -> None:
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.iteration.append(self.pruner.iteration)


# -- hooks on a tiny model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = build_model("lenet-digits", 10, 1, 8)
    return model, build_channel_graph(model, torch.randn(1, 1, 8, 8))


def test_penalty_matches_hand_computation(tiny) -> None:
    model, graph = tiny
    pr = ADMM(model, {"conv2": 0.5, "fc1": 0.9, "fc2": 0.0}, graph, rho=0.03)
    pr.on_train_start(model, torch.optim.SGD(model.parameters(), lr=0.1), 10, 1.0)
    assert set(pr.Z) == {"conv2", "fc1"}  # a zero target is no constraint
    # Z^0 is the projection of W^0, U^0 = 0.
    assert torch.equal(pr.Z["fc1"], project_sparse(model.fc1.weight.detach(), 0.9))
    assert not pr.U["fc1"].any()
    gen = torch.Generator().manual_seed(1)
    for layer in pr.Z:
        pr.U[layer] = torch.randn(pr.U[layer].shape, generator=gen)
    expected = 0.0
    for layer in ("conv2", "fc1"):
        w = model.get_submodule(layer).weight.detach().double()
        d = w - pr.Z[layer].double() + pr.U[layer].double()
        expected += 0.03 / 2 * float((d * d).sum())
    pen = pr.penalty(model)
    assert float(pen.detach()) == pytest.approx(expected, rel=1e-5)
    # Its gradient reaches W only: rho * (W - Z + U).
    model.zero_grad()
    pen.backward()
    g = 0.03 * (model.fc1.weight.detach() - pr.Z["fc1"] + pr.U["fc1"])
    assert torch.allclose(model.fc1.weight.grad, g, atol=1e-7)
    assert model.fc1.bias.grad is None or not model.fc1.bias.grad.any()


def test_admm_update_formulas_and_rho_growth(tiny) -> None:
    model, graph = tiny
    pr = ADMM(model, {"fc1": 0.75}, graph, rho=1e-3, rho_mult=10.0, rho_max=5e-2, admm_iters=3)
    pr.on_train_start(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, 3.0)
    u_old = torch.randn_like(pr.U["fc1"])
    pr.U["fc1"] = u_old.clone()
    w = model.fc1.weight.detach().clone()
    pr.after_step(model)  # step 1 of 2 per iteration: nothing happens
    assert pr.iteration == 0 and torch.equal(pr.U["fc1"], u_old)
    pr.after_step(model)  # end of iteration 1
    z = project_sparse(w + u_old, 0.75)
    assert torch.equal(pr.Z["fc1"], z)
    # U += W - Z, then rescaled by rho_old / rho_new because rho grew 10x.
    assert torch.allclose(pr.U["fc1"], (u_old + w - z) * 0.1)
    assert pr.rho == pytest.approx(1e-2)
    pr.after_step(model)
    pr.after_step(model)
    assert pr.iteration == 2 and pr.rho == pytest.approx(5e-2)  # capped
    for _ in range(10):
        pr.after_step(model)
    assert pr.iteration == 3  # no updates past admm_iters


def test_radmm_z_step_is_reweighted_soft_threshold(tiny) -> None:
    model, graph = tiny
    pr = ReweightedADMM(model, {"fc1": 0.8}, graph, rho=1e-2, eps=0.5, admm_iters=2)
    w = model.fc1.weight.detach().clone()
    pr.on_train_start(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, 2.0)
    # Z^0 zeroes exactly the target count, chosen by |W^0| / alpha^0 with alpha^0 from W^0
    # (eps relative to the layer's mean |W|): the magnitude projection's support.
    alpha0 = reweight(w, 0.5 * float(w.abs().mean()))
    assert torch.allclose(pr.Z["fc1"], reweighted_projection(w, alpha0, 0.8))
    assert torch.equal(pr.Z["fc1"] == 0, project_sparse(w, 0.8) == 0)
    alpha = reweight(pr.Z["fc1"], 0.5 * float(w.abs().mean()))
    assert torch.allclose(pr.alpha["fc1"], alpha)
    u = torch.randn_like(w) * 0.01
    pr.U["fc1"] = u.clone()
    pr.after_step(model)
    v = w + u
    z1 = reweighted_projection(v, alpha, 0.8)
    assert torch.allclose(pr.Z["fc1"], z1)
    assert int((z1 == 0).sum()) == n_pruned(w.numel(), 0.8)
    assert torch.allclose(pr.U["fc1"], v - z1)
    assert torch.allclose(pr.alpha["fc1"], reweight(z1, 0.5 * float(v.abs().mean())))


# -- end to end on digits ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["admm", "radmm"])
def test_weight_targets_exact_and_zeros_stay(digits, pretrained, method) -> None:
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    params = {"admm_iters": 2, "epochs_per_iter": 0.5}
    res = prune_and_finetune(model, digits, graph, method, WEIGHT_TARGETS, params,
                             PRUNE, FINETUNE)
    assert res.pruner.iteration == 2
    assert [r["phase"] for r in res.history] == ["prune", "finetune"]
    for layer, s in WEIGHT_TARGETS.items():
        w = model.get_submodule(layer).weight
        assert int((w == 0).sum()) == n_pruned(w.numel(), s), layer
        mask = res.masks[f"{layer}.weight"]
        assert not w[mask == 0].any()  # still zero after fine-tuning
        assert w[mask == 1].ne(0).all()  # and the survivors were trained, not zeroed
    assert res.history[-1]["val_accuracy"] > 0.5


def test_filter_granularity_on_digits(digits, pretrained) -> None:
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    acct = Accountant(model, digits.example(), graph)
    params = {"admm_iters": 2, "epochs_per_iter": 0.5, "granularity": "filter"}
    res = prune_and_finetune(model, digits, graph, "admm", FILTER_TARGETS, params,
                             PRUNE, FINETUNE)
    assert res.pruner.granularity == "filter"
    for layer, s in FILTER_TARGETS.items():
        mod = model.get_submodule(layer)
        dead = mod.weight.detach().flatten(1).eq(0).all(dim=1)
        assert int(dead.sum()) == n_pruned(mod.weight.shape[0], s), layer
        assert not mod.bias[dead].any()  # the bias of a dropped channel is masked too
    counts = acct.count(model)
    # conv2 loses 1/4 of its filters and half of its inputs (conv1's dead channels): 5/8.
    assert counts.layers["conv2"].sparsity == pytest.approx(1 - 0.75 * 0.5)
    assert counts.flops_frac < 0.6


def test_filter_granularity_rejects_coupled_and_output_layers(tiny) -> None:
    model, graph = tiny
    with pytest.raises(UserError, match="fc2"):
        get_method("admm")(model, {"fc2": 0.5}, graph, granularity="filter")
    with pytest.raises(UserError):
        get_method("admm")(model, {}, graph, granularity="stripe")


def test_resnet20_filter_granularity() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32)
    x = torch.randn(24, 3, 32, 32)
    y = torch.randint(0, 10, (24,))
    data = TensorData(dataset_info("cifar10"), x[:16], y[:16], x[16:], y[16:], x[16:], y[16:])
    graph = build_channel_graph(model, data.example())
    free = graph.free_layers()
    coupled = [name for name in graph.layers if name not in free]
    assert "layer1.0.conv1" in free and "layer1.0.conv2" in coupled
    with pytest.raises(UserError, match="layer1.0.conv2"):
        ADMM(model, {"layer1.0.conv2": 0.5}, graph, granularity="filter")
    targets = {name: 0.25 for name in free}
    params = {"admm_iters": 1, "epochs_per_iter": 1.0, "granularity": "filter"}
    res = prune_and_finetune(model, data, graph, "admm", targets, params,
                             Recipe(lr=0.01, batch_size=16), Recipe(epochs=1, lr=0.01,
                                                                    batch_size=16))
    for name in free:
        w = model.get_submodule(name).weight.detach()
        dead = w.flatten(1).eq(0).all(dim=1)
        assert int(dead.sum()) == n_pruned(w.shape[0], 0.25), name
    bn = model.get_submodule("layer1.0.bn1")  # BatchNorm after layer1.0.conv1
    dead = model.get_submodule("layer1.0.conv1").weight.flatten(1).eq(0).all(dim=1)
    assert not bn.weight[dead].any() and not bn.bias[dead].any()
    assert "layer1.0.bn1.weight" in res.masks


def test_w_step_pulls_weights_toward_z(digits, pretrained) -> None:
    """After one iteration U = W - Z^1, the distance of W to the sparse set: strong rho cuts it."""
    graph = build_channel_graph(fresh_digits_lenet(pretrained), digits.example())
    dist = {}
    for rho in (1e-5, 1.0):
        model = fresh_digits_lenet(pretrained)
        pr = ADMM(model, WEIGHT_TARGETS, graph, rho=rho, admm_iters=1, epochs_per_iter=1.0)
        train(model, digits, Recipe(epochs=1, lr=0.05, batch_size=64), hooks=[pr], seed=3)
        assert pr.iteration == 1
        dist[rho] = sum(float(u.pow(2).sum()) for u in pr.U.values()) ** 0.5
    assert dist[1.0] < 0.5 * dist[1e-5]


def test_filter_prune_phase_changes_the_result_vs_one_shot(digits, pretrained) -> None:
    """At the same filter targets, ADMM's W-steps drain the filters it will prune, so the hard
    prune costs far less than one-shot magnitude's on the dense weights: an inert W-step (no
    penalty, LR at 0, no Z/U updates) would leave both identical."""
    graph = build_channel_graph(fresh_digits_lenet(pretrained), digits.example())
    out = {}
    for method, params in (("magnitude", {"granularity": "filter", "norm": 2}),
                           ("admm", {"granularity": "filter", "rho": 0.1, "admm_iters": 3})):
        model = fresh_digits_lenet(pretrained)
        pr = get_method(method)(model, FILTER_TARGETS, graph, **params)
        if pr.prune_epochs:
            train(model, digits, Recipe(epochs=pr.prune_epochs, lr=0.02, batch_size=64,
                                        schedule="constant"), hooks=[pr], seed=0)
        masks = pr.final_masks()
        energy = sum(float((model.get_submodule(layer).weight.detach()
                            * (1 - masks[f"{layer}.weight"])).pow(2).sum())
                     / float(model.get_submodule(layer).weight.detach().pow(2).sum())
                     for layer in FILTER_TARGETS)
        apply_masks(model, masks)
        out[method] = (energy, evaluate(model, digits.val_x, digits.val_y))
    assert out["admm"][0] < 0.1 * out["magnitude"][0]
    assert out["admm"][1] > out["magnitude"][1] + 0.05, out
