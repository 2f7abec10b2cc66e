"""The fine-tune phase undoes a collapse: a retrain whose validation accuracy falls far below its
best epoch ends on that epoch's weights (still as sparse), while a small dip keeps the last."""

from __future__ import annotations

import torch
from conftest import fresh_digits_lenet

from autoprune.engine import Recipe, evaluate_split
from autoprune.graph import build_channel_graph
from autoprune.pruning.runner import COLLAPSE_DROP, _BestEpoch, prune_and_finetune

TARGETS = {"conv1": 0.5, "conv2": 0.8, "fc1": 0.9, "fc2": 0.5}
PRUNE = Recipe(epochs=0, lr=0.02, batch_size=64)


def _prune(pretrained, digits, finetune: Recipe):
    model = fresh_digits_lenet(pretrained)
    graph = build_channel_graph(model, digits.example())
    snapshots: list[dict[str, torch.Tensor]] = []

    def watch(rec: dict) -> None:
        if rec["phase"] == "finetune":
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    res = prune_and_finetune(model, digits, graph, "magnitude", TARGETS, {"gradual": False},
                             PRUNE, finetune, seed=0, on_epoch=watch)
    return model, res, snapshots


def test_a_collapsed_retrain_ends_on_its_best_epoch(pretrained, digits):
    # a real collapse: the step schedule multiplies the rate by 60 after the first epoch
    # (lr 0.01 -> 0.6 with momentum), as a long retrain at a large searched rate can
    finetune = Recipe(epochs=3, lr=0.01, batch_size=64, schedule="step", milestones=[0.34],
                      gamma=60.0)
    model, res, snapshots = _prune(pretrained, digits, finetune)
    curve = [r["val_accuracy"] for r in res.history if r["phase"] == "finetune"]
    assert len(curve) == 3 and curve[0] > 0.7 and max(curve) - curve[-1] > 0.3, curve
    best = max(range(3), key=curve.__getitem__)
    assert res.kept_epoch == best
    for k, v in model.state_dict().items():  # the best epoch's weights, not the last's
        assert torch.equal(v, snapshots[best][k]), k
    assert evaluate_split(model, digits, "val") == curve[best]
    for name, mask in res.masks.items():  # zeros stay zero
        assert not model.get_parameter(name)[~mask.bool()].any(), name


def test_a_healthy_retrain_keeps_its_last_epoch(pretrained, digits):
    finetune = Recipe(epochs=3, lr=0.02, batch_size=64)
    model, res, snapshots = _prune(pretrained, digits, finetune)
    curve = [r["val_accuracy"] for r in res.history if r["phase"] == "finetune"]
    assert max(curve) - curve[-1] <= COLLAPSE_DROP, curve
    assert res.kept_epoch == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[-1][k]), k


def test_a_dip_within_the_tolerance_is_noise():
    model = torch.nn.Linear(2, 2)
    guard = _BestEpoch(model)
    guard.see({"val_accuracy": 0.90, "epoch": 0})
    with torch.no_grad():
        model.weight.add_(1.0)
    after = model.weight.clone()
    guard.see({"val_accuracy": 0.90 - COLLAPSE_DROP / 2, "epoch": 1})
    assert guard.keep() == 1 and torch.equal(model.weight, after)
