"""The global split of a budget: one importance ranking over all layers (global_split.py)."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch

from autoprune.flops import Accountant
from autoprune.models import build_model
from autoprune.orchestration.baselines import baseline_params
from autoprune.orchestration.global_split import dense_scores, global_targets
from autoprune.orchestration.projection import CostTable, fractions
from autoprune.orchestration.space import SearchSpace
from autoprune.pruning.base import apply_masks, filter_masks, n_pruned, weight_masks

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Bench:
    """A randomly initialised model, its accountant and its cost table."""

    def __init__(self, name: str, channels: int, size: int) -> None:
        torch.manual_seed(0)
        self.model = build_model(name, 10, channels, size)
        self.acc = Accountant(self.model, torch.randn(1, channels, size, size))
        self.table = CostTable.from_accountant(self.acc)

    def scores(self, granularity: str) -> dict[str, torch.Tensor]:
        return dense_scores(self.acc.graph, self.model, self.table.candidates(granularity),
                            granularity)

    def measure(self, targets: dict[str, float], scores: dict[str, torch.Tensor],
                granularity: str) -> dict[str, float]:
        """Mask a copy, each layer by the same scores, and count it with the accountant."""
        model = copy.deepcopy(self.model)
        if granularity == "weight":
            shaped = {n: scores[n].view_as(model.get_submodule(n).weight) for n in targets}
            masks = weight_masks(model, targets, shaped)
        else:
            masks = filter_masks(self.acc.graph, model, targets, scores)
        apply_masks(model, masks)
        return self.acc.count(model).fractions()


@pytest.fixture(scope="module")
def lenet5() -> Bench:
    return Bench("lenet5", 1, 28)


@pytest.fixture(scope="module")
def resnet20() -> Bench:
    return Bench("resnet20", 3, 32)


def removed_and_kept(targets, scores):
    """Per layer, the scores of the units a method ranking by `scores` removes and keeps."""
    out = {}
    for n, s in targets.items():
        order = torch.sort(scores[n].flatten().double(), stable=True).values
        k = n_pruned(order.numel(), s)
        out[n] = (order[:k], order[k:])
    return out


@pytest.mark.parametrize("bench_name,limits,granularity", [
    ("lenet5", {"flops": 0.4}, "filter"),
    ("lenet5", {"params": 0.1}, "filter"),
    ("lenet5", {"params": 0.05}, "weight"),
    ("lenet5", {"weights": 0.08, "sparse_flops": 0.5}, "weight"),
    ("resnet20", {"flops": 0.5}, "filter"),
    ("resnet20", {"flops": 0.6, "params": 0.5}, "filter"),
])
def test_meets_the_budget_with_the_least_global_pruning(request, bench_name, limits, granularity):
    """The measured model is within the budget; the removed units are the lowest of the pooled
    ranking (every removed score below every kept one, across layers), and putting back the
    best removed unit breaks the budget: the least pruning that fits."""
    b = request.getfixturevalue(bench_name)
    scores = b.scores(granularity)
    targets = global_targets(b.table, scores, limits, 1.0, granularity)
    assert set(targets) == set(b.table.candidates(granularity))
    measured = b.measure(targets, scores, granularity)
    assert all(measured[k] <= v + 1e-12 for k, v in limits.items()), measured
    assert measured == pytest.approx(fractions(b.table, targets, granularity), abs=1e-12)
    parts = removed_and_kept(targets, scores)
    removed = torch.cat([r for r, _ in parts.values()])
    kept = torch.cat([k for _, k in parts.values()])
    assert removed.numel() > 0 and removed.max() <= kept.min()  # one threshold for all layers
    # one unit fewer (the highest-scored removed unit put back) misses the budget
    worst = max(parts, key=lambda n: parts[n][0].max() if parts[n][0].numel() else -1.0)
    size = scores[worst].numel()
    fewer = {**targets, worst: (n_pruned(size, targets[worst]) - 1) / size}
    f = fractions(b.table, fewer, granularity)
    assert any(f[k] > v for k, v in limits.items())


def test_counts_are_exact_and_follow_the_scores_across_layers(lenet5):
    """Layers whose units all score low lose the most: the split comes from the scores, and each
    sparsity gives back exactly the count below the threshold under `n_pruned`."""
    t = lenet5.table
    names = t.candidates("filter")
    torch.manual_seed(1)
    scores = {n: torch.rand(t.layers[n].filters) + (0.0 if n == "fc1" else 1.0) for n in names}
    targets = global_targets(t, scores, {"params": 0.5}, 1.0, "filter")
    thres = max(float(scores[n].sort().values[n_pruned(scores[n].numel(), s) - 1])
                for n, s in targets.items() if s > 0)
    for n, s in targets.items():
        below = int((scores[n] <= thres).sum())
        assert n_pruned(t.layers[n].filters, s) == below, n
    assert targets["fc1"] > 0 and all(targets[n] == 0 for n in names if n != "fc1")
    # a tighter target prunes more, and a loose budget nothing
    tighter = global_targets(t, scores, {"params": 0.5}, 0.8, "filter")
    assert fractions(t, tighter, "filter")["params"] <= 0.4 + 1e-12
    assert all(v == 0 for v in global_targets(t, scores, {"params": 1.0}, 1.0, "filter").values())


def test_caps_and_non_candidates(lenet5):
    """A layer never loses more than max_sparsity (nor every unit); the output layer has no
    filter unit and stays out; an unreachable budget gives every layer its cap."""
    t = lenet5.table
    names = t.candidates("filter")
    scores = {n: torch.full((t.layers[n].filters,), 1.0) for n in names}
    scores["fc1"] = torch.zeros(t.layers["fc1"].filters)  # fc1's units rank first
    scores["fc2"] = torch.zeros(10)  # logits: not a candidate, ignored
    capped = global_targets(t, scores, {"params": 0.3}, 1.0, "filter", max_sparsity=0.5)
    assert "fc2" not in capped and capped["fc1"] == 0.5  # capped, the rest from the others
    assert fractions(t, capped, "filter")["params"] <= 0.3 + 1e-12
    unreachable = global_targets(t, scores, {"params": 1e-4}, 1.0, "filter")
    for n, s in unreachable.items():
        assert n_pruned(t.layers[n].filters, s) == \
            n_pruned(t.layers[n].filters, t.cap(n, "filter", 0.99)) < t.layers[n].filters
    with pytest.raises(ValueError, match="expected"):
        global_targets(t, {"fc1": torch.zeros(3)}, {"params": 0.3}, 1.0, "filter")


def test_weight_scores_are_raw_magnitudes_and_filter_scores_unit_mean(lenet5):
    """Weights as global_unstructured ranks them (|w|, no normalisation); filters as
    Torch-Pruning's GroupMagnitudeImportance: sum |w|^p per channel over the unit's mean."""
    w = dense_scores(lenet5.acc.graph, lenet5.model, ["fc1"], "weight")["fc1"]
    assert torch.equal(w, lenet5.model.fc1.weight.detach().abs().flatten())
    f = dense_scores(lenet5.acc.graph, lenet5.model, ["conv2"], "filter", p=2)["conv2"]
    sq = lenet5.model.conv2.weight.detach().double().pow(2).flatten(1).sum(1)
    assert torch.allclose(f, sq / sq.mean())
    assert f.mean().item() == pytest.approx(1.0)


# -- against Torch-Pruning, on the digits study's dense model ------------------------------------
@pytest.fixture(scope="module")
def digits_bench(tmp_path_factory):
    from autoprune.pipeline import Workbench
    from autoprune.study import load_study

    return Workbench.open(load_study("digits-lenet"), tmp_path_factory.mktemp("dense"), seed=0)


@pytest.mark.parametrize("budget", ["flops=0.4", "flops=0.7", "params=0.3"])
def test_one_shot_magnitude_global_plan_removes_torch_pruning_global_channels(digits_bench,
                                                                              budget):
    """A split=global one-shot magnitude filter plan (norm 2) removes exactly the channels that
    Torch-Pruning's global pruning with GroupMagnitudeImportance(p=2) removes, when both remove
    the same number. Torch-Pruning's group reduction "first" (the root layer's own filters) is
    the like-for-like one: its default "mean" also averages in the consumers' input columns
    (and BatchNorm scales), which magnitude's filter criterion does not rank by, so with it a
    few channels of each layer differ (see the report of this change)."""
    import torch_pruning as tp

    from autoprune.budget import Budget
    from autoprune.orchestration.global_split import global_plan
    from autoprune.pruning import get_method

    wb = digits_bench
    space = SearchSpace.from_dict({"methods": {"magnitude": {
        "gradual": False, "epochs": 0, "granularity": "filter", "norm": 2}},
        "sparsity": {"split": ["global"], "target_floor": 1.0}})
    plan = space.decode({"method": "magnitude"}, wb.layers)
    graph = wb.accountant.graph
    targets = global_plan(wb, plan, "filter", Budget.parse(budget).limits, 1.0)
    model = wb.fresh_model()
    method = get_method("magnitude")(model, targets, graph, **plan.params)
    apply_masks(model, method.final_masks())
    dead = graph.dead_channels(dict(model.named_parameters()))
    ours = {r: sorted(torch.nonzero(d).flatten().tolist()) for r, d in dead.items() if d.any()}
    k = sum(len(v) for v in ours.values())
    assert k > 0 and len(ours) > 1

    theirs_model = wb.fresh_model().eval()
    total = sum(graph.unit(r).size for r in graph.filter_units())
    pruner = tp.pruner.MetaPruner(
        theirs_model, wb.data.example(),
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="first"),
        global_pruning=True, pruning_ratio=(k - 0.5) / total,  # TP removes exactly k
        ignored_layers=[theirs_model.get_submodule(graph.output_layer)])
    names = {m: n for n, m in theirs_model.named_modules()}
    theirs = {names[g[0].dep.target.module]: sorted(g[0].idxs)
              for g in pruner.step(interactive=True)}
    assert theirs == ours


# -- the baselines -------------------------------------------------------------------------------
def test_global_baselines_come_first(lenet5):
    """Every declared baseline setting is enqueued with the global split first, then the
    sampled size and uniform splits; a space without `global` keeps the old list."""
    layers = list(lenet5.acc.graph.layers)
    methods = {"magnitude": {"gradual": {"choices": [False, True]}, "epochs": 0}}
    both = SearchSpace.from_dict({"methods": methods,
                                  "sparsity": {"split": ["sampled", "global"]}})
    params = baseline_params(both, lenet5.table, layers, "filter")
    assert [p.get("split") for p in params] == ["global"] * 2 + ["sampled"] * 4
    assert [p["magnitude.gradual"] for p in params] == [False, True] * 3
    # the size-prior split (offsets 0.5: the prior itself) before the uniform one
    assert [all(v == 0.5 for k, v in p.items() if k.startswith("alloc.")) for p in params[2:]] \
        == [True, True, False, False]
    assert not any(k.startswith("alloc.") for p in params[:2] for k in p)
    old = SearchSpace.from_dict({"methods": methods})
    assert [p.get("split") for p in baseline_params(old, lenet5.table, layers, "filter")] == \
        [None] * 4
    only = SearchSpace.from_dict({"methods": methods, "sparsity": {"split": "global"}})
    assert baseline_params(only, lenet5.table, layers, "filter") == [
        {"method": "magnitude", "magnitude.gradual": False, "target": 1.0},
        {"method": "magnitude", "magnitude.gradual": True, "target": 1.0}]


def test_search_starts_with_the_global_baseline(ray_session, tmp_path):
    """A new search over a space offering both splits runs the global one-shot baseline first:
    trial 0 is enqueued with split=global, the next with the size-prior split."""
    import json

    from conftest import QUICK_SPACE

    from autoprune.orchestration.orchestrator import SearchOptions, search

    space = tmp_path / "space.yaml"
    space.write_text(QUICK_SPACE + "  split: [sampled, global]\n")
    opts = SearchOptions(study="digits-lenet", space=str(space), budget="flops=0.4", trials=4,
                         workers=2, out=str(tmp_path / "runs"), seed=0, finalists=0)
    summary = search(opts)
    assert summary["trials_completed"] >= 2, summary["errors"]
    study = optuna.load_study(study_name="digits-lenet", storage=f"sqlite:///"
                              f"{tmp_path / 'runs' / 'digits-lenet' / 'optuna.db'}")
    first = sorted(study.trials, key=lambda t: t.number)[:2]
    assert [t.user_attrs.get("baseline") for t in first] == [True, True]
    assert [t.params["split"] for t in first] == ["global", "sampled"]
    assert not any(k.startswith("alloc.") for k in first[0].params)
    assert first[0].params["target"] == 1.0
    assert first[0].state.name == "COMPLETE", first[0].user_attrs.get("error")
    # within the budget, by the global ranking
    assert first[0].user_attrs["flops_frac"] <= 0.4 + 1e-9
    targets = json.loads(first[0].user_attrs["targets"])
    assert set(targets) == {"conv1", "conv2", "fc1"} and len(set(targets.values())) > 1
    # in MLflow, the enqueued baselines' runs are tagged as such and no other run is
    from mlflow import MlflowClient

    from autoprune import store
    from autoprune.names import TAG_BASELINE

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    parent = store.parent_run_id(study)
    runs = store.child_runs(client, client.get_run(parent).info.experiment_id, parent)
    assert runs and {n: r.data.tags.get(TAG_BASELINE) == "true" for n, r in runs.items()} == \
        {t.number: bool(t.user_attrs.get("baseline")) for t in study.trials if t.number in runs}
    assert runs[0].data.tags.get(TAG_BASELINE) == "true"
