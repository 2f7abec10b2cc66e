"""End-to-end searches on the digits study with a real local Ray, Optuna storage and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from autoprune.budget import Budget
from autoprune.cli import main
from autoprune.orchestration.orchestrator import SearchOptions, search
from autoprune.pareto import front


@pytest.fixture(scope="module")
def finished_search(ray_session, tmp_path_factory, tiny_space):
    out = tmp_path_factory.mktemp("runs")
    opts = SearchOptions(study="digits-lenet", space=tiny_space, budget="flops=0.4", trials=4,
                         workers=2, out=str(out), seed=0, finalists=0)
    return out, opts, search(opts)


def test_search_meets_budget_and_front_is_non_dominated(finished_search):
    out, opts, summary = finished_search
    assert summary["trials_completed"] + summary["trials_failed"] + summary["trials_pruned"] == 4
    assert summary["trials_completed"] >= 3
    budget = Budget.parse("flops=0.4")
    study = optuna.load_study(study_name="digits-lenet",
                              storage=f"sqlite:///{out / 'digits-lenet' / 'optuna.db'}")
    # the sampler optimises accuracy within the budget (a constraint), not size
    assert study.user_attrs["objectives"] == [["val_accuracy", "max"]]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in complete:  # every completed trial is within the budget by construction
        flops = t.user_attrs["flops_frac"]
        assert len(t.values) == 1 and t.constraints["budget"] <= 0
        assert budget.satisfied({"flops": flops, "params": t.user_attrs["params_frac"]})
        # flops= is the compacted model's: only whole-filter pruning is sampled, and the
        # physically compacted copy measures what was counted
        assert t.user_attrs["granularity"] == "filter"
        assert t.user_attrs["compact_flops_frac"] == pytest.approx(flops, abs=1e-9)
        assert t.user_attrs["sparse_flops_frac"] <= flops + 1e-12
    pts = summary["pareto"]
    assert pts and all(p["feasible"] for p in pts)
    assert sorted(front(pts)) == list(range(len(pts)))  # nothing on the front dominates another
    assert summary["best"]["val_accuracy"] == max(p["val_accuracy"] for p in pts)
    assert summary["best"]["trial"] in {p["trial"] for p in pts}  # best is a point of the front


def test_mlflow_has_parent_and_one_child_per_trial(finished_search):
    out, _, summary = finished_search
    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name("digits-lenet")
    runs = client.search_runs([exp.experiment_id])
    parent = summary["parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 4
    trials = sorted(int(r.data.tags["autoprune.trial"]) for r in children)
    assert trials == [0, 1, 2, 3]
    on_front = {int(r.data.tags["autoprune.trial"]) for r in children
                if r.data.tags.get("autoprune.pareto") == "true"}
    assert on_front == {p["trial"] for p in summary["pareto"]}
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert all("val_accuracy" in r.data.metrics and "flops_frac" in r.data.metrics
               for r in finished)


def test_resume_extends_without_repeating(finished_search, capsys):
    out, opts, _ = finished_search
    rc = main(["search", "--study", "digits-lenet", "--space", opts.space, "--budget",
               "flops=0.4", "--trials", "5", "--out", str(out), "--resume", "--finalists", "0",
               "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    study = optuna.load_study(study_name="digits-lenet",
                              storage=f"sqlite:///{out / 'digits-lenet' / 'optuna.db'}")
    numbers = [t.number for t in study.trials]
    assert numbers == sorted(set(numbers)) and len(numbers) == 5
    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name("digits-lenet")
    parents = [r for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("autoprune.role") == "search"]
    assert len(parents) == 1  # the parent run is reused
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 5


def test_second_search_without_resume_is_refused(finished_search, capsys):
    out, opts, _ = finished_search
    rc = main(["search", "--space", opts.space, "--out", str(out), "--trials", "2"])
    assert rc == 2
    assert "--resume" in capsys.readouterr().err


def test_best_point_rerun_command_repeats_its_plan(finished_search, tmp_path, capsys):
    """The best point carries the `autoprune prune` command that reruns it alone."""
    import shlex

    _, _, summary = finished_search
    best = summary["best"]
    argv = shlex.split(best["rerun"])
    assert argv[:2] == ["autoprune", "prune"] and "--layer-sparsity" in argv
    rc = main([*argv[1:], "--out", str(tmp_path), "--json"])
    assert rc == 0
    rerun = json.loads(capsys.readouterr().out)
    assert rerun["method"] == best["method"]
    assert rerun["within_budget"]
    # the same per-layer plan, hence the same size (the run seed differs from the trial's)
    assert rerun["targets"] == pytest.approx(best["layer_sparsity"], abs=1e-6)
    assert rerun["params_frac"] == pytest.approx(best["params_frac"], abs=1e-3)


def test_relative_data_root_reaches_the_workers(ray_session, mnist_root, tmp_path, monkeypatch,
                                                tiny_space):
    """`--data-root ../data` is relative to the user's shell; Ray workers run elsewhere."""
    import os

    study = tmp_path / "mnist-small.yaml"
    study.write_text("model: lenet300\ndataset: mnist\ndata: {train_subset: 600}\n"
                     "dense: {epochs: 1, optimizer: adam, lr: 1e-3}\n"
                     "prune: {optimizer: adam, lr: 1e-3}\n"
                     "finetune: {epochs: 1, optimizer: adam, lr: 1e-3}\n")
    root = Path(mnist_root).resolve()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("AUTOPRUNE_DATA", raising=False)
    relative = os.path.relpath(root, work)
    summary = search(SearchOptions(study=str(study), space=tiny_space, budget="flops=0.5",
                                   trials=2, workers=2, out="runs", data_root=relative,
                                   finalists=0))
    assert summary["errors"] == [] and summary["trials_completed"] == 2, summary["errors"]


def test_time_limit_stops_and_resume_finishes(ray_session, tmp_path, tiny_space, capsys):
    """A search cut by --time-limit says so, records its stopped trials as killed (so they do
    not count towards --trials), and --resume finishes the budgeted number."""
    args = ["search", "--space", tiny_space, "--budget", "flops=0.4", "--out", str(tmp_path),
            "--finalists", "0"]
    rc = main([*args, "--trials", "3", "--time-limit", "1s"])
    err = capsys.readouterr().err
    assert "--time-limit reached" in err and "--resume" in err
    storage = f"sqlite:///{tmp_path / 'digits-lenet' / 'optuna.db'}"
    trials = optuna.load_study(study_name="digits-lenet", storage=storage).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert rc == (0 if done else 1)
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
               for t in trials)
    rc = main([*args, "--trials", "3", "--resume", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials_completed"] == 3 and not summary["time_limit_reached"]



def test_time_limit_without_trials_runs_until_the_time_is_up(ray_session, tmp_path, tiny_space,
                                                              capsys):
    """--time-limit with no --trials keeps starting trials past the study's count until the
    time is up (Optuna's optimize(timeout=...)); ending on the limit is its plan, not a cut."""
    from autoprune.paths import STUDIES_DIR

    study = tmp_path / "digits-two.yaml"  # a study that asks for 2 trials
    study.write_text((STUDIES_DIR / "digits-lenet.yaml").read_text()
                     .replace("trials: 16", "trials: 2"))
    rc = main(["search", "--study", str(study), "--space", tiny_space, "--budget", "flops=0.4",
               "--out", str(tmp_path / "runs"), "--time-limit", "45s", "--finalists", "0",
               "--json"])  # 45 s: room for a third trial on a loaded 2-core machine
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    trials = optuna.load_study(
        study_name="digits-lenet",
        storage=f"sqlite:///{tmp_path / 'runs' / 'digits-lenet' / 'optuna.db'}").trials
    assert len(trials) > 2  # past the study's count
    assert summary["open_ended"] and summary["time_limit_reached"]
    assert summary["resume_hint"] is None and "ran for its --time-limit" in captured.err
    # not Ray Tune's banner, whose trial count for an open-ended search is sys.maxsize
    assert "9223372036854775807" not in captured.err and "TensorBoard" not in captured.err
    assert rc == 0 and summary["trials_completed"] >= 1
    assert trials[0].user_attrs.get("baseline") is True  # still starts from a hand baseline
    # --resume runs another such window: more trials, none repeated, the same parent run
    rc = main(["search", "--study", str(study), "--space", tiny_space, "--budget", "flops=0.4",
               "--out", str(tmp_path / "runs"), "--time-limit", "15s", "--finalists", "0",
               "--resume", "--json"])
    again = json.loads(capsys.readouterr().out)
    after = optuna.load_study(
        study_name="digits-lenet",
        storage=f"sqlite:///{tmp_path / 'runs' / 'digits-lenet' / 'optuna.db'}").trials
    assert rc == 0 and len(after) > len(trials)
    assert sorted(t.number for t in after) == list(range(len(after)))
    assert again["parent_run_id"] == summary["parent_run_id"]


def test_an_open_ended_search_resumes_as_one():
    """Interrupted, a time-limited search without --trials is told to resume with its window
    (not the study's trial count); one with --trials keeps counting trials."""
    from autoprune.orchestration.options import parse_duration, resume_hint

    hint = resume_hint(SearchOptions(time_limit=parse_duration("14m")))
    assert "--time-limit 840s" in hint and "--trials" not in hint
    assert parse_duration("840s") == 840
    hint = resume_hint(SearchOptions(trials=5, time_limit=840.0))
    assert "--trials 5" in hint and "--time-limit" not in hint


def test_first_trials_are_the_enqueued_hand_baselines(finished_search):
    """A new search starts from what a user would try by hand: magnitude pruning (one-shot, then
    AGP) at the full budget with the size-prior split, the strongest (half the trials at most:
    the uniform split's come after them and are cut here)."""
    out, _, _ = finished_search
    study = optuna.load_study(study_name="digits-lenet",
                              storage=f"sqlite:///{out / 'digits-lenet' / 'optuna.db'}")
    first = sorted(study.trials, key=lambda t: t.number)[:2]
    assert [t.params["magnitude.gradual"] for t in first] == [False, True]
    for t in first:
        assert t.user_attrs.get("baseline") is True
        assert t.params["method"] == "magnitude" and t.params["target"] == 1.0
        size = {v for k, v in t.params.items() if k.startswith("alloc.")}
        assert size == {0.5}  # the size prior itself
    assert not any(t.user_attrs.get("baseline") for t in study.trials if t.number >= 2)
