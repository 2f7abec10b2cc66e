"""Reading results back: `autoprune report` (the front, from MLflow) and `autoprune ui`."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import store
from .errors import UserError

log = logging.getLogger("autoprune")
STOP_WAIT_S = 3.0  # after SIGTERM to the server's process group, then SIGKILL


def _tracker(out: str | Path, study: str, tracking_uri: str | None):
    from .tracking import Tracker

    out = Path(out).expanduser().resolve()
    return Tracker(_store_uri(out, tracking_uri), study, out / "mlartifacts", create=False)


def _store_uri(out: Path, tracking_uri: str | None) -> str:
    """The tracking store of a search's output folder; a local one must exist already."""
    uri = tracking_uri or store.default_tracking_uri(out)
    if (db := store.sqlite_file(uri)) is not None and not db.exists():
        raise UserError(f"no tracking store at {uri}: run `autoprune search --out {out}` first")
    return uri


def report(out: str | Path, study: str, tracking_uri: str | None = None) -> dict:
    """The Pareto front of the latest search of `study`, as recorded in MLflow."""
    tracker = _tracker(out, study, tracking_uri)
    parent = store.latest_search(tracker.client, study)
    if parent is None:
        raise UserError(f"no search of study '{study}' is recorded in {tracker.tracking_uri}")
    return {"study": study, "parent_run_id": parent.info.run_id,
            "status": parent.info.status, "metrics": dict(parent.data.metrics),
            "pareto": store.front_of(tracker.client, parent.info.run_id)}


def ui_url(host: str, port: int, experiment_id: str | None = None) -> str:
    """The URL that opens the runs table in 'Model training' mode (see STACK_NOTES.md)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    base = f"http://{shown}:{port}/"
    if experiment_id:
        return f"{base}#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return base


def start_ui_server(backend_uri: str, artifact_root: str | None, host: str, port: int):
    """Start `mlflow server` as a child process (127.0.0.1 unless told otherwise).

    In its own session (process group): `mlflow server` starts uvicorn and job workers as
    grandchildren, and signalling the whole group is what stops them all at once (terminating
    only the parent left them serving for tens of seconds).
    """
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if artifact_root:
        cmd += ["--artifacts-destination", artifact_root]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def stop_ui_server(proc: subprocess.Popen, wait: float = STOP_WAIT_S) -> None:
    """SIGTERM the server's process group, SIGKILL what is left of it after `wait` seconds."""
    def signal_group(sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass
    signal_group(signal.SIGKILL)  # workers that outlived their parent, or a stuck parent
    proc.wait(timeout=wait)


def tag_experiments(uri: str) -> None:
    """Mark every experiment of the store as model development (see EXPERIMENT_KIND)."""
    from mlflow import MlflowClient

    from .tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    client = MlflowClient(uri)
    for exp in client.search_experiments():
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def open_browser(url: str) -> bool:
    """Open `url` in a browser when this machine has one; False (and a hint) otherwise."""
    import webbrowser

    try:
        ok = webbrowser.get().open(url)
    except webbrowser.Error:
        ok = False
    if not ok:
        log.warning("no browser found here: open the URL yourself")
    return ok


def wait_healthy(host: str, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raw = proc.stderr.read() if proc.stderr else b""
            err = raw.decode(errors="replace").strip().splitlines()
            raise UserError(f"the MLflow server exited: {err[-1] if err else 'no message'}")
        try:
            with urllib.request.urlopen(f"http://{shown}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop_ui_server(proc)
    raise UserError(f"the MLflow server did not answer on {shown}:{port} within {timeout:.0f} s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_ui(out: str | Path, host: str = "127.0.0.1", port: int = 5000,
             tracking_uri: str | None = None, study: str | None = None,
             open_in_browser: bool = False) -> int:
    """Serve the MLflow UI on the search's tracking store until interrupted.

    Prints the root URL and, for a study, the URL of its runs table; every experiment is tagged
    as model development first, so the UI opens on runs rather than on GenAI traces.
    """
    out = Path(out).expanduser().resolve()
    uri = _store_uri(out, tracking_uri)
    if uri.startswith("http"):
        raise UserError(f"{uri} is already a tracking server: open it in a browser")
    tag_experiments(uri)
    experiment_id = None
    if study:
        import mlflow

        exp = mlflow.MlflowClient(uri).get_experiment_by_name(study)
        if exp is None:
            raise UserError(f"no experiment '{study}' in {uri}: run `autoprune search --study "
                            f"{study} --out {out}` first")
        experiment_id = exp.experiment_id
    proc = start_ui_server(uri, str(out / "mlartifacts"), host, port)
    # SIGTERM (kill, a service manager) stops it like Ctrl-C: the server group goes with it
    # instead of serving on, orphaned. SIGINT is set too: a background job of a script
    # (`autoprune ui &`) inherits SIGINT ignored, and `kill -INT` would then stop nothing.
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
    try:
        wait_healthy(host, port, proc)
        url = ui_url(host, port, experiment_id)
        print(f"MLflow UI: {url}  (Ctrl-C to stop)", flush=True)
        if experiment_id:
            print(f"all experiments: {ui_url(host, port)}", flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print("warning: the UI is reachable from other machines and has no authentication",
                  file=sys.stderr)
        if open_in_browser:
            open_browser(url)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_ui_server(proc)
    return 0


def _latest_any(client) -> tuple[str, object] | None:
    """(study, parent run) of the most recent search of any study in the store."""
    from .names import ROLE_SEARCH, TAG_ROLE, TAG_STUDY

    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, f"tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'",
                              order_by=["attributes.start_time DESC"], max_results=1) \
        if exp_ids else []
    return (runs[0].data.tags.get(TAG_STUDY, ""), runs[0]) if runs else None


def trials_frame(out: str | Path, study: str | None = None, tracking_uri: str | None = None,
                 front: bool = False):
    """The latest search of `study` (else of the most recent study searched in `out`) as a
    pandas DataFrame, one row per trial: trial, method, status, pareto, feasible, the method's
    hyperparameters (as logged, strings), per-layer sparsities (`sparsity/<layer>`) and every
    final metric. `front=True`: only the Pareto front. Sorted by trial number."""
    import pandas as pd
    from mlflow import MlflowClient

    from .names import TAG_FEASIBLE, TAG_FINALIST, TAG_METHOD, TAG_PARENT, TAG_PARETO, TAG_TRIAL

    out = Path(out).expanduser().resolve()
    client = MlflowClient(_store_uri(out, tracking_uri))
    if study is None:
        found = _latest_any(client)
        if found is None:
            raise UserError(f"no search is recorded in {out}")
        study, parent = found
    else:
        parent = store.latest_search(client, study)
        if parent is None:
            raise UserError(f"no search of study '{study}' is recorded in {out}")
    rows = []
    for r in store.search_runs(client, [parent.info.experiment_id],
                               f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'"):
        tags = r.data.tags
        if not tags.get(TAG_TRIAL, "").lstrip("-").isdigit():
            continue
        row = {"trial": int(tags[TAG_TRIAL]), "method": tags.get(TAG_METHOD),
               "status": r.info.status, "pareto": tags.get(TAG_PARETO) == "true",
               "feasible": tags.get(TAG_FEASIBLE, "true") == "true",
               "finalist": tags.get(TAG_FINALIST) == "true", "study": study}
        row.update({k: v for k, v in r.data.params.items() if k != "method"})
        row.update(r.data.metrics)
        row["run_id"] = r.info.run_id
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.sort_values("trial").reset_index(drop=True)
    return df[df["pareto"]].reset_index(drop=True) if front else df


def _alternating_medians(a, b, x, repeats: int) -> tuple[float, float]:
    """Median ms of `a(x)` and `b(x)`, timed in alternation (a busy host slows both alike)."""
    import statistics

    ta: list[float] = []
    tb: list[float] = []
    for _ in range(3):  # warm-up: allocator, oneDNN primitive caches
        a(x), b(x)
    for _ in range(repeats):
        for f, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            f(x)
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ta), statistics.median(tb)


def measure_speedup(study, out: str | Path, checkpoint: str | Path, *,
                    data_root: str | None = None, seed: int = 0, batch: int = 32,
                    repeats: int = 21) -> dict[str, float] | None:
    """Median CPU time of one forward pass of `batch` inputs, dense vs the compacted pruned
    model of `checkpoint`, on one thread, timed in alternation (a measurement to show, on this
    machine), or None when it cannot be measured here (no checkpoint, data not loadable)."""
    import torch

    from .dense import load_state
    from .pipeline import Workbench
    from .pruning.compaction import compact
    from .study import Study, load_study

    threads = torch.get_num_threads()
    try:
        st = study if isinstance(study, Study) else load_study(study)
        wb = Workbench.open(st, Path(out), data_root=data_root, seed=seed, device="cpu")
        dense = wb.fresh_model().eval()
        pruned = wb.fresh_model()
        pruned.load_state_dict(load_state(checkpoint, pruned))
        example = wb.data.example()
        compacted = compact(pruned.eval(), example, wb.accountant.graph).eval()
        x = torch.randn(batch, *example.shape[1:])
        torch.set_num_threads(1)  # one thread: steady on a shared host
        with torch.inference_mode():
            d_ms, c_ms = _alternating_medians(dense, compacted, x, repeats)
    except (UserError, OSError, RuntimeError) as exc:
        log.debug(f"speed-up not measured: {exc}")
        return None
    finally:
        torch.set_num_threads(threads)
    return {"batch": batch, "threads": 1, "dense_ms": d_ms, "compacted_ms": c_ms,
            "speedup": d_ms / c_ms}
