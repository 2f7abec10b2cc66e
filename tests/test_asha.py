"""Early stopping by default: ASHA compares pruned models at equal fine-tune epochs only."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import optuna
import pytest
from mlflow import MlflowClient
from ray.tune.schedulers import TrialScheduler

from autoprune import store
from autoprune.orchestration.options import SearchOptions, resume_hint
from autoprune.orchestration.scheduler import (
    BASELINE_KEY,
    RUNG_KEY,
    SIZE_KEY,
    STOPPED_ATTR,
    SizeAwareASHA,
    continues,
    make_scheduler,
    max_finetune_epochs,
    rung_epoch,
)
from autoprune.orchestration.space_schema import Dist

# ADMM: two prune-phase epochs on a nearly dense model, then 3 fine-tune epochs
ADMM_SPACE = """
methods:
  admm:
    rho: 1.0e-3
    admm_iters: 2
    epochs_per_iter: 1
finetune:
  epochs: 3
sparsity:
  target_floor: 0.6
"""


def _reports(tmp_path, monkeypatch) -> list[dict]:
    """What one ADMM trial reports, captured at trial.py's `_report` seam."""
    from autoprune.orchestration import trial
    from autoprune.orchestration.space import SearchSpace
    from autoprune.study import load_study

    space_file = tmp_path / "space.yaml"
    space_file.write_text(ADMM_SPACE)
    space = SearchSpace.load(space_file).for_budget(False)
    ctx = trial.TrialContext(study=load_study("digits-lenet"), space=space, out=str(tmp_path),
                             study_dir=str(tmp_path / "s"), budget="params=0.5", data_root=None,
                             seed=0, cpus=1)
    layers = trial.workbench(ctx).layers
    ot = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    config = {**space.suggest(ot, layers), **ot.params}
    seen: list[dict] = []
    monkeypatch.setattr(trial, "_report", lambda metrics, checkpoint=None: seen.append(metrics))
    monkeypatch.setattr(trial, "_get_checkpoint", lambda: None)
    final = trial._run(config, ctx, 0)
    assert final["is_final"] and final["budget_violation"] <= 1e-9
    return seen


def test_asha_sees_fine_tune_epochs_of_pruned_models_only(tmp_path, monkeypatch):
    seen = _reports(tmp_path, monkeypatch)
    phases = [r["phase"] for r in seen]
    assert phases == ["prune", "prune", "pruned", "finetune", "finetune", "finetune"]
    # only fine-tune epochs carry the rung key, the last one not (it has nothing left to save)
    assert [r.get(RUNG_KEY) for r in seen] == [None, None, None, 1, 2, None]
    assert all(r["is_final"] is False for r in seen)
    # each rung report says how much of the budget the plan uses (its projected target)
    shares = [r[SIZE_KEY] for r in seen if RUNG_KEY in r]
    assert len(shares) == 2 and 0.55 < shares[0] <= 1.0 + 1e-9 and shares[0] == shares[1]

    # Fed to the scheduler of a default search: the prune-phase reports are not compared. A
    # second trial whose near-dense ADMM epochs look far worse is not stopped for them.
    sched = make_scheduler(SearchOptions().scheduler, 3)
    assert sched is not None
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    sched.on_trial_add(None, a)
    sched.on_trial_add(None, b)
    worse = [{**r, "val_accuracy": 0.0} if r["phase"] != "finetune" else r for r in seen]
    for trial, reports in ((a, seen), (b, worse)):
        actions = [sched.on_trial_result(None, trial, r) for r in reports]
        assert actions == [TrialScheduler.CONTINUE] * len(reports)
    rungs = {m: sorted(a for a, _ in rec.values()) for m, rec in sched.rungs.items()}
    ft = [r["val_accuracy"] for r in seen if r.get(RUNG_KEY)]
    assert rungs[1] == [ft[0]] * 2 and rungs[2] == [ft[1]] * 2  # fine-tune values only
    # and a trial below the bar at fine-tune epoch 1 is stopped
    c = SimpleNamespace(trial_id="c")
    sched.on_trial_add(None, c)
    low = {**seen[3], "val_accuracy": ft[0] - 0.5}
    assert sched.on_trial_result(None, c, low) == TrialScheduler.STOP


def test_a_trial_is_compared_only_with_trials_no_larger_than_it():
    # Ray's ASHA would stop every one of the smaller trials below: each is less accurate than
    # the full-budget ones. Here each goes on unless smaller models beat it.
    full, big_worse = (0.90, 1.0), (0.85, 1.0)
    assert continues(*full, [])
    assert not continues(*big_worse, [full])  # equal size: the classic rule
    assert continues(0.80, 0.70, [full, big_worse])  # nothing as small: goes on
    assert continues(0.70, 0.65, [full, big_worse, (0.80, 0.70)])
    assert not continues(0.75, 0.72, [full, (0.80, 0.70)])  # a smaller one is more accurate
    assert continues(0.75, 0.72, [full, (0.70, 0.70), (0.60, 0.50)])  # it beats the smaller
    # a full-budget trial is compared with all: beaten by half of them, it stops
    assert not continues(0.79, 1.0, [full, (0.80, 0.70), (0.60, 0.50)])
    assert continues(0.85, 0.999, [(0.85, 1.0), (0.80, 1.0)])  # equal within the tolerance


def test_size_aware_asha_stops_the_dominated_and_keeps_the_front():
    sched = SizeAwareASHA(max_t=4)
    results = {"a": (0.90, 1.0), "b": (0.85, 1.0), "c": (0.80, 0.7), "d": (0.75, 0.72)}
    actions = {}
    for tid, (acc, share) in results.items():
        t = SimpleNamespace(trial_id=tid)
        sched.on_trial_add(None, t)
        actions[tid] = sched.on_trial_result(None, t, {RUNG_KEY: 1, "val_accuracy": acc,
                                                       SIZE_KEY: share})
    assert actions == {"a": TrialScheduler.CONTINUE, "b": TrialScheduler.STOP,
                       "c": TrialScheduler.CONTINUE, "d": TrialScheduler.STOP}
    assert sched.stopped == 2 and set(sched.rungs[1]) == set(results)
    # judged once per rung: a's second report at epoch 1 is not compared again
    a = SimpleNamespace(trial_id="a")
    assert sched.on_trial_result(None, a, {RUNG_KEY: 1, "val_accuracy": 0.0,
                                           SIZE_KEY: 1.0}) == TrialScheduler.CONTINUE
    # at the next rung the survivors meet again: c, smaller, goes on though less accurate
    assert sched.on_trial_result(None, a, {RUNG_KEY: 2, "val_accuracy": 0.91,
                                           SIZE_KEY: 1.0}) == TrialScheduler.CONTINUE
    c = SimpleNamespace(trial_id="c")
    assert sched.on_trial_result(None, c, {RUNG_KEY: 2, "val_accuracy": 0.82,
                                           SIZE_KEY: 0.7}) == TrialScheduler.CONTINUE
    # results without the rung key (prune phase, final result) are never compared
    assert sched.on_trial_result(None, c, {"val_accuracy": 0.0}) == TrialScheduler.CONTINUE


def test_an_enqueued_baseline_sets_the_bar_but_is_never_stopped():
    # At params=0.05 on digits ASHA stopped 5-6 of the 8 baselines per seed, mostly at their
    # first rung; spared, one became the pick of seed 1 (ninth and tenth runs).
    sched = SizeAwareASHA(max_t=4)
    lead = SimpleNamespace(trial_id="lead", config={})
    base = SimpleNamespace(trial_id="base", config={BASELINE_KEY: True})
    weak = SimpleNamespace(trial_id="weak", config={})
    for epoch in (1, 2):
        assert sched.on_trial_result(None, lead, {RUNG_KEY: epoch, "val_accuracy": 0.90,
                                                  SIZE_KEY: 1.0}) == TrialScheduler.CONTINUE
    # in the lower half at epochs 1 and 2, the baseline goes on both times
    for epoch in (1, 2):
        assert sched.on_trial_result(None, base, {RUNG_KEY: epoch, "val_accuracy": 0.50,
                                                  SIZE_KEY: 1.0}) == TrialScheduler.CONTINUE
    assert sched.stopped == 0 and sched.spared == 2
    assert sched.rungs[1]["base"] == (0.50, 1.0)  # recorded: it still sets the bar
    # a sampled trial as weak as the baseline was is stopped as before
    assert sched.on_trial_result(None, weak, {RUNG_KEY: 1, "val_accuracy": 0.40,
                                              SIZE_KEY: 1.0}) == TrialScheduler.STOP
    assert sched.stopped == 1


def test_the_searcher_marks_enqueued_baselines_in_their_config():
    from autoprune.orchestration.baselines import enqueue_baselines
    from autoprune.orchestration.searcher import TRIAL_NUMBER_KEY, PruningSearch

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s",
                                directions=["maximize", "minimize"])
    assert enqueue_baselines(study, [{"x": 0.5}], limit=1) == 1

    def space(trial):
        trial.suggest_float("x", 0.0, 1.0)

    searcher = PruningSearch(space=space, metric=["val_accuracy", "flops_frac"],
                             mode=["max", "min"], storage=storage, study_name="s",
                             sampler=optuna.samplers.RandomSampler(seed=0))
    first, second = searcher.suggest("t0"), searcher.suggest("t1")
    assert first == {"x": 0.5, TRIAL_NUMBER_KEY: 0, BASELINE_KEY: True}
    assert BASELINE_KEY not in second and second[TRIAL_NUMBER_KEY] == 1


def test_rungs_leave_out_infeasible_trials_and_last_epochs():
    rec = {"phase": "finetune", "epoch": 0}
    assert rung_epoch(rec, 4, feasible=True) == 1
    assert rung_epoch(rec, 4, feasible=False) is None  # over budget: never sets the bar
    assert rung_epoch({"phase": "prune", "epoch": 0}, 4, True) is None
    assert rung_epoch({"phase": "finetune", "epoch": 3}, 4, True) is None  # its last epoch
    assert rung_epoch({"phase": "finetune", "epoch": 2}, 2.5, True) is None  # 3 records
    assert rung_epoch({"phase": "finetune", "epoch": 1}, 2.5, True) == 2


def test_max_t_covers_the_longest_searched_fine_tune():
    assert max_finetune_epochs(4, None) == 4
    assert max_finetune_epochs(4, Dist("fixed", value=2)) == 2
    assert max_finetune_epochs(4, Dist("int", low=1, high=8)) == 8
    assert max_finetune_epochs(4, Dist("float", low=0.5, high=2.5)) == 3
    assert max_finetune_epochs(4, Dist("categorical", choices=(1, 6, 3))) == 6
    # one fine-tune epoch (or none): nothing to compare, no scheduler, no crash
    assert make_scheduler("asha", 1) is None and make_scheduler("asha", 0) is None
    assert make_scheduler("none", 8) is None
    assert make_scheduler("asha", 8).max_t == 8
    assert sorted(make_scheduler("asha", 8).rungs) == [1, 2, 4]  # never at max_t itself
    assert make_scheduler("asha", 8, trial_workers=2) is None  # data-parallel: off


def test_asha_is_the_default_and_none_is_repeated_on_resume(tmp_path):
    assert SearchOptions().scheduler == "asha"
    assert "--scheduler" not in resume_hint(SearchOptions())
    assert "--scheduler none" in resume_hint(SearchOptions(scheduler="none"))
    assert SearchOptions().objective == "accuracy"
    assert "--objective" not in resume_hint(SearchOptions())
    assert "--objective front" in resume_hint(SearchOptions(objective="front"))
    from autoprune.errors import UserError
    from autoprune.orchestration.orchestrator import search

    with pytest.raises(UserError, match="unknown objective 'speed'"):
        search(SearchOptions(objective="speed", out=str(tmp_path)))
    assert not any(tmp_path.iterdir())  # refused before anything was written
    from autoprune.cli import build_parser

    args = build_parser().parse_args(["search"])
    assert args.scheduler == "asha" and args.objective == "accuracy"


def test_tpe_samples_after_pruned_trials_of_a_multi_objective_study():
    """Optuna's TPE on a 3-objective study with PRUNED trials (no values, no intermediate
    values): it samples on, and ranks them after the completed ones (not as good points)."""
    from optuna.samplers._tpe.sampler import _split_trials

    from autoprune.orchestration.options import make_sampler

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                sampler=make_sampler("tpe", 0))
    for i in range(12):
        t = study.ask()
        x = t.suggest_float("x", 0, 1)
        if i % 2:
            study.tell(t, None, state=optuna.trial.TrialState.PRUNED)
        else:
            t.set_constraint("budget", 0.0)
            study.tell(t, [x, 1 - x, 0.5])
    for _ in range(3):
        t = study.ask()
        t.suggest_float("x", 0, 1)
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                      optuna.trial.TrialState.PRUNED))
    below, _ = _split_trials(study, trials, 2)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in below)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.best_trials)


# One-shot magnitude, then 3 fine-tune epochs at a searched learning rate: at 1e-5 the pruned
# model does not recover (clearly bad), at 0.05 it does.
STOP_SPACE = """
methods:
  magnitude:
    gradual: false
    epochs: 0
finetune:
  epochs: 3
  lr: {choices: [1.0e-5, 0.05]}
sparsity:
  target_floor: 0.6
"""


def test_a_resumed_scheduler_compares_new_trials_with_the_earlier_ones():
    # what a resumed search's ASHA starts from: the rung results its first run recorded
    history = [{1: (0.90, 1.0), 2: (0.92, 1.0)}, {1: (0.85, 0.7)}, {3: (0.5, 0.5)}]
    fresh, resumed = SizeAwareASHA(max_t=4), SizeAwareASHA(max_t=4)
    assert resumed.restore(history) == 2  # epoch 3 is no rung below max_t=4
    assert len(resumed.rungs[1]) == 2 and len(resumed.rungs[2]) == 1
    new = SimpleNamespace(trial_id="new")
    result = {RUNG_KEY: 1, "val_accuracy": 0.80, SIZE_KEY: 0.72}
    assert fresh.on_trial_result(None, new, result) == TrialScheduler.CONTINUE
    # an earlier trial no larger than it (0.7 of the budget) was more accurate: it stops
    assert resumed.on_trial_result(None, new, result) == TrialScheduler.STOP


def test_rung_history_reads_what_trials_recorded():
    study = optuna.create_study(directions=["maximize", "minimize"])
    pruned, failed = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL
    for attrs, state in (({store.RUNGS_ATTR: {"1": [0.9, 1.0], "2": [0.93, 1.0]}}, pruned),
                         ({}, pruned), ({store.RUNGS_ATTR: {"1": [0.7, 0.6]}}, pruned),
                         # killed mid-run: a resumed search runs it again, so it is left out
                         ({store.RUNGS_ATTR: {"1": [0.99, 0.5]}, store.KILLED_ATTR: True},
                          failed)):
        t = study.ask()
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        study.tell(t, state=state)
    assert store.rung_history(study) == [{1: (0.9, 1.0), 2: (0.93, 1.0)}, {1: (0.7, 0.6)}]


def test_default_search_stops_weak_trials_early(ray_session, tmp_path):
    from autoprune.orchestration.orchestrator import search

    space = tmp_path / "space.yaml"
    space.write_text(STOP_SPACE)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("autoprune")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:  # one trial at a time: the rung comparisons are the same on every run
        summary = search(SearchOptions(study="digits-lenet", space=str(space), budget="flops=0.4",
                                       trials=8, workers=1, out=str(tmp_path / "runs"), seed=0,
                                       baselines=False, finalists=0))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    study = optuna.load_study(study_name="digits-lenet",
                              storage=f"sqlite:///{tmp_path / 'runs/digits-lenet/optuna.db'}")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "no trial was stopped early"
    assert summary["trials_pruned"] == len(pruned)
    assert summary["trials_completed"] + len(pruned) == 8 and summary["trials_failed"] == 0
    assert {t.user_attrs[STOPPED_ATTR] for t in pruned} <= {1, 2}
    # Optuna gives a stopped trial of a one-objective study its last intermediate value
    assert all(t.values == [t.intermediate_values[max(t.intermediate_values)]] for t in pruned)
    assert not {t.number for t in pruned} & {p["trial"] for p in summary["pareto"]}
    assert any("stopped early by ASHA at fine-tune epoch" in ln for ln in lines)

    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name("digits-lenet")
    runs = {int(r.data.tags["autoprune.trial"]): r for r in client.search_runs(
        [exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]}
    for t in pruned:
        r = runs[t.number]
        k = t.user_attrs[STOPPED_ATTR]
        assert r.info.status == "KILLED" and "autoprune.error" not in r.data.tags
        assert f"stopped early by ASHA at fine-tune epoch {k}" in r.data.tags[
            "autoprune.stopped_early"]
        assert r.data.tags["mlflow.note.content"] == r.data.tags["autoprune.stopped_early"]
        assert r.data.tags.get("autoprune.pareto") != "true"
        curve = client.get_metric_history(r.info.run_id, "finetune/val_accuracy")
        assert len(curve) == k  # its fine-tune curve, up to the epoch it was stopped at
        # Optuna keeps the rung results a resumed search's ASHA starts from, the stopping
        # one included (Tune hands that one to the searcher only as the trial's end)
        rungs = t.user_attrs[store.RUNGS_ATTR]
        assert sorted(int(e) for e in rungs) == list(range(1, k + 1))
        assert [rungs[str(e)][0] for e in range(1, k + 1)] == \
            [m.value for m in sorted(curve, key=lambda m: m.step)]
        # the default single objective: TPE ranks stopped trials by these intermediate values
        assert t.intermediate_values == {e: rungs[str(e)][0] for e in range(1, k + 1)}
    finished = [r for r in runs.values() if r.info.status == "FINISHED"]
    assert len(finished) == summary["trials_completed"]
    assert all("autoprune.stopped_early" not in r.data.tags for r in finished)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.metrics["trials_stopped_early"] == len(pruned)
    assert json.loads(json.dumps(summary["pareto"]))  # the front is there

    # resumed for 2 more trials, its ASHA starts from every earlier trial's rungs
    earlier = len(store.rung_history(study))
    assert earlier >= len(pruned)
    lines.clear()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        search(SearchOptions(study="digits-lenet", space=str(space), budget="flops=0.4",
                             trials=10, workers=1, out=str(tmp_path / "runs"), seed=0,
                             baselines=False, finalists=0, resume=True))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert f"ASHA starts from the rung results of {earlier} earlier trial(s)" in lines


def test_reconcile_records_a_stopped_trial_as_stopped_not_interrupted(tmp_path):
    """A trial told PRUNED to Optuna but not yet in MLflow (the driver died in between) gets a
    KILLED run with the stopped-early note, not the "interrupted" error; it counts as done."""
    from autoprune.orchestration.resume import finished_count, open_storage, reconcile
    from autoprune.tracking import Tracker

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="s",
                                directions=["maximize", "minimize", "minimize"])
    t = study.ask()
    t.suggest_categorical("method", ["magnitude"])
    t.set_user_attr(STOPPED_ATTR, 2)
    study.tell(t, None, state=optuna.trial.TrialState.PRUNED)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "s", tmp_path / "art")
    parent = tracker.start_search({"study": "s"}, "flops=0.4", {"val_accuracy": 0.9})
    assert reconcile(study, storage, tracker, parent) == 1
    run = tracker.client.get_run(tracker._child_map(parent)[0])
    assert run.info.status == "KILLED" and "autoprune.error" not in run.data.tags
    assert run.data.tags["autoprune.stopped_early"].startswith(
        "stopped early by ASHA at fine-tune epoch 2")
    assert run.info.run_name.endswith("stopped early")
    assert finished_count(study) == 1


def test_a_trials_prior_strength_reaches_its_per_layer_targets(tmp_path, monkeypatch):
    """The searched `prior_strength` is what a trial prunes with: the same config at a
    stronger prior prunes the small conv1 less and the large fc1 more (caught where the trial
    hands its targets to the pipeline)."""
    from autoprune.orchestration import trial
    from autoprune.orchestration.space import SearchSpace
    from autoprune.study import load_study

    space = SearchSpace.from_dict({"methods": {"magnitude": {"gradual": False}}, "sparsity": {
        "target_floor": 1.0, "prior_strength": {"low": 0.0, "high": 1.5}}}).for_budget(False)
    ctx = trial.TrialContext(study=load_study("digits-lenet"), space=space, out=str(tmp_path),
                             study_dir=str(tmp_path / "s"), budget="weights=0.05",
                             data_root=None, seed=0, cpus=1)
    layers = trial.workbench(ctx).layers

    class Planned(Exception):
        pass

    def caught(wb, method, params, targets, **kw):
        raise Planned(targets)

    monkeypatch.setattr(trial, "run_pruning", caught)
    monkeypatch.setattr(trial, "_load_pruned", lambda fingerprint: None)
    plans = {}
    for s in (0.2, 1.2):
        config = {"method": "magnitude", "prior_strength": s, **{f"alloc.{n}": 0.5 for n in layers}}
        try:
            trial._run(config, ctx, 0)
        except Planned as p:
            plans[s] = p.args[0]
    assert plans[1.2]["conv1"] < plans[0.2]["conv1"] and plans[1.2]["fc1"] > plans[0.2]["fc1"]
