"""Every read of the stores a search leaves behind, and the lookups between them.

The Optuna study (the source of truth: which trials ran, their objectives) and the MLflow
tracking store (one parent run per search, one child run per trial) are read here and only here:
trial records, the parent run of a search, the run of one trial, and where each store lives
(`sqlite:///` URIs are built and parsed here). Writers (tracking.Tracker, the searcher) and
readers (report, export, resume) call these functions instead of querying the engines.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UserError
from .names import TAG_PARENT, TAG_TRIAL
from .record import TrialRecord

SQLITE = "sqlite:///"
PARENT_ATTR = "mlflow_parent_run_id"  # Optuna study attr: the MLflow parent run of the search
KILLED_ATTR = "killed"  # Optuna trial attr: stopped by an interrupted or dead driver
RUNGS_ATTR = "rungs"  # Optuna trial attr: {fine-tune epoch: [val accuracy, budget share]}
# Optuna *study* attr prefix: "finalist.<trial>" holds that trial's finalist result. On the
# study, not the trial: Optuna refuses to change a finished trial.
FINALIST_PREFIX = "finalist."


# ---- where the stores are --------------------------------------------------------------------

def sqlite_uri(path: str | Path) -> str:
    """`sqlite:///<absolute path>`: absolute, so a store never depends on the cwd."""
    return f"{SQLITE}{Path(path).expanduser().resolve().as_posix()}"


def sqlite_file(uri: str) -> Path | None:
    """The file of a `sqlite:///...` URI; None for any other store (a server, a database)."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def default_tracking_uri(out_dir: str | Path) -> str:
    """`sqlite:///<abs out_dir>/mlflow.db`."""
    return sqlite_uri(Path(out_dir).expanduser().resolve() / "mlflow.db")


def default_artifact_root(tracking_uri: str) -> Path | None:
    """`<dir of the SQLite file>/mlartifacts` for a local store; None (server decides) else."""
    db = sqlite_file(tracking_uri)
    return db.parent / "mlartifacts" if db is not None else None


def optuna_url(study_dir: str | Path, given: str | None = None) -> str:
    """The Optuna storage of a study folder: `given`, or its `optuna.db`."""
    return given or sqlite_uri(Path(study_dir) / "optuna.db")


# ---- Optuna ----------------------------------------------------------------------------------

def open_search(study_dir: Path, name: str, storage: str | None = None):
    """The Optuna study of an existing search (read-only use); `UserError` if there is none."""
    import optuna

    url = optuna_url(study_dir, storage)
    db = sqlite_file(url)
    if storage is None and db is not None and not db.exists():
        raise UserError(f"no search of study '{name}' in {study_dir.parent} (no {db}); "
                        f"run `autoprune search --study {name} --out {study_dir.parent}`")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise UserError(f"{url} holds no search named '{name}'") from None


def trial_records(ot_study: Any, finalists: bool = True) -> list[TrialRecord]:
    """Completed trials of an Optuna study, as records (in trial order).

    With `finalists` (what the front, `best`, report and export read) a trial retrained by
    the finalist stage carries its finalist's accuracy and checkpoint; without, every record
    is as the search measured it (what chooses the finalists, so a resumed stage chooses the
    same ones).
    """
    from optuna.trial import TrialState

    done = finalist_results(ot_study) if finalists else {}
    return [TrialRecord.from_optuna(t).with_finalist(done.get(t.number))
            for t in ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def finalist_results(ot_study: Any) -> dict[int, dict[str, Any]]:
    """Trial number -> the recorded result of its finalist (finished or failed)."""
    out = {}
    for key, value in ot_study.user_attrs.items():
        number = key.removeprefix(FINALIST_PREFIX)
        if key.startswith(FINALIST_PREFIX) and number.isdigit() and isinstance(value, dict):
            out[int(number)] = value
    return out


def trial_points(ot_study: Any) -> list[dict]:
    """`trial_records` as plain dicts (what the front, `--json` and the tables show)."""
    return [r.as_point() for r in trial_records(ot_study)]


def rung_history(ot_study: Any) -> list[dict[int, tuple[float, float]]]:
    """The ASHA rung results of every completed or stopped trial that recorded some
    (`RUNGS_ATTR`, written by the searcher): {fine-tune epoch: (val accuracy, budget share)} per
    trial, in trial order. What a resumed search's scheduler starts from
    (`SizeAwareASHA.restore`). Failed and killed trials are left out: a resumed search runs
    killed ones again, and they must not be compared with their own first attempt."""
    from optuna.trial import TrialState

    out = []
    for t in ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        rungs = t.user_attrs.get(RUNGS_ATTR)
        if isinstance(rungs, dict) and rungs:
            out.append({int(k): (float(v[0]), float(v[1])) for k, v in rungs.items()
                        if str(k).isdigit() and isinstance(v, list) and len(v) == 2})
    return out


def parent_run_id(ot_study: Any) -> str | None:
    """The MLflow parent run recorded on the Optuna study by its search, if any."""
    return ot_study.user_attrs.get(PARENT_ATTR)


# ---- MLflow ----------------------------------------------------------------------------------

def _quote(s: str) -> str:
    return "'" + s.replace("'", "\\'") + "'"


def search_runs(client: Any, experiment_ids: list[str], filter_string: str,
                order_by: list[str] | None = None) -> Iterable[Any]:
    """All matching active runs, following MLflow's pages."""
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY, 1000,
                                  order_by, token)
        yield from page
        token = page.token
        if not token:
            return


def child_runs(client: Any, experiment_id: str, parent_id: str) -> dict[int, Any]:
    """Trial number -> the (first found) child run of a search's parent run."""
    found: dict[int, Any] = {}
    for run in search_runs(client, [experiment_id], f"tags.`{TAG_PARENT}` = {_quote(parent_id)}"):
        trial = run.data.tags.get(TAG_TRIAL, "")
        if trial.lstrip("-").isdigit():
            found.setdefault(int(trial), run)
    return found


def trial_run(client: Any, experiment_id: str, trial: int, run_id: str | None = None,
              parent_id: str | None = None) -> str | None:
    """The MLflow run id of one trial: `run_id` if it exists, else found by its tags (the
    child of `parent_id` first, then any run of that trial number, newest first)."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            return client.get_run(run_id).info.run_id
        except MlflowException:
            pass
    if parent_id:
        run = child_runs(client, experiment_id, parent_id).get(int(trial))
        if run is not None:
            return run.info.run_id
    runs = client.search_runs([experiment_id], f"tags.`{TAG_TRIAL}` = '{int(trial)}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def finalist_runs(client: Any, experiment_id: str, parent_id: str) -> dict[int, Any]:
    """Trial number -> the finalist run of that trial in the search `parent_id` (the first
    found; a resumed stage reuses it)."""
    from .names import TAG_FINALIST_OF, TAG_SEARCH

    found: dict[int, Any] = {}
    for run in search_runs(client, [experiment_id], f"tags.`{TAG_SEARCH}` = {_quote(parent_id)}"):
        trial = run.data.tags.get(TAG_FINALIST_OF, "")
        if trial.isdigit():
            found.setdefault(int(trial), run)
    return found


def find_searches(client: Any, study: str) -> list[Any]:
    """Searches (parent runs, MLflow `Run`s) of `study`, newest first, in any experiment of the
    store (the tag, not the experiment name, decides)."""
    from .names import ROLE_SEARCH, TAG_ROLE, TAG_STUDY

    filt = f"tags.`{TAG_ROLE}` = {_quote(ROLE_SEARCH)} and tags.`{TAG_STUDY}` = {_quote(study)}"
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    return list(search_runs(client, exp_ids, filt, ["attributes.start_time DESC"]))


def latest_search(client: Any, study: str) -> Any | None:
    """The most recently started search of `study` (`.info.run_id`, `.data.metrics`), or None."""
    found = find_searches(client, study)
    return found[0] if found else None


def front_of(client: Any, parent_id: str) -> list[dict[str, Any]]:
    """Trials of a search tagged on the front: run_id, trial, method, status, their metrics
    (flat, as logged) and `params` (the method's sampled hyperparameters, as strings); sorted by
    flops_frac."""
    import math

    from .names import FLOPS_FRAC, TAG_METHOD, TAG_PARETO, VAL_ACC

    parent = client.get_run(parent_id)
    filt = f"tags.`{TAG_PARENT}` = {_quote(parent_id)} and tags.`{TAG_PARETO}` = 'true'"
    out = []
    for r in search_runs(client, [parent.info.experiment_id], filt):
        out.append({"run_id": r.info.run_id, "trial": int(r.data.tags[TAG_TRIAL]),
                    "method": r.data.tags.get(TAG_METHOD), "status": r.info.status,
                    "artifact_uri": r.info.artifact_uri,
                    **{k: v for k, v in r.data.metrics.items() if "/" not in k},
                    "params": dict(r.data.params)})
    return sorted(out, key=lambda p: (p.get(FLOPS_FRAC, math.inf), -p.get(VAL_ACC, 0.0)))


def redact(url: str) -> str:
    """A storage URL without its password, for messages and records."""
    import re

    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
