"""The methods' own phases at the length a search gives them (1-3 epochs on digits).

ASFP's rate must rise smoothly inside a one-epoch phase; reweighted ADMM's Z must meet the
per-layer targets at every iteration while the reweighting moves its zero pattern; L0's gates
must respond to lambda in a short phase whatever the weights' optimiser (SGD or Adam).
"""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_digits_lenet
from torch import nn

from autoprune.engine import Recipe, TrainHook, train
from autoprune.graph import build_channel_graph
from autoprune.pruning.asfp import ASFP
from autoprune.pruning.base import n_pruned
from autoprune.pruning.l0 import L0, prob_nonzero
from autoprune.pruning.radmm import (
    ReweightedADMM,
    reweight,
    reweighted_projection,
    target_threshold,
)

FILTER_TARGETS = {"conv1": 0.5, "conv2": 0.5, "fc1": 0.5}
WEIGHT_TARGETS = {"conv1": 0.5, "conv2": 0.8, "fc1": 0.9, "fc2": 0.5}


# -- ASFP -------------------------------------------------------------------------------------
class _RateSpy(TrainHook):
    """After every step: ASFP's current rate of `layer` and its number of zero filters."""

    def __init__(self, pruner: ASFP, layer: str) -> None:
        self.pruner, self.layer = pruner, layer
        self.rates: list[float] = []
        self.zeros: list[int] = []

    def after_step(self, model: nn.Module) -> None:
        self.rates.append(self.pruner.rates.get(self.layer, 0.0))
        w = model.get_submodule(self.layer).weight.detach()
        self.zeros.append(int(w.flatten(1).eq(0).all(1).sum()))


def test_asfp_rate_rises_smoothly_within_one_epoch(digits, pretrained) -> None:
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    pr = ASFP(model, {"conv2": 0.5, "fc1": 0.5}, graph, epochs=1.0)
    spy = _RateSpy(pr, "fc1")
    train(model, digits, Recipe(epochs=1.0, lr=0.02, batch_size=64), hooks=[pr, spy])
    n = len(spy.rates)
    points = [round((i + 1) * (n - 1) / 10) for i in range(10)]
    rates = [spy.rates[i] for i in points]
    assert len(set(rates)) >= 5
    assert rates == sorted(rates) and rates[-1] == 0.5
    zeros = [spy.zeros[i] for i in points]  # the weights follow the rate
    assert zeros == sorted(zeros) and len(set(zeros)) >= 3 and zeros[-1] == 32


# -- reweighted ADMM --------------------------------------------------------------------------
def test_reweighted_projection_meets_count_and_lets_a_zero_return() -> None:
    v = torch.tensor([3.0, 1.0, 2.0, -0.5])
    z_prev = torch.tensor([0.0, 1.0, 2.0, 0.5])  # entry 0 was zero, its V has grown since
    alpha = reweight(z_prev, 1.0)  # 1, 1/2, 1/3, 1/1.5: scores |v|/alpha = 3, 2, 6, 0.75
    z = reweighted_projection(v, alpha, 0.5)
    assert (z == 0).tolist() == [False, True, False, True]  # entry 0 is back
    tau = target_threshold(v.abs(), alpha, 0.5)
    assert tau == pytest.approx(2.5)  # midway between the scores 2 (pruned) and 3 (kept)
    assert torch.allclose(z, torch.tensor([3.0 - 2.5, 0.0, 2.0 - 2.5 / 3, 0.0]))
    # Filters: scores ||v_g|| / alpha_g, kept filters shrunk by 1 - tau * alpha_g / ||v_g||.
    vf = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 2.0]])  # norms 5, 1, 2
    zf = reweighted_projection(vf, torch.tensor([1.0, 0.25, 1.0]), 1 / 3, filters=True)
    assert zf[2].eq(0).all() and zf[1].ne(0).all()  # scores 5, 4, 2: filter 2 goes
    assert torch.allclose(zf[0], vf[0] * (1 - 3.0 / 5))  # tau = 3, between 2 and 4


class _ZSpy(TrainHook):
    """Z's zero pattern after every ADMM iteration (checked after the pruner's after_step)."""

    def __init__(self, pruner: ReweightedADMM) -> None:
        self.pruner = pruner
        self.seen = 0
        self.zeros: list[dict[str, torch.Tensor]] = []

    def after_step(self, model: nn.Module) -> None:
        if self.pruner.iteration > self.seen:
            self.seen = self.pruner.iteration
            filt = self.pruner.granularity == "filter"
            self.zeros.append({k: (z.flatten(1).norm(dim=1) == 0 if filt else z == 0).clone()
                               for k, z in self.pruner.Z.items()})


@pytest.mark.parametrize("granularity,targets", [("weight", WEIGHT_TARGETS),
                                                 ("filter", FILTER_TARGETS)])
def test_radmm_z_meets_targets_and_its_pattern_moves(digits, pretrained, granularity,
                                                     targets) -> None:
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    pr = ReweightedADMM(model, targets, graph, granularity=granularity, admm_iters=6,
                        epochs_per_iter=0.5, rho=1e-2)
    spy = _ZSpy(pr)
    train(model, digits, Recipe(epochs=pr.prune_epochs, lr=0.02, batch_size=64,
                                schedule="constant"), hooks=[pr, spy])
    assert len(spy.zeros) == 6
    for zeros in spy.zeros:
        for layer, s in targets.items():
            assert int(zeros[layer].sum()) == n_pruned(zeros[layer].numel(), s), layer
    moved = sum(int((spy.zeros[0][k] != spy.zeros[-1][k]).sum()) for k in targets)
    assert moved > 0
    # The final masks are Z's pattern, exact per layer.
    masks = pr.final_masks()
    for layer in targets:
        m = masks[f"{layer}.weight"]
        dropped = m.flatten(1).eq(0).all(1) if granularity == "filter" else m == 0
        assert torch.equal(dropped, spy.zeros[-1][layer])


# -- L0 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.02), ("adam", 1e-3)])
def test_l0_larger_lambda_closes_more_gates_in_a_short_phase(digits, pretrained, optimizer,
                                                             lr) -> None:
    graph = build_channel_graph(fresh_digits_lenet(pretrained), digits.example())
    expected_l0, open_sum = {}, {}
    for lam in (0.05, 5.0):
        model = fresh_digits_lenet(pretrained)
        pr = L0(model, FILTER_TARGETS, graph, lam=lam, granularity="filter", gate_lr=0.2)
        train(model, digits, Recipe(epochs=1.0, optimizer=optimizer, lr=lr, batch_size=64,
                                    weight_decay=0.0), hooks=[pr], seed=0)
        las = list(pr.log_alpha.values())
        expected_l0[lam] = float(sum(prob_nonzero(la.detach()).sum() for la in las))
        open_sum[lam] = sum(float(g.sum()) for g in pr.gates().values())
    gates = 16 + 32 + 64
    assert expected_l0[5.0] < expected_l0[0.05] - 0.1 * gates, expected_l0
    assert open_sum[5.0] < open_sum[0.05] - 0.1 * gates, open_sum  # test-time gates shut too
