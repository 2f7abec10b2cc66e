"""`autoprune report` reads the front back from MLflow; `autoprune ui` serves it over REST."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from autoprune.cli import main
from autoprune.tracking import Tracker, default_tracking_uri

POINTS = [  # (trial, method, val, flops, params)
    (0, "magnitude", 0.95, 0.40, 0.40),
    (1, "admm", 0.97, 0.35, 0.30),
    (2, "admm", 0.90, 0.38, 0.39),  # dominated by trial 1
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    tracker = Tracker(default_tracking_uri(out), "digits-lenet", out / "mlartifacts")
    dense = {"val_accuracy": 0.98, "test_accuracy": 0.98, "flops": 1e5, "params": 1e4}
    parent = tracker.start_search({"study": "digits-lenet"}, "flops=0.4", dense)
    pts = []
    for n, method, val, f, p in POINTS:
        run = tracker.log_trial(parent, n, method, {"method": method},
                                {"val_accuracy": val, "test_accuracy": val, "flops_frac": f,
                                 "params_frac": p}, [], {}, "FINISHED")
        pts.append({"trial": n, "method": method, "val_accuracy": val, "test_accuracy": val,
                    "flops_frac": f, "params_frac": p, "run_id": run, "feasible": True})
    tracker.finish_search(parent, pts, {"flops": 0.4}, dense)
    return out, parent


def test_report_json_gives_the_front(store, capsys):
    out, parent = store
    assert main(["report", "--out", str(out), "--study", "digits-lenet", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["parent_run_id"] == parent
    assert sorted(r["trial"] for r in rep["pareto"]) == [1]


def test_report_without_a_store_is_a_clear_error(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "no tracking store" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_autoprune_ui_serves_the_runs_over_rest(store):
    """The real command: `autoprune ui` prints its URL and the server answers MLflow's REST API."""
    out, parent = store
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoprune", "ui", "--out", str(out),
                             "--port", str(port), "--study", "digits-lenet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once /health answers
        assert line.startswith("MLflow UI: http://127.0.0.1:"), line
        assert "workflowType=machine_learning" in line
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
            "?experiment_name=digits-lenet")
        exp = json.load(urllib.request.urlopen(req, timeout=30))["experiment"]
        body = json.dumps({"experiment_ids": [exp["experiment_id"]],
                           "filter": "tags.`autoprune.pareto` = 'true'"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                                     data=body, headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(req, timeout=30))["runs"]
        assert len(runs) == 1
        tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
        assert tags["autoprune.trial"] == "1" and tags["mlflow.parentRunId"] == parent
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0
