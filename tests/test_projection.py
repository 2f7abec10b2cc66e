"""Budget projection: the cost model equals the Accountant's measurement, and targets are hit."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from autoprune.flops import Accountant
from autoprune.models import build_model
from autoprune.orchestration.projection import CostTable, fractions, min_reachable, project
from autoprune.pruning.base import apply_masks, filter_masks, filter_scores, n_pruned, weight_masks


class Bench:
    """A randomly initialised dense model, its accountant and its cost table."""

    def __init__(self, name: str, channels: int, size: int) -> None:
        torch.manual_seed(0)
        self.model = build_model(name, 10, channels, size)
        self.acc = Accountant(self.model, torch.randn(1, channels, size, size))
        self.table = CostTable.from_accountant(self.acc)

    def measure(self, sparsities: dict[str, float], granularity: str) -> dict[str, float]:
        """Mask a copy with the project's mask builders (magnitude scores) and count it."""
        model = copy.deepcopy(self.model)
        if granularity == "weight":
            masks = weight_masks(model, sparsities)
        else:
            scores = {n: filter_scores(model.get_submodule(n).weight) for n in sparsities}
            masks = filter_masks(self.acc.graph, model, sparsities, scores)
        apply_masks(model, masks)
        c = self.acc.count(model)
        return c.fractions()

    def one_step(self, granularity: str) -> dict[str, float]:
        """Largest cost of one more pruned weight/filter in any layer: the rounding resolution."""
        worst = {"flops": 0.0, "sparse_flops": 0.0, "params": 0.0, "weights": 0.0}
        for n in self.table.candidates(granularity):
            c = self.table.layers[n]
            unit = 1 / (c.weights if granularity == "weight" else c.filters)
            f = fractions(self.table, {n: unit}, granularity)
            for k in worst:
                worst[k] = max(worst[k], 1.0 - f[k])
        return worst


@pytest.fixture(scope="module")
def lenet5() -> Bench:
    return Bench("lenet5", 1, 28)


@pytest.fixture(scope="module")
def resnet56() -> Bench:
    return Bench("resnet56", 3, 32)


def random_allocation(table: CostTable, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {n: rng.uniform(0.05, 0.95) for n in table.layers}


# -- the cost table ------------------------------------------------------------------------------
def test_lenet5_cost_table_by_hand(lenet5):
    t = lenet5.table
    assert (t.dense_macs, t.fixed_macs, t.dense_params) == (2_293_000, 0, 431_080)
    c1, c2, f1, f2 = (t.layers[n] for n in ("conv1", "conv2", "fc1", "fc2"))
    # conv1: 20 x (1x5x5) on 24x24 outputs; conv2: 50 x (20x5x5) on 8x8; fc1 800->500; fc2 500->10
    assert (c1.macs, c1.weights, c1.filters, c1.kernel) == (288_000, 500, 20, 25)
    assert (c2.macs, c2.weights, c2.filters, c2.in_cols) == (1_600_000, 25_000, 50, 20)
    assert (f1.macs, f1.weights, f1.in_cols, f2.macs) == (400_000, 400_000, 800, 5_000)
    assert all(c.extra_per_filter == 1 for c in (c1, c2, f1, f2))  # the bias
    assert c1.inputs == () and c2.inputs == (("conv1", 1),)
    assert f1.inputs == (("conv2", 16),)  # flatten: each conv2 channel feeds 4x4 features
    assert f2.inputs == (("fc1", 1),)
    assert (c1.free, c2.free, f1.free, f2.free) == (True, True, True, False)


def test_resnet_cost_table_sees_batchnorm_and_coupling(resnet56):
    t = resnet56.table
    assert t.dense_macs == resnet56.acc.dense_macs and len(t.layers) == 58
    inner = t.layers["layer2.3.conv1"]
    assert inner.free and inner.extra_per_filter == 2  # BN gamma and beta, no conv bias
    assert t.layers["layer2.3.conv2"].inputs == (("layer2.3.conv1", 1),)
    assert not t.layers["layer2.3.conv2"].free and t.layers["layer2.3.conv2"].inputs
    # The residual stream of a stage is one filter unit rooted at its shortcut conv: 9 conv2s
    # and the shortcut write it (10 BNs: 20 entries per channel), the next blocks read it.
    stream = t.units["layer2.0.shortcut.0"]
    assert len(stream) == 10 and "layer2.8.conv2" in stream
    assert t.layers["layer2.8.conv2"].unit == "layer2.0.shortcut.0"
    assert t.layers["layer2.0.shortcut.0"].extra_per_filter == 20
    assert t.layers["layer2.4.conv1"].inputs == (("layer2.0.shortcut.0", 1),)
    # 27 inner convs + the 3 residual streams (the stem conv roots stage 1's); the logits never.
    assert len(t.candidates("filter")) == 30 and len(t.candidates("weight")) == 58
    assert {"conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0"} <= set(t.candidates("filter"))
    assert "fc" not in t.candidates("filter") and "layer2.1.conv2" not in t.candidates("filter")


def test_fractions_by_hand_on_lenet5(lenet5):
    t = lenet5.table
    # filter: 10 of conv1's 20 filters die -> conv1 rows and conv2 input channels halve
    f = fractions(t, {"conv1": 0.5}, "filter")
    assert f["flops"] == (144_000 + 800_000 + 400_000 + 5_000) / 2_293_000
    assert f["params"] == (431_080 - 250 - 10 - 12_500) / 431_080
    # weight: half of conv2's weights
    w = fractions(t, {"conv2": 0.5}, "weight")
    assert w["sparse_flops"] == (288_000 + 800_000 + 400_000 + 5_000) / 2_293_000
    assert w["flops"] == 1.0  # zeros inside live channels: the compacted model is dense
    assert w["params"] == (431_080 - 12_500) / 431_080
    assert w["weights"] == (430_500 - 12_500) / 430_500
    assert f["flops"] == f["sparse_flops"]
    assert f["weights"] == (430_500 - 250 - 12_500) / 430_500
    assert fractions(t, {}, "weight") == dict.fromkeys(("flops", "sparse_flops", "params",
                                                         "weights"), 1.0)
    with pytest.raises(ValueError, match="cannot prune: fc2"):
        fractions(t, {"fc2": 0.5}, "filter")


@pytest.mark.parametrize("granularity", ["weight", "filter"])
def test_fractions_equal_the_accountant_on_random_sparsities(lenet5, resnet56, granularity):
    for bench in (lenet5, resnet56):
        rng = random.Random(7)
        for _ in range(3):
            sp = {n: rng.uniform(0.0, 0.9) for n in bench.table.candidates(granularity)}
            assert fractions(bench.table, sp, granularity) == bench.measure(sp, granularity)


# -- projection onto the budget ------------------------------------------------------------------
CASES = [  # (bench, limits, target, granularity)
    ("lenet5", {"sparse_flops": 0.4}, 1.0, "weight"),
    ("lenet5", {"sparse_flops": 0.4}, 0.8, "weight"),
    ("lenet5", {"weights": 0.01405}, 1.0, "weight"),
    ("lenet5", {"params": 0.014}, 1.0, "weight"),
    ("lenet5", {"params": 0.014}, 0.9, "weight"),
    ("lenet5", {"sparse_flops": 0.4, "params": 0.1}, 0.7, "weight"),
    ("lenet5", {"flops": 0.4}, 0.85, "filter"),
    ("lenet5", {"params": 0.014}, 1.0, "filter"),
    ("resnet56", {"sparse_flops": 0.5}, 1.0, "weight"),
    ("resnet56", {"sparse_flops": 0.5}, 0.75, "weight"),
    ("resnet56", {"flops": 0.5}, 0.9, "filter"),
]


@pytest.mark.parametrize("bench_name, limits, target, granularity", CASES)
def test_projection_hits_the_target_from_below(request, bench_name, limits, target, granularity):
    bench: Bench = request.getfixturevalue(bench_name)
    step = bench.one_step(granularity)
    for seed in range(3):
        alloc = random_allocation(bench.table, seed)
        sp = project(bench.table, alloc, limits, target, granularity)
        assert set(sp) == set(bench.table.candidates(granularity))
        predicted = fractions(bench.table, sp, granularity)
        real = bench.measure(sp, granularity)
        # exact for filters; for weights exact unless whole rows die, which only lowers the count
        for k in ("flops", "sparse_flops", "params", "weights"):
            assert real[k] <= predicted[k] + 1e-9
            if granularity == "filter":
                assert real[k] == predicted[k]
        assert real == pytest.approx(predicted, abs=1e-9)
        ratio = max(predicted[k] / v for k, v in limits.items())
        assert ratio <= target  # within target * budget ...
        # ... and as close as the rounding allows: one weight/filter less pruned would overshoot
        slack = max(2 * step[k] / v for k, v in limits.items())
        assert ratio >= target - slack, (ratio, target, slack)
        for k, v in limits.items():
            assert real[k] <= target * v + 1e-9


def test_projection_follows_the_preferences(lenet5):
    alloc = {"conv1": 0.1, "conv2": 0.5, "fc1": 0.9, "fc2": 0.3}
    sp = project(lenet5.table, alloc, {"params": 0.05}, 1.0, "weight")
    assert sp["conv1"] < sp["fc2"] < sp["conv2"] < sp["fc1"]
    # a single shift on the logit scale: logit(s_l) - logit(a_l) is the same for every layer
    import math

    shifts = {n: math.log(s / (1 - s)) - math.log(alloc[n] / (1 - alloc[n]))
              for n, s in sp.items()}
    assert max(shifts.values()) - min(shifts.values()) < 1e-9


def test_projection_leaves_unallocated_and_excluded_layers_dense(lenet5):
    t = CostTable.from_accountant(lenet5.acc, layers=["conv1", "conv2", "fc1"])
    assert not t.layers["fc2"].prunable and t.candidates("weight") == ["conv1", "conv2", "fc1"]
    sp = project(t, {"conv2": 0.5, "fc1": 0.5, "fc2": 0.9}, {"sparse_flops": 0.6}, 1.0,
                 "weight")
    assert set(sp) == {"conv2", "fc1"}
    assert max(fractions(t, sp, "weight")["sparse_flops"] / 0.6, 0) <= 1.0
    with pytest.raises(ValueError, match="not in the model"):
        CostTable.from_accountant(lenet5.acc, layers=["nope"])


def test_projection_keeps_one_filter_and_respects_max_sparsity(lenet5):
    t = lenet5.table
    alloc = dict.fromkeys(t.layers, 0.9)
    sp = project(t, alloc, {"params": 1e-6}, 1.0, "filter")  # unreachable: everything at its cap
    for n, s in sp.items():
        c = t.layers[n]
        assert c.filters - n_pruned(c.filters, s) >= 1
        assert s <= 0.99
    assert n_pruned(20, sp["conv1"]) == 19  # 0.99 of 20 would round to all 20
    assert fractions(t, sp, "filter") == min_reachable(t, "filter")
    sp = project(t, alloc, {"params": 1e-6}, 1.0, "weight", max_sparsity=0.9)
    assert all(s == 0.9 for s in sp.values())


def test_loose_budget_prunes_nothing(lenet5):
    sp = project(lenet5.table, random_allocation(lenet5.table, 0), {"sparse_flops": 1.0}, 1.0,
                 "weight")
    assert set(fractions(lenet5.table, sp, "weight").values()) == {1.0}


def test_min_reachable(lenet5, resnet56):
    t = lenet5.table
    # every layer at 0.99 of its weights: exactly 1 % of every layer's MACs stays
    assert min_reachable(t, "weight") == {
        "flops": 1.0, "sparse_flops": pytest.approx(0.01, abs=1e-15),
        "params": (5 + 250 + 4000 + 50 + 20 + 50 + 500 + 10) / 431_080,
        "weights": (5 + 250 + 4000 + 50) / 430_500}
    loose = min_reachable(t, "weight", max_sparsity=0.5)
    assert loose["sparse_flops"] == pytest.approx(0.5) and loose["sparse_flops"] > 0.01
    # filters: conv1/conv2 keep one filter (0.99 would round to all), fc1 keeps 5 of 500 (0.99),
    # fc2 (the logits) keeps its 10 outputs but reads only fc1's 5 survivors
    f = min_reachable(t, "filter")
    assert f["flops"] == pytest.approx((14_400 + 1_600 + 5 * 16 + 10 * 5) / 2_293_000, abs=1e-15)
    r = min_reachable(resnet56.table, "filter")
    assert 0.0 < r["flops"] < 0.5 and 0.0 < r["params"] < 1.0
    # With the residual streams prunable too, every conv keeps one channel of its rows and of
    # its inputs: below the 1 % that weight pruning at 0.99 leaves (free layers alone: > 1 %).
    assert r["flops"] < min_reachable(resnet56.table, "weight")["sparse_flops"]
    for gran in ("weight", "filter"):  # the caps themselves are what a real model measures
        caps = {n: resnet56.table.cap(n, gran, 0.99) for n in resnet56.table.candidates(gran)}
        assert resnet56.measure(caps, gran) == pytest.approx(min_reachable(resnet56.table, gran),
                                                             abs=1e-9)


def test_filter_projection_to_the_reachable_limit(resnet56):
    """A budget just above what filter pruning can reach is still met, from below."""
    t = resnet56.table
    reach = min_reachable(t, "filter")["flops"]
    limits = {"flops": reach * 1.02}
    sp = project(t, random_allocation(t, 3), limits, 1.0, "filter")
    real = resnet56.measure(sp, "filter")
    assert real["flops"] <= limits["flops"] and real["flops"] >= reach
    assert real == fractions(t, sp, "filter")


def test_bad_arguments(lenet5):
    t = lenet5.table
    with pytest.raises(ValueError, match="granularity"):
        fractions(t, {}, "channel")
    with pytest.raises(ValueError, match="target"):
        project(t, {}, {"flops": 0.5}, 0.0, "weight")
    with pytest.raises(ValueError, match="limits"):
        project(t, {}, {"latency": 0.5}, 1.0, "weight")


def test_size_prior_and_offsets_from_it(lenet5):
    """The search's default centre: bigger layers pruned harder; 0.5 offsets give the prior."""
    from autoprune.orchestration.projection import size_prior, with_prior

    table = lenet5.table
    prior = size_prior(table)
    order = sorted(prior, key=prior.get)
    assert order == sorted(table.layers, key=lambda n: table.layers[n].weights)
    assert with_prior(dict.fromkeys(prior, 0.5), prior) == pytest.approx(prior)
    shifted = with_prior({"conv1": 0.9, "fc1": 0.1}, prior)
    assert shifted["conv1"] > prior["conv1"] and shifted["fc1"] < prior["fc1"]
    # at the ADMM paper's 71x, the prior's split leaves the small conv1 far less pruned than fc1
    targets = project(table, prior, {"params": 0.014}, 1.0, "weight")
    assert targets["conv1"] < 0.85 < 0.98 < targets["fc1"]
    assert fractions(table, targets, "weight")["params"] <= 0.014


def test_prior_strength_moves_every_layer_coherently(lenet5):
    """Strength 0 is the uniform split; a stronger prior spares the small layers and prunes
    the large ones harder at the same budget, which the highest compressions want."""
    from autoprune.orchestration.projection import size_prior, with_prior

    table, limits = lenet5.table, {"weights": 0.00281}
    assert size_prior(table, strength=0.0) == pytest.approx(dict.fromkeys(table.layers, 0.5))
    plans = {}
    for s in (0.0, 0.5, 1.0):
        alloc = with_prior(dict.fromkeys(table.layers, 0.5), size_prior(table, strength=s))
        plans[s] = project(table, alloc, limits, 1.0, "weight", 0.999)
        assert fractions(table, plans[s], "weight")["weights"] <= 0.00281
    assert len(set(plans[0.0].values())) == 1  # uniform: one sparsity everywhere
    assert plans[1.0]["conv1"] < plans[0.5]["conv1"] < plans[0.0]["conv1"]
    assert plans[1.0]["fc1"] > plans[0.5]["fc1"] > plans[0.0]["fc1"]


def test_targets_below_the_reachable_are_stretched_onto_it(lenet5):
    """At params=0.014 LeNet-5 can reach 0.0113 at most: sampled targets from the floor up
    must still give distinct, reachable plans instead of all collapsing to every-layer-capped."""
    from autoprune.orchestration.projection import reachable_target

    table, limits = lenet5.table, {"params": 0.014}
    reach = min_reachable(table, "weight")["params"] / 0.014
    assert 0.6 < reach < 1
    mapped = [reachable_target(t, 0.6, table, limits, "weight") for t in (0.6, 0.7, 0.8, 1.0)]
    assert mapped[0] == pytest.approx(reach) and mapped[-1] == pytest.approx(1.0)
    assert mapped == sorted(mapped) and len(set(mapped)) == 4
    plans = [project(table, dict.fromkeys(table.layers, 0.5), limits, t, "weight")
             for t in mapped[1:]]
    assert all(fractions(table, p, "weight")["params"] <= 0.014 for p in plans)
    assert len({tuple(sorted(p.items())) for p in plans}) == 3  # no two targets collapse
    # a loose budget keeps the sampled target as it is
    assert reachable_target(0.7, 0.6, table, {"params": 0.5}, "weight") == 0.7


def test_default_space_reaches_the_radmm_papers_355x_on_lenet5(lenet5):
    """weights=0.00281 (RADMM's 355.9x on LeNet-5) needs layers pruned past 99 %: the built-in
    space allows 0.999, and its projection meets that budget with each layer's share kept."""
    from autoprune.orchestration.projection import size_prior, with_prior
    from autoprune.orchestration.space import SearchSpace
    from autoprune.paths import SPACES_DIR

    space = SearchSpace.load(SPACES_DIR / "default.yaml")
    table, limits = lenet5.table, {"weights": 0.00281}
    assert min_reachable(table, "weight", 0.99)["weights"] > 0.00281  # the old cap could not
    assert min_reachable(table, "weight", space.max_sparsity)["weights"] < 0.00281
    alloc = with_prior(dict.fromkeys(table.layers, 0.5), size_prior(table))
    targets = project(table, alloc, limits, 1.0, "weight", space.max_sparsity)
    assert 0.00281 * 0.98 < fractions(table, targets, "weight")["weights"] <= 0.00281
    assert max(targets.values()) > 0.99
    assert all(n_pruned(table.layers[n].weights, s) < table.layers[n].weights
               for n, s in targets.items())
