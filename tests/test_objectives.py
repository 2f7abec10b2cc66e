"""The sampler optimises accuracy within the budget (or, with `--objective front`, accuracy and
the budget's kinds), and a study keeps the objectives it was made with.

Why it matters: with size objectives TPE's good trials come from the non-dominated front, which
fills with small weak trials (docs/benchmarks.md, eleventh runs); under `weights=` a FLOPs
objective made every filter-pruned trial a front point (eighth runs).
"""

from __future__ import annotations

import logging

import optuna
import pytest

from autoprune.budget import Budget
from autoprune.names import OBJECTIVES
from autoprune.orchestration.resume import OBJECTIVES_ATTR, prepare_optuna
from autoprune.record import TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize(("text", "want"), [
    ("flops=0.4", ["flops_frac"]),
    ("weights=0.01405", ["weights_frac"]),
    ("params=0.05", ["params_frac"]),
    ("sparse_flops=0.3", ["sparse_flops_frac"]),
    ("weights=0.1,flops=0.5", ["flops_frac", "weights_frac"]),  # canonical kind order
])
def test_front_objectives_are_accuracy_and_the_budgeted_kinds(text, want):
    assert Budget.parse(text).objectives() == (("val_accuracy", "max"),)
    objectives = Budget.parse(text).objectives(front=True)
    assert objectives[0] == ("val_accuracy", "max")
    assert [k for k, _ in objectives[1:]] == want
    assert all(m == "min" for _, m in objectives[1:])


def _storage(tmp_path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")


def test_a_new_study_optimises_the_budget_and_keeps_it_on_resume(tmp_path, caplog):
    storage = _storage(tmp_path)
    weights = Budget.parse("weights=0.01405").objectives(front=True)
    study, objectives = prepare_optuna(storage, "s", optuna.samplers.RandomSampler(), weights)
    assert objectives == weights and len(study.directions) == 2
    assert study.user_attrs[OBJECTIVES_ATTR] == [["val_accuracy", "max"], ["weights_frac", "min"]]
    # resumed under another budget: Optuna cannot change directions, so the study's own stay
    flops = Budget.parse("flops=0.4,params=0.3").objectives(front=True)
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        _, again = prepare_optuna(storage, "s", optuna.samplers.RandomSampler(), flops)
    assert again == weights
    assert "weights_frac" in caplog.text


def test_a_study_made_before_the_change_keeps_accuracy_flops_params(tmp_path):
    storage = _storage(tmp_path)
    old = optuna.create_study(storage=storage, study_name="s",
                              directions=["maximize", "minimize", "minimize"])
    t = old.ask()
    t.set_user_attr("method", "magnitude")
    old.tell(t, [0.97, 0.4, 0.3])
    study, objectives = prepare_optuna(storage, "s", optuna.samplers.RandomSampler(),
                                       Budget.parse("flops=0.4").objectives())
    assert objectives == OBJECTIVES
    rec = TrialRecord.from_optuna(study.trials[0])  # fractions read from the old values
    assert (rec.val_accuracy, rec.flops_frac, rec.params_frac) == (0.97, 0.4, 0.3)


def test_record_reads_fractions_from_attributes_when_values_are_the_budget_kinds(tmp_path):
    study, _ = prepare_optuna(_storage(tmp_path), "s", optuna.samplers.RandomSampler(),
                              Budget.parse("weights=0.01405").objectives(front=True))
    t = study.ask()
    for key, value in {"flops_frac": 1.0, "params_frac": 0.02, "weights_frac": 0.014}.items():
        t.set_user_attr(key, value)
    study.tell(t, [0.99, 0.014])
    rec = TrialRecord.from_optuna(study.trials[0])
    assert (rec.val_accuracy, rec.flops_frac, rec.params_frac, rec.weights_frac) == (
        0.99, 1.0, 0.02, 0.014)


def test_a_new_study_optimises_accuracy_alone_by_default_and_keeps_it_on_resume(tmp_path,
                                                                                caplog):
    storage = _storage(tmp_path)
    study, objectives = prepare_optuna(storage, "s", optuna.samplers.RandomSampler(),
                                       Budget.parse("weights=0.01405").objectives())
    assert objectives == (("val_accuracy", "max"),) and len(study.directions) == 1
    t = study.ask()
    for key, value in {"flops_frac": 1.0, "params_frac": 0.02, "weights_frac": 0.014}.items():
        t.set_user_attr(key, value)
    study.tell(t, 0.99)
    rec = TrialRecord.from_optuna(study.trials[0])  # the fractions are attributes
    assert (rec.val_accuracy, rec.params_frac, rec.weights_frac) == (0.99, 0.02, 0.014)
    front = Budget.parse("weights=0.01405").objectives(front=True)
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        _, again = prepare_optuna(storage, "s", optuna.samplers.RandomSampler(), front)
    assert again == objectives and "weights_frac" in caplog.text


def _good_set(directions: list[str], n_good: int) -> set[int]:
    """The trials TPE models as good (its "below" set) in a study of in-budget trials where
    a bigger model is more accurate, plus one over-budget trial."""
    from optuna.samplers._tpe.sampler import _split_trials

    study = optuna.create_study(directions=directions)
    # (val accuracy, weights_frac) at a budget of 0.014: trial 4 is small and weak, trial 5
    # is the most accurate but over the budget
    points = [(0.985, 0.0140), (0.984, 0.0139), (0.975, 0.0120), (0.960, 0.0110),
              (0.925, 0.0096), (0.990, 0.0200)]
    for val, frac in points:
        t = study.ask()
        t.set_constraint("budget", frac - 0.014)
        study.tell(t, [val, frac][:len(directions)])
    below, _ = _split_trials(study, study.get_trials(), n_good)
    return {t.number for t in below}


def test_tpe_learns_from_the_most_accurate_in_budget_trials_not_the_smallest():
    assert _good_set(["maximize"], 2) == {0, 1}
    # with a size objective the small weak trial is as "good" as the best (the dilution)
    assert 4 in _good_set(["maximize", "minimize"], 2)
