"""`autoprune report` reads the front back from MLflow; `autoprune ui` serves it over REST."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

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


def test_runs_say_method_and_result_and_the_parent_holds_the_front(store):
    """What the runs table and its charts show without downloading anything."""
    from mlflow import MlflowClient

    out, parent = store
    client = MlflowClient(default_tracking_uri(out))
    exp = client.get_experiment_by_name("digits-lenet")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.data.tags["autoprune.trial"]: r for r in client.search_runs(
        [exp.experiment_id], "tags.`autoprune.role` = 'trial'")}
    assert runs["1"].info.run_name == "t1 admm val 0.970 flops 0.35"
    m = runs["1"].data.metrics
    assert m["acc/val"] == 0.97 and m["frac/flops"] == 0.35 and m["frac/params"] == 0.30
    assert abs(m["acc/drop_val"] - 0.01) < 1e-9
    assert client.get_run(parent).info.run_name == (
        "search digits-lenet flops=0.4: best t1 admm val 0.970 flops 0.35")
    curve = client.get_metric_history(parent, "front/val_acc_by_flops_permille")
    assert [(c.step, c.value) for c in curve] == [(350, 0.97)]
    table = json.loads(Path(client.download_artifacts(parent, "trials_table.json")).read_text())
    assert table["columns"][:3] == ["trial", "method", "val_accuracy"]
    assert [r[0] for r in table["data"]] == [0, 1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(store):
    """The real command: `autoprune ui` in a subprocess, on a store with one untagged (older)
    experiment besides the study's. Yields (process, printed URL, port)."""
    from mlflow import MlflowClient

    out, _ = store
    MlflowClient(default_tracking_uri(out)).create_experiment("older")
    port = _free_port()
    # started as a script's background job is (SIGINT inherited ignored: `ui` must still stop
    # on Ctrl-C); faulthandler: a SIGABRT makes a stuck `ui` print where each thread is
    proc = subprocess.Popen([sys.executable, "-m", "autoprune", "ui", "--out", str(out),
                             "--port", str(port), "--study", "digits-lenet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    line = proc.stdout.readline()  # printed once /health answers
    try:
        assert line.startswith("MLflow UI: http://127.0.0.1:"), line + proc.stderr.read()
        yield proc, line.split()[2], port
    finally:  # a stop it handles (SIGKILL would leave MLflow's server group orphaned)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _rest(port: int, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))


def test_autoprune_ui_serves_the_runs_over_rest(store, ui):
    out, parent = store
    _, url, port = ui
    assert url.endswith("/runs?workflowType=machine_learning")
    exp = _rest(port, "experiments/get-by-name?experiment_name=digits-lenet")["experiment"]
    assert f"/#/experiments/{exp['experiment_id']}/runs" in url
    runs = _rest(port, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                       "filter": "tags.`autoprune.pareto` = 'true'"})["runs"]
    assert len(runs) == 1
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    assert tags["autoprune.trial"] == "1" and tags["mlflow.parentRunId"] == parent
    # every experiment opens on its runs, not on MLflow 3's GenAI traces overview
    older = _rest(port, "experiments/get-by-name?experiment_name=older")["experiment"]
    assert {t["key"]: t["value"] for t in older["tags"]}["mlflow.experimentKind"] == \
        "custom_model_development"


def _chromium() -> str | None:
    """Debian's chromium; on CI with apt, try to install it (never fail when that fails)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.environ.get("CI") != "true" or not shutil.which("apt-get"):
        return found
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True,
                       timeout=600)
    return shutil.which("chromium")


def test_the_printed_url_opens_the_runs_table_in_a_browser(ui, tmp_path):
    """Headless Chromium renders the printed URL: the study's runs table, not the GenAI
    welcome page, with the search's run named by its best result."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium here (apt-get install chromium) to render the UI")
    _, url, _ = ui
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 and not proc.stdout:
        pytest.skip(f"chromium could not run here: {proc.stderr.strip()[-200:]}")
    dom = proc.stdout
    assert "search digits-lenet flops=0.4: best t1 admm val 0.970 flops 0.35" in dom
    assert "matching runs" in dom  # the runs table itself


def test_ctrl_c_stops_the_ui_and_its_server(ui):
    """Ctrl-C ends `autoprune ui` with 0 and takes MLflow's server (uvicorn, job workers)
    down with it: the port no longer answers."""
    proc, _, port = ui
    proc.send_signal(signal.SIGINT)
    stuck = ""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # say where it hangs
        proc.send_signal(signal.SIGABRT)
        try:
            stuck = proc.communicate(timeout=10)[1][-4000:]
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, f"`autoprune ui` still running 30 s after Ctrl-C:\n{stuck}"
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


def test_report_gives_the_trials_and_the_front_as_dataframes(store, capsys):
    import io

    import pandas as pd

    import autoprune

    out, _ = store
    df = autoprune.report(out)  # the latest search of whatever study was searched
    assert list(df["trial"]) == [0, 1, 2] and list(df["method"]) == ["magnitude", "admm", "admm"]
    assert list(df["pareto"]) == [False, True, False]
    assert list(df["val_accuracy"]) == [0.95, 0.97, 0.90]
    assert list(df["frac/flops"]) == [0.40, 0.35, 0.38]
    assert list(autoprune.report(out, "digits-lenet", front=True)["trial"]) == [1]
    assert main(["report", "--out", str(out), "--study", "digits-lenet", "--csv"]) == 0
    csv = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(csv["trial"]) == [0, 1, 2] and "acc/drop_val" in csv.columns


def test_printed_front_shows_drop_fractions_and_the_budget():
    """The front stays exact (a val 0.25 point stays), with drop vs dense, the four
    fractions ('-' where a record lacks one) and whether each point meets the budget."""
    import io

    from autoprune.cli.search import print_front

    summary = {"study": "digits-lenet", "budget": "flops=0.4", "trials_completed": 2,
               "trials_failed": 0, "trials_pruned": 0,
               "dense": {"val_accuracy": 0.98, "test_accuracy": 0.97},
               "pareto": [{"trial": 0, "method": "admm", "val_accuracy": 0.25,
                           "flops_frac": 0.05, "params_frac": 0.1, "feasible": True},
                          {"trial": 3, "method": "magnitude", "val_accuracy": 0.97,
                           "test_accuracy": 0.96, "flops_frac": 0.38,
                           "sparse_flops_frac": 0.2, "params_frac": 0.3, "weights_frac": 0.28,
                           "feasible": False}],
               "best": {"trial": 3, "method": "magnitude", "val_accuracy": 0.97,
                        "cpu_speedup": {"batch": 32, "threads": 2, "dense_ms": 1.0,
                                        "compacted_ms": 0.5, "speedup": 2.0}}}
    buf = io.StringIO()
    print_front(summary, buf)
    rows = {line.split()[0]: line.split() for line in buf.getvalue().splitlines()
            if line.split() and line.split()[0] in ("0", "3")}
    assert rows["0"][2:9] == ["0.2500", "+0.7300", "-", "0.0500", "-", "0.1000", "-"]
    assert rows["0"][9] == "met"
    assert rows["3"][2:10] == ["0.9700", "+0.0100", "0.9600", "0.3800", "0.2000", "0.3000",
                               "0.2800", "over"]
    assert "speed-up of its compacted model: 2.00x" in buf.getvalue()


def test_open_uses_a_browser_where_there_is_one(monkeypatch):
    import webbrowser

    from autoprune.reporting import open_browser

    opened = []

    class Browser:
        def open(self, url: str) -> bool:
            opened.append(url)
            return True

    monkeypatch.setattr(webbrowser, "get", lambda: Browser())
    assert open_browser("http://127.0.0.1:5000/#/experiments/1/runs") is True
    assert opened == ["http://127.0.0.1:5000/#/experiments/1/runs"]

    def none():
        raise webbrowser.Error("could not locate runnable browser")

    monkeypatch.setattr(webbrowser, "get", none)
    assert open_browser("http://127.0.0.1:5000/") is False  # headless: a hint, no traceback
