"""The one record of a trial and the one place that reads the stores (store.py), the test hook
of the trial path, and the shape of the package (one concept per module)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import optuna
import pytest

import autoprune
from autoprune import store
from autoprune.orchestration.faults import Faults
from autoprune.record import TrialRecord
from autoprune.tracking import Tracker

optuna.logging.set_verbosity(optuna.logging.WARNING)
PACKAGE = Path(autoprune.__file__).resolve().parent


def _study_with_two_trials() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for number, (values, violation) in enumerate((([0.9, 0.4, 0.5], 0.0),
                                                  ([0.95, 0.6, 0.7], 0.2))):
        t = study.ask()
        t.set_user_attr("method", "admm")
        t.set_user_attr("hparams", json.dumps({"rho": 0.01}))
        t.set_user_attr("targets", json.dumps({"conv1": 0.5, "fc1": 0.8}))
        t.set_user_attr("finetune_overrides", json.dumps({}))
        t.set_user_attr("granularity", "weight")
        t.set_user_attr("test_accuracy", values[0] - 0.01)
        t.set_user_attr("checkpoint", f"/x/trial-{number}.pt")
        t.set_constraint("budget", violation)
        study.tell(t, values)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # not a record
    return study


def test_trial_records_are_read_back_typed_from_optuna():
    records = store.trial_records(_study_with_two_trials())
    assert [r.trial for r in records] == [0, 1]
    first, second = records
    assert isinstance(first, TrialRecord)
    assert (first.val_accuracy, first.flops_frac, first.params_frac) == (0.9, 0.4, 0.5)
    assert first.layer_sparsity == {"conv1": 0.5, "fc1": 0.8} and first.finetune == {}
    assert first.hyperparameters() == {"rho": 0.01} and first.granularity == "weight"
    assert first.feasible and not second.feasible and second.budget_violation == 0.2
    point = first.as_point()  # what --json and the tables show
    assert point["layer_sparsity"] == {"conv1": 0.5, "fc1": 0.8} and point["feasible"] is True
    assert "granularity" not in point and "budget_violation" not in point
    assert first.metrics() == {"val_accuracy": 0.9, "flops_frac": 0.4, "params_frac": 0.5,
                               "test_accuracy": pytest.approx(0.89),
                               "budget_violation": 0.0}


def test_store_parses_and_builds_sqlite_uris(tmp_path):
    uri = store.sqlite_uri(tmp_path / "a.db")
    assert uri == f"sqlite:///{tmp_path / 'a.db'}" and store.sqlite_file(uri) == tmp_path / "a.db"
    assert store.sqlite_file("postgresql://u:p@h/db") is None
    assert store.default_artifact_root(store.default_tracking_uri(tmp_path)) == \
        tmp_path / "mlartifacts"
    assert store.optuna_url(tmp_path) == store.sqlite_uri(tmp_path / "optuna.db")
    assert store.redact("postgresql://user:secret@host/db") == "postgresql://user:***@host/db"


def test_the_run_of_a_trial_is_found_by_its_tags(tmp_path):
    tracker = Tracker(store.default_tracking_uri(tmp_path), "s")
    parent = tracker.start_search({"study": "s"}, "flops=0.5", {})
    rid = tracker.log_trial(parent, 3, "magnitude", {}, {"val_accuracy": 0.5})
    client, exp = tracker.client, tracker.experiment_id
    assert {n: r.info.run_id for n, r in store.child_runs(client, exp, parent).items()} == \
        {3: rid}
    assert store.trial_run(client, exp, 3, parent_id=parent) == rid
    assert store.trial_run(client, exp, 3, run_id="no-such-run") == rid  # falls back to tags
    assert store.trial_run(client, exp, 4, parent_id=parent) is None


def test_fault_hook_is_inert_unless_asked(tmp_path):
    Faults.from_env({}).on_start(2)
    Faults.from_env({}).on_epoch(2, "finetune", str(tmp_path))
    faults = Faults.from_env({"AUTOPRUNE_TEST_RAISE_TRIAL": "2"})
    faults.on_start(1)
    with pytest.raises(RuntimeError, match="injected failure of trial 2"):
        faults.on_start(2)


def _imports(path: Path) -> set[str]:
    """Every module name an import statement of `path` mentions (relative ones with dots)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_modules_are_small_and_only_orchestration_knows_the_orchestrator():
    for path in PACKAGE.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path
        if "orchestration" not in path.parts:
            assert not any("orchestrator" in name for name in _imports(path)), path
