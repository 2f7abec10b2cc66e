"""MLflow tracking against a real SQLite store in a temporary folder (no mocks)."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from autoprune import pareto
from autoprune.names import (
    ART_CONFIG,
    ART_ERROR,
    ART_FRONT_CSV,
    ART_FRONT_JSON,
    ART_LAYER_SPARSITY,
    ART_PLOT,
    ART_TRIALS_CSV,
    FLOPS_FRAC,
    PARAMS_FRAC,
    ROLE_SEARCH,
    ROLE_TRIAL,
    TAG_ERROR,
    TAG_FEASIBLE,
    TAG_METHOD,
    TAG_PARENT,
    TAG_PARETO,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
    TEST_ACC,
    VAL_ACC,
)
from autoprune.store import front_of, latest_search
from autoprune.tracking import Tracker, default_tracking_uri, flatten

DENSE = {VAL_ACC: 0.99, TEST_ACC: 0.985, "flops": 2_293_000, "params": 431_080,
         "path": "/cache/dense.pt", "key": "abc"}
CONFIG = {"study": "lenet5-mnist", "search": {"trials": 4, "sampler": "tpe"},
          "methods": ["magnitude", "admm"]}
# (trial, method, params, val, test, flops, params_frac, status)
TRIALS = [
    (0, "magnitude", {"granularity": "weight", "lr": 0.01}, 0.97, 0.96, 0.30, 0.20, "FINISHED"),
    (1, "admm", {"rho": 0.001, "granularity": "filter"}, 0.95, 0.94, 0.20, 0.30, "FINISHED"),
    (2, "magnitude", {"granularity": "weight", "lr": 0.1}, 0.93, 0.93, 0.35, 0.25, "FINISHED"),
    (3, "l0", {"beta": 0.66}, None, None, None, None, "FAILED"),
    (4, "admm", {"rho": 0.01, "granularity": "filter"}, 0.98, 0.97, 0.60, 0.50, "FINISHED"),
]
LIMITS = {"flops": 0.4}


def history(n_prune: int = 3, n_ft: int = 2) -> list[dict]:
    recs = [{"epoch": e, "phase": "prune", "loss": 1.0 / (e + 1), VAL_ACC: 0.8 + e / 100,
             "lr": 0.01} for e in range(n_prune)]
    recs += [{"epoch": e, "phase": "finetune", "loss": 0.1 / (e + 1), VAL_ACC: 0.9 + e / 100,
              "lr": 0.001} for e in range(n_ft)]
    return recs


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store per module: creating its schema costs several seconds."""
    out = tmp_path_factory.mktemp("runs")
    Tracker(default_tracking_uri(out), "warmup")
    return out


def run_search(tr: Tracker) -> tuple[str, dict[int, str], list[dict]]:
    pid = tr.start_search(CONFIG, "flops=0.4", DENSE)
    ids, points = {}, []
    for n, method, hp, val, test, fl, pa, status in TRIALS:
        metrics = {} if status == "FAILED" else {VAL_ACC: val, TEST_ACC: test, FLOPS_FRAC: fl,
                                                  PARAMS_FRAC: pa}
        ids[n] = tr.log_trial(pid, n, method, hp, metrics,
                              history() if status == "FINISHED" else history(1, 0),
                              {"conv1": 0.1 * n, "fc1": 0.9}, status,
                              error="Traceback ...\nRuntimeError: boom" if status == "FAILED"
                              else None)
        if status == "FINISHED":
            points.append({"run_id": ids[n], "trial": n, "method": method, VAL_ACC: val,
                           TEST_ACC: test, FLOPS_FRAC: fl, PARAMS_FRAC: pa,
                           "feasible": fl <= LIMITS["flops"]})
    return pid, ids, points


def read_artifact(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


def test_default_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri("out")
    assert uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').as_posix()}"
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_full_search_is_recorded(store, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory
    tr = Tracker(default_tracking_uri(store), "study-full", study="lenet5-mnist")
    pid, ids, points = run_search(tr)
    result = tr.finish_search(pid, points, LIMITS, DENSE)
    assert list(cwd.iterdir()) == []

    client = MlflowClient(default_tracking_uri(store))
    exp = client.get_experiment_by_name("study-full")
    assert exp.artifact_location == (store / "mlartifacts").resolve().as_uri()
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == ROLE_SEARCH]
    children = [r for r in runs if r.data.tags.get(TAG_ROLE) == ROLE_TRIAL]
    assert [p.info.run_id for p in parents] == [pid]
    assert len(children) == len(TRIALS)

    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.end_time is not None
    assert parent.data.params["search.sampler"] == "tpe"
    assert parent.data.params["budget"] == "flops=0.4"
    assert json.loads(parent.data.params["methods"]) == ["magnitude", "admm"]
    assert parent.data.metrics["dense_val_accuracy"] == 0.99
    assert parent.data.metrics["dense_flops"] == 2_293_000
    assert parent.data.tags[TAG_STUDY] == "lenet5-mnist"
    assert parent.data.tags["autoprune.version.mlflow"].startswith("3.")
    assert "autoprune.version.torch" in parent.data.tags
    assert parent.data.metrics["trials_completed"] == 4
    assert parent.data.metrics["trials_failed"] == 1

    # the front among feasible points (flops <= 0.4): trials 0 and 1; 2 is dominated by 0
    feasible = [p for p in points if p["feasible"]]
    expected = {feasible[i]["trial"] for i in pareto.front(feasible)}
    assert expected == {0, 1}
    assert parent.data.metrics["pareto_size"] == 2
    hv = pareto.hypervolume([p for p in points if p["trial"] in expected])
    assert parent.data.metrics["hypervolume"] == pytest.approx(hv)
    assert result["hypervolume"] == pytest.approx(hv)

    by_trial = {int(r.data.tags[TAG_TRIAL]): r for r in children}
    for n, method, hp, val, _test, fl, _pa, status in TRIALS:
        r = by_trial[n]
        assert r.info.run_id == ids[n]
        assert r.data.tags[TAG_PARENT] == pid
        assert r.data.tags[TAG_METHOD] == method
        assert r.info.status == status and r.info.end_time is not None
        assert r.data.params["method"] == method
        assert {k: r.data.params[k] for k in hp} == {k: str(v) for k, v in hp.items()}
        if status == "FINISHED":
            assert r.data.metrics[VAL_ACC] == val and r.data.metrics[FLOPS_FRAC] == fl
            assert r.data.tags[TAG_PARETO] == ("true" if n in expected else "false")
            assert r.data.tags[TAG_FEASIBLE] == ("true" if fl <= 0.4 else "false")
            assert TAG_ERROR not in r.data.tags
        else:
            assert VAL_ACC not in r.data.metrics
            assert r.data.tags[TAG_ERROR].endswith("RuntimeError: boom")
            assert TAG_PARETO not in r.data.tags  # failed trials are not ranked
            err = read_artifact(client, r.info.run_id, ART_ERROR, tmp_path)
            assert err.read_text() == "Traceback ...\nRuntimeError: boom"
        sparsity = json.loads(read_artifact(client, r.info.run_id, ART_LAYER_SPARSITY,
                                            tmp_path / str(n)).read_text())
        assert sparsity == {"conv1": pytest.approx(0.1 * n), "fc1": 0.9}

    # curves: one point per epoch, global steps across phases
    curve = client.get_metric_history(ids[0], "finetune/loss")
    assert sorted((m.step, m.value) for m in curve) == [(3, 0.1), (4, 0.05)]
    assert [m.step for m in client.get_metric_history(ids[0], "prune/lr")] == [0, 1, 2]

    # artifacts of the parent
    png = read_artifact(client, pid, ART_PLOT, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    rows = list(csv.DictReader(io.StringIO(
        read_artifact(client, pid, ART_FRONT_CSV, tmp_path).read_text())))
    assert sorted(int(r["trial"]) for r in rows) == [0, 1]
    assert {float(r[VAL_ACC]) for r in rows} == {0.97, 0.95}
    assert rows[0][FLOPS_FRAC] <= rows[1][FLOPS_FRAC]  # sorted by cost
    front_json = json.loads(read_artifact(client, pid, ART_FRONT_JSON, tmp_path).read_text())
    assert [r["run_id"] for r in front_json] == [r["run_id"] for r in rows]
    trials_rows = list(csv.DictReader(io.StringIO(
        read_artifact(client, pid, ART_TRIALS_CSV, tmp_path).read_text())))
    assert len(trials_rows) == 4
    assert read_artifact(client, pid, ART_CONFIG, tmp_path).read_text().startswith("study:")
    # everything under the experiment's artifact root, nothing elsewhere
    assert parent.info.artifact_uri.startswith(exp.artifact_location)

    # readers for report/export
    latest = latest_search(tr.client, tr.study)
    assert latest is not None and latest.info.run_id == pid
    assert latest.data.params["budget"] == "flops=0.4"
    front = front_of(tr.client, pid)
    assert [f["trial"] for f in front] == [1, 0]  # by flops_frac
    assert front[1][VAL_ACC] == 0.97 and front[1]["params"]["lr"] == "0.01"
    assert all("prune/loss" not in f for f in front)
    reader = Tracker(default_tracking_uri(store), "study-full", study="lenet5-mnist",
                     create=False)
    assert latest_search(reader.client, reader.study).info.run_id == pid
    assert [f["run_id"] for f in front_of(reader.client, pid)] == [f["run_id"] for f in front]


def test_reader_does_not_create(store):
    uri = default_tracking_uri(store)
    reader = Tracker(uri, "never-searched", create=False)
    assert reader.experiment_id is None and latest_search(reader.client, reader.study) is None
    assert MlflowClient(uri).get_experiment_by_name("never-searched") is None
    with pytest.raises(RuntimeError):
        reader.start_search(CONFIG, "flops=0.4", DENSE)


def test_log_trial_is_idempotent_and_resume_reuses_parent(store, tmp_path):
    uri = default_tracking_uri(store)
    tr = Tracker(uri, "study-resume")
    pid = tr.start_search(CONFIG, "params=0.5", DENSE)
    hp = {"granularity": "weight", "lr": 0.01}
    first = tr.log_trial(pid, 7, "magnitude", hp, {}, history(2, 0), None, "FAILED",
                         error="killed by node loss")
    # the driver restarts: a fresh Tracker, the same parent, the same trial finished now
    tr2 = Tracker(uri, "study-resume")
    assert tr2.start_search(CONFIG, "params=0.5", DENSE, parent_run_id=pid) == pid
    client = MlflowClient(uri)
    assert client.get_run(pid).info.status == "RUNNING"
    second = tr2.log_trial(pid, 7, "magnitude", {**hp, "lr": 0.02}, {VAL_ACC: 0.9},
                           history(3, 1), {"fc1": 0.5}, "FINISHED")
    third = tr2.log_trial(pid, 7, "magnitude", hp, {VAL_ACC: 0.91}, history(3, 1),
                          {"fc1": 0.5}, "FINISHED")
    assert first == second == third
    runs = client.search_runs([tr.experiment_id], f"tags.`{TAG_PARENT}` = '{pid}'")
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert TAG_ERROR not in r.data.tags  # the failure was superseded
    assert r.data.metrics[VAL_ACC] == 0.91  # latest value wins
    assert r.data.params["lr"] == "0.01"  # params are immutable in MLflow...
    assert r.data.tags["autoprune.param_changed.lr"] == "0.02"  # ...the change is kept visibly
    steps = [m.step for m in client.get_metric_history(r.info.run_id, "prune/loss")]
    assert sorted(steps) == [0, 1, 2]  # no repeated points after re-logging

    # a point may lack run_id (matched by trial number) and carry extra columns
    tr2.finish_search(pid, [{"run_id": None, "trial": 7, "method": "magnitude",
                             VAL_ACC: 0.91, TEST_ACC: 0.9, FLOPS_FRAC: 0.5, PARAMS_FRAC: 0.4,
                             "feasible": True, "hparams": {"lr": 0.01}}], {"params": 0.5}, DENSE)
    assert client.get_run(first).data.tags[TAG_PARETO] == "true"
    rows = list(csv.DictReader(io.StringIO(
        read_artifact(client, pid, ART_FRONT_CSV, tmp_path).read_text())))
    assert json.loads(rows[0]["hparams"]) == {"lr": 0.01}
    assert len(client.search_runs([tr.experiment_id], f"tags.`{TAG_ROLE}` = 'search'")) == 1
    assert [f["trial"] for f in front_of(tr2.client, pid)] == [7]

    with pytest.raises(ValueError):
        tr2.log_trial(pid, 8, "magnitude", hp, {}, [], None, "DONE")
    # names MLflow would reject are made valid rather than failing the driver
    odd = tr2.log_trial(pid, 9, "magnitude", {"alloc[conv1]": 0.3}, {"acc@1": 0.5}, [], None,
                        "KILLED")
    r = client.get_run(odd)
    assert r.data.params["alloc_conv1_"] == "0.3" and r.data.metrics["acc_1"] == 0.5
    assert r.info.status == "KILLED"
    other = Tracker(uri, "study-other")
    with pytest.raises(ValueError):
        other.start_search(CONFIG, "params=0.5", DENSE, parent_run_id=pid)


def test_log_trial_speed(store, capsys):
    """Batch logging keeps the driver's per-trial overhead small (printed for the report)."""
    tr = Tracker(default_tracking_uri(store), "study-speed")
    pid = tr.start_search(CONFIG, "flops=0.4", DENSE)
    n = 10
    t0 = time.perf_counter()
    for i in range(n):
        tr.log_trial(pid, i, "magnitude", {"granularity": "weight", "target": 0.8},
                     {VAL_ACC: 0.9, TEST_ACC: 0.9, FLOPS_FRAC: 0.5, PARAMS_FRAC: 0.5},
                     history(10, 10), {f"layer{j}": 0.5 for j in range(20)}, "FINISHED")
    per_trial = (time.perf_counter() - t0) / n
    with capsys.disabled():
        print(f"\nlog_trial: {per_trial * 1000:.0f} ms per trial (SQLite, 20 epochs of curves)")
    assert per_trial < 1.0  # generous: shared CI disks fsync slowly
