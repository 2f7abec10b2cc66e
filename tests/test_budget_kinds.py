"""Budget kinds end to end: what `flops=` means (the compacted model), and the other three."""

from __future__ import annotations

import dataclasses

import pytest

from autoprune.errors import UserError
from autoprune.orchestration.space import SearchSpace
from autoprune.pruning import load_all


def test_flops_budget_keeps_only_filter_methods_fixed_to_filters():
    space = SearchSpace.from_dict({"methods": "declared"})
    restricted = space.for_budget(structured=True)
    assert space.for_budget(structured=False) is space
    methods = load_all()
    assert set(restricted.methods) == {n for n, c in methods.items()
                                       if "filter" in c.granularities()}
    for name, dists in restricted.methods.items():
        if any(f.name == "granularity" for f in dataclasses.fields(methods[name].Params)):
            assert dists["granularity"].fixed and dists["granularity"].value == "filter", name
        # what means nothing at filter granularity is not sampled (it would only add noise)
        assert not set(dists) & set(methods[name].weight_only_params), name
    # multi-granularity keeps its structured part: the filter-level penalty and ranking
    assert "adaptive_l1" in restricted.methods
    assert {"lam0", "epochs"} <= set(restricted.methods["adaptive_l1"])
    assert "filter_share" in space.methods["adaptive_l1"]  # searched under weight budgets


def test_flops_budget_with_no_filter_method_is_refused(monkeypatch):
    from autoprune.pruning.base import METHODS, Pruner

    class WeightsOnly(Pruner):  # a plug-in method that cannot prune whole filters
        name = "weights_only"

        def final_masks(self):
            return {}

    monkeypatch.setitem(METHODS, "weights_only", WeightsOnly)
    space = SearchSpace.from_dict({"methods": {"weights_only": {"epochs": 1.0}}}, "s.yaml")
    with pytest.raises(UserError, match="whole filters") as e:
        space.for_budget(structured=True)
    assert "\n" not in str(e.value)


def test_weight_pruning_cannot_meet_a_flops_budget_but_meets_sparse_flops(tmp_path):
    """Zeros inside live channels leave the compacted model's FLOPs whole: refused, with a hint,
    before any training; the papers' sparse count is a budget kind of its own."""
    import autoprune

    with pytest.raises(UserError, match="granularity=filter") as e:
        autoprune.prune("digits-lenet", "magnitude", "flops=0.4", out=tmp_path)
    assert "\n" not in str(e.value)
    m = autoprune.prune("digits-lenet", "magnitude", "sparse_flops=0.4,weights=0.3",
                        out=tmp_path, finetune={"epochs": 1})
    assert m["within_budget"]
    assert m["sparse_flops_frac"] <= 0.4 + 1e-9 and m["weights_frac"] <= 0.3 + 1e-9
    assert m["flops_frac"] == pytest.approx(1.0, abs=0.02)  # real FLOPs barely move
    f = autoprune.prune("digits-lenet", "magnitude", "flops=0.4", out=tmp_path,
                        params={"granularity": "filter"}, finetune={"epochs": 1})
    assert f["within_budget"] and f["flops_frac"] <= 0.4 + 1e-9
    assert f["compact_flops_frac"] == pytest.approx(f["flops_frac"], abs=1e-9)


def test_baselines_come_from_the_methods_declarations(digits):
    """Nothing in the search names a method: the settings are the registry's `baselines`."""
    from autoprune.flops import Accountant
    from autoprune.models import build_model
    from autoprune.orchestration.baselines import baseline_params
    from autoprune.orchestration.projection import CostTable

    model = build_model("lenet-digits", 10, 1, 8)
    table = CostTable.from_accountant(Accountant(model, digits.example()))
    space = SearchSpace.from_dict({"methods": "declared"}).for_budget(structured=True)
    params = baseline_params(space, table, list(table.layers), "filter")
    # a setting of single weights cannot meet a flops= budget: skipped (ADMM's schedule)
    declared = [(n, s) for n, c in load_all().items() if n in space.methods
                for s in c.baselines if s.get("granularity") != "weight"]
    assert declared and len(params) == 2 * len(declared)  # size-prior and uniform split each
    unstructured = SearchSpace.from_dict({"methods": "declared"})
    weight = baseline_params(unstructured, table, list(table.layers), "weight")
    assert any(p["method"] == "admm" for p in weight)
    assert not any(p["method"] == "admm" for p in params)
    for p in params:
        assert p["target"] == 1.0 and f"{p['method']}.granularity" not in p  # fixed: filter
    uniform = [p for p in params if any(v != 0.5 for k, v in p.items() if k.startswith("alloc"))]
    assert len(uniform) == len(declared)
    # the uniform split's offsets cancel the prior: every layer gets the same preference
    from autoprune.orchestration.projection import size_prior, with_prior
    prior = size_prior(table, list(table.layers), "filter")
    for p in uniform:
        offsets = {k[len("alloc."):]: v for k, v in p.items() if k.startswith("alloc.")}
        prefs = with_prior(offsets, prior).values()
        assert max(prefs) - min(prefs) < 1e-9, prefs


def test_baselines_fix_a_searched_prior_strength(digits):
    """The default space searches the size prior's strength; its baselines still take the
    prior a user gets by hand (0.5), or the nearer end of a range that excludes it."""
    from autoprune.flops import Accountant
    from autoprune.models import build_model
    from autoprune.orchestration.baselines import baseline_params
    from autoprune.orchestration.projection import CostTable, size_prior
    from autoprune.paths import SPACES_DIR

    model = build_model("lenet-digits", 10, 1, 8)
    table = CostTable.from_accountant(Accountant(model, digits.example()))
    layers = list(table.layers)
    default = SearchSpace.load(SPACES_DIR / "default.yaml")
    assert not default.prior_strength.fixed
    params = baseline_params(default, table, layers, "weight")
    sampled = [p for p in params if p.get("split") == "sampled"]
    # the size-prior split at 0.5, the uniform one as strength 0: every offset 0.5 in both
    n = len(sampled) // 2
    assert n and sorted(p["prior_strength"] for p in sampled) == [0.0] * n + [0.5] * n
    assert all(v == 0.5 for p in sampled for k, v in p.items() if k.startswith("alloc."))
    assert not any("prior_strength" in p for p in params if p.get("split") == "global")
    strong = SearchSpace.from_dict({"methods": "declared", "sparsity": {
        "prior_strength": {"low": 1.0, "high": 2.0}}})
    uniform_at = {n: 1.0 - p for n, p in size_prior(table, strength=1.0).items()}
    params = baseline_params(strong, table, layers, "weight")
    assert all(p["prior_strength"] == 1.0 for p in params)
    assert any(all(p[f"alloc.{n}"] == pytest.approx(a) for n, a in uniform_at.items())
               for p in params)


def test_baselines_fine_tune_with_the_study_recipe(digits):
    """The default space searches `finetune.lr_scale`; a hand baseline fine-tunes as a user
    would by hand, at the study's own rate (x1), and leaves to the sampler a value the space
    cannot hold."""
    from autoprune.engine import Recipe
    from autoprune.flops import Accountant
    from autoprune.models import build_model
    from autoprune.orchestration.baselines import baseline_params
    from autoprune.orchestration.projection import CostTable
    from autoprune.paths import SPACES_DIR

    model = build_model("lenet-digits", 10, 1, 8)
    table = CostTable.from_accountant(Accountant(model, digits.example()))
    layers = list(table.layers)
    default = SearchSpace.load(SPACES_DIR / "default.yaml").for_budget(structured=True)
    assert not default.finetune["lr_scale"].fixed
    recipe = dataclasses.asdict(Recipe(lr=0.02))
    params = baseline_params(default, table, layers, "filter", recipe)
    assert params and all(p["finetune.lr_scale"] == 1.0 for p in params)
    high = SearchSpace.from_dict({"methods": "declared",
                                  "finetune": {"lr_scale": {"low": 2, "high": 8}}})
    assert not any("finetune.lr_scale" in p for p in baseline_params(
        high.for_budget(structured=True), table, layers, "filter", recipe))
