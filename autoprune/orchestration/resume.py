"""Resuming a search safely: one search per study folder (a file lock), the Optuna storage,
and bringing Optuna and MLflow in line after a driver was interrupted or killed.

The Optuna study is the source of truth: trials a dead driver left RUNNING are failed and marked
killed, and `reconcile` gives every trial exactly one MLflow child run in the matching state.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .. import store
from ..errors import UserError
from ..names import OBJECTIVES as LEGACY_OBJECTIVES
from ..pareto import Objectives
from ..record import TrialRecord
from ..store import KILLED_ATTR, redact
from .baselines import BASELINE_ATTR
from .callbacks import KILLED_ERROR
from .scheduler import STOPPED_ATTR, stop_note

log = logging.getLogger("autoprune")
OBJECTIVES_ATTR = "objectives"  # Optuna study attr: [[result key, "max"|"min"], ...]
DIRECTIONS = {"max": "maximize", "min": "minimize"}


class StudyLock:
    """One search per study folder at a time: a second process gets a clear refusal."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self._fh = None

    def __enter__(self) -> StudyLock:
        self._fh = open(self.path, "a+")  # noqa: SIM115 - held for the whole search
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise UserError(f"another autoprune search is running on {self.path.parent}; "
                            f"wait for it or use another --out") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage at `url`; an unusable URL is a one-line `UserError`."""
    try:
        return optuna.storages.RDBStorage(url)
    except ImportError as exc:
        raise UserError(f"--optuna-storage {redact(url)}: the database driver is not "
                        f"installed ({exc.name or exc})") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's many error types: all bad input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open --optuna-storage {redact(url)}: {first}") from None


def finished_before(storage: optuna.storages.RDBStorage, name: str, resume: bool) -> int:
    """Trials that count towards the budget already in the study (0 for a new study).

    Refuses to add to a study that has trials unless `--resume` says so. Nothing is written.
    """
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if name not in existing or existing[name].n_trials == 0:
        return 0
    if not resume:
        raise UserError(f"the study folder already holds a search of {existing[name].n_trials} "
                        f"trials; pass --resume to continue it, or another --out")
    study = optuna.load_study(study_name=name, storage=storage)
    return finished_count(study)


def prepare_optuna(storage: optuna.storages.RDBStorage, name: str, sampler,
                   objectives: Objectives) -> tuple[optuna.Study, Objectives]:
    """Load or create the study; fail the trials a dead driver left RUNNING.

    Returns the study and the objectives its sampler optimises (trial result keys with "max" or
    "min"): `objectives` for a new study, kept as a study attribute; an existing study keeps
    those it was made with (Optuna cannot change a study's directions), and a study made before
    they followed the budget has accuracy, FLOPs and params.
    """
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                directions=[DIRECTIONS[m] for _, m in objectives],
                                load_if_exists=True)
    stored = study.user_attrs.get(OBJECTIVES_ATTR)
    directions = [d.name.lower() for d in study.directions]
    if stored is None and (study.get_trials(deepcopy=False)
                           or directions != [DIRECTIONS[m] for _, m in objectives]):
        stored = LEGACY_OBJECTIVES  # made by a version without the attribute
    if stored is None:  # a new study (or an empty one this code made)
        study.set_user_attr(OBJECTIVES_ATTR, [list(o) for o in objectives])
        stored = objectives
    kept = tuple((str(k), str(m)) for k, m in stored)
    if kept != tuple(objectives):
        log.warning(f"this study optimises {', '.join(k for k, _ in kept)} (as when it was "
                    f"made); the budget's kinds would give {', '.join(k for k, _ in objectives)}")
    fail_unfinished(study, storage)
    return study, kept


def fail_unfinished(ot_study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
    """Fail, marked killed, the trials still RUNNING or WAITING (their driver is gone)."""
    study_id = storage.get_study_id_from_name(ot_study.study_name)
    for t in ot_study.get_trials(deepcopy=False,
                                 states=(TrialState.RUNNING, TrialState.WAITING)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, KILLED_ATTR, True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)


def reconcile(ot_study: optuna.Study, storage: optuna.storages.BaseStorage, tracker,
              parent_id: str) -> int:
    """Make MLflow agree with the Optuna study (the source of truth); return runs fixed.

    After an interrupted or killed driver: trials still RUNNING in Optuna are failed (marked
    killed), and every trial gets exactly one child run whose status matches its Optuna state;
    a child left RUNNING (its driver died) is ended KILLED, a trial told to Optuna but not yet
    logged to MLflow is logged from the study (a PRUNED one, stopped by ASHA, as KILLED with
    the note that says so, not as an error).
    """
    fail_unfinished(ot_study, storage)
    experiment_id = tracker.client.get_run(parent_id).info.experiment_id
    status = {n: r.info.status
              for n, r in store.child_runs(tracker.client, experiment_id, parent_id).items()}
    fixed = 0
    for t in ot_study.get_trials(deepcopy=False):
        want = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(
            t.state, "KILLED" if t.user_attrs.get(KILLED_ATTR) else "FAILED")
        if status.get(t.number) not in (None, "RUNNING"):
            continue
        metrics = TrialRecord.from_optuna(t).metrics() if t.state == TrialState.COMPLETE else {}
        pruned = t.state == TrialState.PRUNED  # stopped early by ASHA: not an error
        error = None if pruned else t.user_attrs.get("error") or (
            KILLED_ERROR if want == "KILLED" else None)
        params = {**t.params, **{k: t.user_attrs[k] for k in ("node_id", "node_ip")
                                 if k in t.user_attrs}}
        tracker.log_trial(parent_id, t.number, str(t.params.get("method", "")), params, metrics,
                          status=want, error=error if want != "FINISHED" else None,
                          stopped=stop_note(t.user_attrs.get(STOPPED_ATTR)) if pruned else None,
                          baseline=bool(t.user_attrs.get(BASELINE_ATTR)))
        fixed += 1
    return fixed


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards the budgeted number: completed or pruned (not failed)."""
    return len(study.get_trials(deepcopy=False,
                                states=(TrialState.COMPLETE, TrialState.PRUNED)))
