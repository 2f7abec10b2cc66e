"""Cluster mode: a search joins an existing two-node Ray cluster through `--ray-address`.

The cluster runs on this machine (`ray.cluster_utils.Cluster`: a head and a worker node, one
CPU each, no GPU); the search runs as a separate driver process, as it would on a real cluster,
and records to an MLflow tracking server (`--tracking-uri http://...`), not to a local file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import QUICK_SPACE
from mlflow import MlflowClient
from optuna.trial import TrialState

STUDY = "digits-lenet"


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory) -> Path:
    """The study's trained dense baseline, shared by every --out of the session."""
    from autoprune.pipeline import Workbench
    from autoprune.study import load_study

    root = tmp_path_factory.getbasetemp() / "dense-digits"
    if not (root / "dense").exists():
        Workbench.open(load_study(STUDY), root, device="cpu")
    return root / "dense"


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    c.add_node(num_cpus=1, num_gpus=0)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback with its own backend and artifact store."""
    import socket

    from autoprune.reporting import start_ui_server, wait_healthy

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = start_ui_server(f"sqlite:///{root / 'server.db'}", str(root / "artifacts"),
                           "127.0.0.1", port)
    try:
        wait_healthy("127.0.0.1", port, proc)
        yield f"http://127.0.0.1:{port}", root / "artifacts"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_driver(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "autoprune", "search", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_search_spreads_over_both_nodes(cluster, mlflow_server, dense_cache, tmp_path):
    server, artifacts = mlflow_server
    out = tmp_path / "runs"
    shutil.copytree(dense_cache, out / "dense")
    space = tmp_path / "space.yaml"
    space.write_text(QUICK_SPACE)
    storage = f"sqlite:///{tmp_path / 'db' / 'studies.db'}"  # stands in for postgresql://...
    (tmp_path / "db").mkdir()
    proc = run_driver(["--study", STUDY, "--space", str(space), "--budget", "flops=0.4",
                       "--trials", "4", "--workers", "2", "--cpus-per-trial", "1",
                       "--ray-address", cluster.address, "--tracking-uri", server,
                       "--optuna-storage", storage, "--out", str(out), "--json",
                       "--finalists", "1", "--final-epochs", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["trials_completed"] == 4
    # the lone finalist fits on one node: it once asked for both nodes' CPUs and waited for ever
    assert len(summary["finalists"]) == 1 and "val_accuracy" in summary["finalists"][0]

    node_ids = {n.node_id for n in cluster.list_all_nodes()}
    assert len(node_ids) == 2
    assert not (out / STUDY / "optuna.db").exists()
    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    used = {t.user_attrs["node_id"] for t in trials}
    assert used == node_ids, "trials ran on both nodes"

    assert summary["tracking_uri"] == server
    assert not (out / "mlflow.db").exists() and not (out / "mlartifacts").exists()
    client = MlflowClient(server)
    exp = client.get_experiment_by_name(STUDY)
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]]
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in children) == [0, 1, 2, 3]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.params["node_id"] for r in children} == node_ids
    # artifacts went through the server into its artifact store
    assert [a.path for a in client.list_artifacts(children[0].info.run_id)] == [
        "layer_sparsity.json"]
    assert list(artifacts.rglob("layer_sparsity.json"))


def test_gpus_on_a_cluster_without_gpus_fail_fast(cluster, tmp_path):
    t0 = time.monotonic()
    proc = run_driver(["--ray-address", cluster.address, "--gpus-per-trial", "0.5",
                       "--trials", "2", "--out", str(tmp_path / "runs")], timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("autoprune: error: --gpus-per-trial 0.5")
    assert "no node of the Ray cluster" in err[-1] and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "runs" / STUDY / "optuna.db").exists()


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    proc = run_driver(["--ray-address", "127.0.0.1:1", "--trials", "1",
                       "--out", str(tmp_path / "runs")], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("autoprune: error: cannot join the Ray cluster at 127.0.0.1:1")
    assert "Traceback" not in proc.stderr
