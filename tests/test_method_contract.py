"""The method contract, checked for every registered method (the list comes from the registry).

Adding a method is one file plus its own tests: these generic tests pick it up through
`load_all()` and check what every user relies on, whatever the method: each layer's target is
met exactly, pruned weights are still exactly zero after masked fine-tuning, the masks are not
those of an inert method, and `autoprune methods` shows its hyperparameters and its differences
from the paper. Each method runs with the cheap end of its declared search ranges.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import fresh_digits_lenet

from autoprune.cli import main
from autoprune.engine import Recipe
from autoprune.graph import build_channel_graph
from autoprune.orchestration.space import SearchSpace
from autoprune.pruning import load_all
from autoprune.pruning.base import METHODS, Masks, Pruner, hp, n_pruned, register
from autoprune.pruning.runner import PrunedState, calibration_batches, prune_and_finetune

WEIGHT_TARGETS = {"conv1": 0.5, "conv2": 0.8, "fc1": 0.9, "fc2": 0.5}
FILTER_TARGETS = {"conv1": 0.5, "conv2": 0.25, "fc1": 0.5}  # the free layers of lenet-digits
PRUNE = Recipe(lr=0.05, batch_size=64)
FINETUNE = Recipe(epochs=1, lr=0.02, batch_size=64)
METHOD_NAMES = sorted(load_all())
# Each method at its cheapest setting, and once more per other declared granularity.
CASES = [(m, {}) for m in METHOD_NAMES] + [
    (m, {"granularity": g}) for m in METHOD_NAMES
    for g in load_all()[m].search_space().get("granularity", {}).get("choices", [])[1:]]


def cheap_params(cls: type[Pruner]) -> dict:
    """The low end of every declared range (first choice): the quickest searched setting."""
    out = {}
    for name, spec in cls.search_space().items():
        out[name] = spec["choices"][0] if "choices" in spec else spec["low"]
    cls.make_params(**dict(out))  # valid, or the declaration is wrong
    return out


def inert_masks(model: torch.nn.Module, targets: dict[str, float], granularity: str) -> Masks:
    """What a method that looks at nothing would do: prune the first units by index."""
    out: Masks = {}
    for layer, s in targets.items():
        w = model.get_submodule(layer).weight
        units = w.shape[0] if granularity == "filter" else w.numel()
        keep = torch.ones(units)
        keep[:n_pruned(units, s)] = 0.0
        out[f"{layer}.weight"] = (keep.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
                                  if granularity == "filter" else keep.view_as(w))
    return out


@pytest.mark.parametrize("method, override", CASES,
                         ids=[m + "".join(f"-{v}" for v in o.values()) for m, o in CASES])
def test_every_method_meets_targets_keeps_zeros_and_is_not_inert(digits, pretrained, method,
                                                                 override):
    cls = load_all()[method]
    params = {**cheap_params(cls), **override}
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    granularity = cls(model, {}, graph, **params).granularity
    targets = FILTER_TARGETS if granularity == "filter" else WEIGHT_TARGETS
    res = prune_and_finetune(model, digits, graph, method, targets, params, PRUNE, FINETUNE)
    assert res.pruner.granularity == granularity
    for layer, s in targets.items():
        w = model.get_submodule(layer).weight
        mask = res.masks[f"{layer}.weight"]
        if granularity == "filter":
            dropped = mask.flatten(1).eq(0).all(1)
            assert int(dropped.sum()) == n_pruned(w.shape[0], s), layer
            assert int(mask.eq(0).sum()) == int(dropped.sum()) * w[0].numel(), layer
        else:
            assert int(mask.eq(0).sum()) == n_pruned(w.numel(), s), layer
    params_now = dict(model.named_parameters())
    for name, mask in res.masks.items():  # every masked entry, bias and BN included
        assert not params_now[name].detach()[mask == 0].any(), name
    inert = inert_masks(model, targets, granularity)
    assert any(not torch.equal(res.masks[k], inert[k]) for k in inert)
    assert res.history[-1]["phase"] == "finetune"
    assert res.history[-1]["val_accuracy"] > 0.5


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_declares_ranges_and_differences(method):
    cls = load_all()[method]
    assert cls.name == method
    assert cls.search_space(), f"{method} declares no search range"
    assert cls.differences and all(isinstance(d, str) and d for d in cls.differences)


def test_methods_command_lists_search_ranges_and_differences(capsys):
    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert set(listed) == set(METHOD_NAMES)
    for name, m in listed.items():
        assert m["differences"] == list(load_all()[name].differences) and m["summary"]
        searched = {h["name"]: h["search"] for h in m["hyperparameters"] if "search" in h}
        assert searched == load_all()[name].search_space()
    # every method with a trained phase of its own declares its length (finalists stretch it)
    lengths = {name: [h["name"] for h in m["hyperparameters"] if h.get("length")]
               for name, m in listed.items()}
    assert lengths == {"magnitude": ["epochs"], "admm": ["epochs_per_iter"],
                       "radmm": ["epochs_per_iter"], "l0": ["epochs"], "asfp": ["epochs"],
                       "adaptive_l1": ["epochs"], "taylor": []}
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "differences from the paper:" in text and "searched [0.0001, 0.1] log" in text
    assert text.count("a phase length: finalists stretch it") == 6


# -- a new method is one class: calibrate, registry, declared space ---------------------------
@pytest.fixture()
def recorder():
    """A data-driven one-shot method defined here, as a user's file would define it."""
    calls: list[str] = []

    @register
    class _Recorder(Pruner):
        """Prunes the weights with the smallest |gradient x weight| seen in calibration."""

        name = "_recorder"
        differences = ("a test double",)

        @dataclasses.dataclass
        class Params:
            batches: int = hp(3, 1, 10, search=(1, 3))
            epochs: float = hp(0.0, 0.0, 2.0)

        @property
        def prune_epochs(self) -> float:
            return self.params.epochs

        def calibrate(self, model, batches):
            calls.append("calibrate")
            self.seen = [next(batches) for _ in range(self.params.batches)]
            self.device_ok = all(x.device == model.fc1.weight.device for x, _ in self.seen)

        def on_train_start(self, model, optimizer, steps_per_epoch, epochs):
            calls.append("prune phase")

        def final_masks(self):
            calls.append("final_masks")
            return {f"{k}.weight": torch.ones_like(self.model.get_submodule(k).weight)
                    for k in self.targets}

    try:
        yield calls
    finally:
        METHODS.pop("_recorder", None)


def test_runner_calibrates_before_the_prune_phase_and_final_masks(digits, pretrained, recorder):
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    res = prune_and_finetune(model, digits, graph, "_recorder", {"fc1": 0.5},
                             {"epochs": 0.2}, PRUNE, Recipe(epochs=0))
    assert recorder == ["calibrate", "prune phase", "final_masks"]
    assert len(res.pruner.seen) == 3 and res.pruner.device_ok
    assert all(x.shape[0] == PRUNE.batch_size for x, _ in res.pruner.seen)
    # A resumed trial skips the prune phase, calibration included.
    recorder.clear()
    state = PrunedState({k: v.clone() for k, v in model.state_dict().items()}, res.masks, [])
    prune_and_finetune(fresh_digits_lenet(pretrained), digits, graph, "_recorder",
                       {"fc1": 0.5}, {}, PRUNE, Recipe(epochs=0), resume=state)
    assert recorder == []


def test_a_new_method_joins_the_declared_space(recorder):
    s = SearchSpace.from_dict({"methods": "declared"})
    assert s.methods["_recorder"]["batches"].kind == "int"
    assert "epochs" not in s.methods["_recorder"]  # no declared range: fixed at its default


def test_calibration_batches_are_endless_and_seeded(digits):
    n = digits.train_x.shape[0]
    a = calibration_batches(digits, 500, seed=3)
    first = [next(a) for _ in range(2 * -(-n // 500) + 1)]  # more than two epochs
    assert sum(x.shape[0] for x, _ in first[:-(-n // 500)]) == n
    b = calibration_batches(digits, 500, seed=3)
    assert torch.equal(next(b)[1], first[0][1])
