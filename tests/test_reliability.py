"""Faults during a search: a trial's worker killed, trials that diverge or raise, Ctrl-C, the
driver killed with SIGKILL, two searches on one study folder.

Every test runs a real (tiny) search on the offline digits study with real Ray, Optuna and
MLflow, then checks that the three stores agree: each Optuna trial has exactly one MLflow child
run whose status matches, nothing is left RUNNING, no trial is recorded twice. In-process
searches share the session Ray; the Ctrl-C and SIGKILL tests run `python -m autoprune search`
as a separate driver with its own local Ray (the session Ray of this process is left alone).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from conftest import QUICK_SPACE
from mlflow import MlflowClient
from optuna.trial import TrialState

from autoprune.cli import main
from autoprune.orchestration.orchestrator import SearchOptions, StudyLock, search

STUDY = "digits-lenet"
# A prune phase of one epoch (gradual magnitude), so a checkpoint sits between the two phases.
PHASED_SPACE = """
methods:
  magnitude:
    gradual: true
    epochs: 1
finetune:
  epochs: 2
sparsity:
  target_floor: 0.6
"""
# A learning rate of a million: the loss overflows in the first fine-tune epoch.
DIVERGING_SPACE = """
methods:
  magnitude:
    epochs: 0
finetune:
  epochs: 1
  lr: 1.0e+6
"""


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory) -> Path:
    """A `dense/` folder holding the study's trained baseline: copied into every new --out, so
    no test trains the dense model again (the cache is keyed by model, data and recipe)."""
    from autoprune.pipeline import Workbench
    from autoprune.study import load_study

    root = tmp_path_factory.getbasetemp() / "dense-digits"
    if not (root / "dense").exists():
        Workbench.open(load_study(STUDY), root, device="cpu")
    return root / "dense"


@pytest.fixture
def new_out(tmp_path, dense_cache) -> Path:
    out = tmp_path / "runs"
    shutil.copytree(dense_cache, out / "dense")
    return out


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def optuna_trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / STUDY / 'optuna.db'}")
    return study.get_trials(deepcopy=False)


def mlflow_runs(out: Path) -> tuple[list, list]:
    """(parent runs, child runs) of the study in the folder's MLflow store."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autoprune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    return parents, children


def assert_stores_agree(out: Path) -> tuple[list, list]:
    """One child run per Optuna trial, statuses matching, nothing RUNNING anywhere."""
    trials = optuna_trials(out)
    parents, children = mlflow_runs(out)
    assert len(parents) == 1, "one parent run per study folder"
    assert parents[0].info.status != "RUNNING"
    numbers = [int(r.data.tags["autoprune.trial"]) for r in children]
    assert sorted(numbers) == [t.number for t in trials], "each trial recorded exactly once"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    by_number = {int(r.data.tags["autoprune.trial"]): r for r in children}
    for t in trials:
        assert t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED), t
        expected = ("FINISHED" if t.state == TrialState.COMPLETE
                    else "KILLED" if t.user_attrs.get("killed") else "FAILED")
        assert by_number[t.number].info.status == expected, (t.number, t.state, t.user_attrs)
    return trials, children


def tune_trial_numbers(out: Path) -> list[int]:
    """Optuna numbers of the trials Tune ran, over every Tune experiment of the study."""
    return sorted(json.loads(p.read_text())["optuna_trial"]
                  for p in (out / STUDY / "tune").rglob("params.json"))


def assert_tune_agrees(out: Path, trials, done_before: dict) -> None:
    """Tune ran no trial twice and only Optuna's trials; every trial completed after the resume
    is in its records. (Tune persists a trial's records lazily: a SIGKILLed driver's may be
    lost, and a trial that was still pending at Ctrl-C never ran.)"""
    ran = tune_trial_numbers(out)
    assert len(ran) == len(set(ran))
    assert set(ran) <= {t.number for t in trials}
    assert {t.number for t in trials if t.state == TrialState.COMPLETE} - set(done_before) \
        <= set(ran)


def _counts(trials) -> dict[str, int]:
    return {s.name: sum(1 for t in trials if t.state == s)
            for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)}


# ---- a trial's worker dies; a trial raises ------------------------------------------------------

def test_killed_worker_retries_from_checkpoint_and_raising_trial_fails(
        ray_session, new_out, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_TEST_KILL_TRIAL", "1")  # SIGKILL trial 1's worker once
    monkeypatch.setenv("AUTOPRUNE_TEST_RAISE_TRIAL", "2")  # trial 2 raises
    space = write_space(tmp_path, PHASED_SPACE)
    summary = search(SearchOptions(study=STUDY, space=space, budget="flops=0.4", trials=3,
                                   workers=2, out=str(new_out), seed=0, finalists=0))
    assert (new_out / STUDY / ".killed-trial-1").exists(), "the worker of trial 1 was killed"
    assert summary["trials_completed"] == 2 and summary["trials_failed"] == 1
    assert summary["trials_killed"] == 0 and not summary["interrupted"]
    assert any("injected failure of trial 2" in e for e in summary["errors"])

    trials, children = assert_stores_agree(new_out)
    assert [t.number for t in trials] == [0, 1, 2]
    state = {t.number: t for t in trials}
    assert state[1].state == TrialState.COMPLETE
    assert state[1].user_attrs["restored_from_checkpoint"] == 1  # the retry used the checkpoint
    assert state[0].user_attrs["restored_from_checkpoint"] == 0
    assert state[2].state == TrialState.FAIL
    assert "RuntimeError: injected failure" in state[2].user_attrs["error"]

    run = {int(r.data.tags["autoprune.trial"]): r for r in children}
    assert run[1].data.params["retries"] == "1" and run[0].data.params["retries"] == "0"
    assert run[1].data.metrics["restored_from_checkpoint"] == 1.0
    assert "injected failure of trial 2" in run[2].data.tags["autoprune.error"]
    # The retry skipped the prune phase: the trial's history holds the prune epoch once and
    # both fine-tune epochs, and Tune holds one checkpoint for it (a re-run prune phase would
    # have reported a second one).
    client = MlflowClient(f"sqlite:///{new_out / 'mlflow.db'}")
    rid = run[1].info.run_id
    assert len(client.get_metric_history(rid, "prune/loss")) == 1
    assert len(client.get_metric_history(rid, "finetune/loss")) == 2
    trial_dirs = [p.parent for p in (new_out / STUDY / "tune").rglob("params.json")
                  if json.loads(p.read_text()).get("optuna_trial") == 1]
    assert len(trial_dirs) == 1
    assert len(list(trial_dirs[0].glob("checkpoint_*"))) == 1


# ---- diverging trials ----------------------------------------------------------------------------

def test_every_trial_diverging_ends_nonzero_with_summary(ray_session, new_out, tmp_path, capsys):
    space = write_space(tmp_path, DIVERGING_SPACE)
    rc = main(["search", "--study", STUDY, "--space", space, "--budget", "sparse_flops=0.4",
               "--trials", "2", "--out", str(new_out)])
    err = capsys.readouterr().err
    assert rc == 1
    last = [ln for ln in err.splitlines() if ln.startswith("autoprune:")][-1]
    assert "every trial failed (2 of 2)" in last and "TrainingDiverged" in last
    assert "Traceback" not in err
    trials, children = assert_stores_agree(new_out)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    for t in trials:
        assert "loss became" in t.user_attrs["error"]
    for r in children:
        assert r.info.status == "FAILED" and "loss became" in r.data.tags["autoprune.error"]


# ---- separate drivers: Ctrl-C and SIGKILL ------------------------------------------------------

class Driver:
    """`python -m autoprune search ...` in its own session, its stderr collected live."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autoprune", "search", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True)
        self.stdout = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float = 150) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError("driver ended early:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.2)
        raise AssertionError("timed out; driver said:\n" + "\n".join(self.lines[-30:]))

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.stdout = self.proc.stdout.read()
        self._reader.join(timeout=5)
        return rc

    def kill_group(self) -> None:
        """SIGKILL what is left of the driver's session (the local Ray it started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def completed_in_optuna(out: Path, n: int):
    """Poll the driver's Optuna database read-only (opening it with Optuna would create its
    tables, racing the driver that is creating them)."""
    def check() -> bool:
        db = out / STUDY / "optuna.db"
        if not db.exists():
            return False
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                (count,) = con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'"
                                       ).fetchone()
        except sqlite3.Error:  # the study is still being created
            return False
        return count >= n
    return check


def test_ctrl_c_stops_cleanly_second_search_refused_resume_finishes(
        ray_session, new_out, tmp_path, capsys):
    space = write_space(tmp_path, QUICK_SPACE)
    args = ["--study", STUDY, "--space", space, "--budget", "flops=0.4", "--trials", "4",
            "--workers", "2", "--finalists", "0", "--out", str(new_out)]
    # slow trials (2 s per epoch) so that two are running when Ctrl-C comes
    driver = Driver(args, env={"AUTOPRUNE_TEST_SLOW_TRIAL": "2"})
    try:
        driver.wait_for(completed_in_optuna(new_out, 1))
        # a second search on the same study folder is refused while the first one runs
        rc = main(["search", *args, "--resume"])
        err = capsys.readouterr().err
        assert rc == 2 and "another autoprune search is running" in err
        assert len(err.strip().splitlines()) == 1
        driver.proc.send_signal(signal.SIGINT)
        rc = driver.finish()
    finally:
        driver.kill_group()
    assert rc == 130, "\n".join(driver.lines[-20:])
    assert "Traceback" not in "\n".join(driver.lines)
    hint = [ln.strip() for ln in driver.lines if ln.strip().startswith("autoprune search")]
    assert hint and hint[-1].endswith("--resume"), driver.lines[-10:]
    trials, children = assert_stores_agree(new_out)
    killed = [t for t in trials if t.user_attrs.get("killed")]
    assert killed, "trials running at Ctrl-C are recorded as killed"
    assert all(t.state == TrialState.FAIL for t in killed)
    done_before = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}

    # the printed command resumes and finishes the budgeted number of trials
    rc = main([*shlex.split(hint[-1])[1:], "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    summary = json.loads(out)
    trials, children = assert_stores_agree(new_out)
    complete = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
    assert len(complete) == 4 == summary["trials_completed"]
    assert all(complete[n] == v for n, v in done_before.items()), "finished trials kept"
    assert summary["trials_killed"] == len(killed)
    assert sum(r.info.status == "FINISHED" for r in children) == 4
    assert_tune_agrees(new_out, trials, done_before)


def test_driver_sigkill_then_resume_finishes_budget(ray_session, new_out, tmp_path, capsys):
    space = write_space(tmp_path, QUICK_SPACE)
    args = ["--study", STUDY, "--space", space, "--budget", "flops=0.4", "--trials", "4",
            "--workers", "2", "--finalists", "0", "--out", str(new_out)]
    driver = Driver(args, env={"AUTOPRUNE_TEST_SLOW_TRIAL": "2"})
    try:
        # a trial done, and another one's MLflow run open (a trial is RUNNING in Optuna a
        # moment before its run is created: killing in that gap leaves no run to end)
        done_one = completed_in_optuna(new_out, 1)
        driver.wait_for(lambda: done_one() and _running_runs(new_out, "trial") >= 1)
        driver.proc.send_signal(signal.SIGKILL)
        assert driver.finish() == -signal.SIGKILL
    finally:
        driver.kill_group()
    before = optuna_trials(new_out)
    running = [t.number for t in before if t.state == TrialState.RUNNING]
    done_before = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    assert running, "trials were running when the driver died"
    _, children = mlflow_runs(new_out)
    assert any(r.info.status == "RUNNING" for r in children), "live child runs left RUNNING"

    rc = main(["search", *args, "--resume", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0
    trials, children = assert_stores_agree(new_out)
    state = {t.number: t for t in trials}
    for n in running:  # the trials the dead driver left are failed and marked killed
        assert state[n].state == TrialState.FAIL and state[n].user_attrs["killed"] is True
    complete = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
    assert len(complete) == 4 == summary["trials_completed"]
    assert all(complete[n] == v for n, v in done_before.items())
    assert summary["trials_killed"] == len(running) and summary["trials_failed"] == 0
    assert len(trials) == 4 + len(running)
    assert_tune_agrees(new_out, trials, done_before)


def test_lock_refuses_a_second_search(ray_session, new_out, tmp_path, capsys):
    (new_out / STUDY).mkdir(parents=True)
    with StudyLock(new_out / STUDY):
        rc = main(["search", "--study", STUDY, "--out", str(new_out), "--trials", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "another autoprune search is running" in err
    assert not (new_out / STUDY / "optuna.db").exists(), "the refused search wrote nothing"


# ---- the driver killed during the finalist stage ------------------------------------------------

def _finalists_in_optuna(out: Path) -> dict[str, str]:
    """Finalist results recorded on the study so far (read-only, as `completed_in_optuna`)."""
    db = out / STUDY / "optuna.db"
    if not db.exists():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            rows = con.execute("SELECT key, value_json FROM study_user_attributes "
                               "WHERE key LIKE 'finalist.%'").fetchall()
    except sqlite3.Error:
        return {}
    return dict(rows)


def _running_runs(out: Path, role: str) -> int:
    """MLflow runs of `role` (trial, finalist) still RUNNING (read-only, so polling never
    locks the driver out)."""
    db = out / "mlflow.db"
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            (n,) = con.execute(
                "SELECT COUNT(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                "WHERE tags.key = 'autoprune.role' AND tags.value = ? "
                "AND runs.status = 'RUNNING'", (role,)).fetchone()
    except sqlite3.Error:
        return 0
    return int(n)


def test_driver_sigkill_during_finalists_then_resume_neither_repeats_nor_loses(
        ray_session, new_out, tmp_path, capsys):
    space = write_space(tmp_path, QUICK_SPACE)
    args = ["--study", STUDY, "--space", space, "--budget", "flops=0.4", "--trials", "3",
            "--workers", "1", "--finalists", "2", "--final-epochs", "3",
            "--out", str(new_out)]
    # the finalists train at once, trial n's at 2(n + 1) s per epoch: the driver dies after the
    # first has ended, while the second trains
    driver = Driver(args, env={"AUTOPRUNE_TEST_SLOW_TRIAL": "2"})
    try:
        # the first is in Optuna and the second's run is open: kill while it trains (waiting for
        # the first alone could kill in the gap before the second's run opens)
        driver.wait_for(lambda: len(_finalists_in_optuna(new_out)) >= 1
                        and _running_runs(new_out, "finalist") >= 1, timeout=240)
        driver.proc.send_signal(signal.SIGKILL)
        assert driver.finish() == -signal.SIGKILL
    finally:
        driver.kill_group()
    first = _finalists_in_optuna(new_out)
    assert len(first) == 1, "killed while the second finalist was training"
    client = MlflowClient(f"sqlite:///{new_out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(STUDY)

    def finalist_runs():
        return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
                if r.data.tags.get("autoprune.role") == "finalist"]
    assert "RUNNING" in {r.info.status for r in finalist_runs()}

    rc = main(["search", *args, "--resume", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0
    after = _finalists_in_optuna(new_out)
    assert len(after) == 2 and all("val_accuracy" in json.loads(v) for v in after.values())
    for key, value in first.items():  # the finished finalist was not retrained
        assert after[key] == value
    runs = finalist_runs()
    assert len(runs) == 2, "the killed finalist's run was reused, not duplicated"
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(f["trial"] for f in summary["finalists"]) == \
        sorted(int(k.split(".")[1]) for k in after)
    assert all("val_accuracy" in f for f in summary["finalists"])
    trials, _ = assert_stores_agree(new_out)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3, "no trial was rerun"
