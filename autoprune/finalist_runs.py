"""MLflow records of the finalist stage (orchestration/finalists.py), driver side.

A finalist is a trial retrained with the full fine-tune. It gets its own run, nested under the
trial's run (so the UI shows it beneath the trial it retrains) and tagged with the search's
parent run id and the trial number, so that a resumed stage finds and reuses it instead of
opening a second one. When it finishes, the trial's own run takes the finalist's accuracy as
its `val_accuracy` / `test_accuracy` (what the front, `report` and the runs table show) and
keeps the search-time values under `search/`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from . import store
from .mlflow_format import _now_ms
from .names import (
    ROLE_FINALIST,
    SEARCH_PREFIX,
    TAG_ERROR,
    TAG_FINALIST,
    TAG_FINALIST_OF,
    TAG_METHOD,
    TAG_PARENT,
    TAG_ROLE,
    TAG_SEARCH,
    TAG_STUDY,
    TEST_ACC,
    VAL_ACC,
)
from .tracking import Tracker

FINALIST_METRICS = ("val_accuracy", "val_loss", "test_accuracy", "flops_frac", "sparse_flops_frac",
                    "params_frac", "weights_frac", "compact_flops_frac", "finetune_kept_epoch")


class FinalistRuns:
    """Opens, reopens and ends the finalist runs of one search (`parent_id`)."""

    def __init__(self, tracker: Tracker, parent_id: str) -> None:
        self.tracker, self.client, self.parent_id = tracker, tracker.client, parent_id
        self.experiment_id = self.client.get_run(parent_id).info.experiment_id
        found = store.finalist_runs(self.client, self.experiment_id, parent_id)
        self.runs = {n: r.info.run_id for n, r in found.items()}
        self.status = {n: r.info.status for n, r in found.items()}
        self._trials: dict[int, str] | None = None

    def trial_run(self, trial: int) -> str | None:
        """The run of the trial itself (a child of the search's parent run)."""
        if self._trials is None:
            self._trials = {n: r.info.run_id for n, r in store.child_runs(
                self.client, self.experiment_id, self.parent_id).items()}
        return self._trials.get(trial)

    def start(self, trial: int, method: str, epochs: int) -> str:
        """The RUNNING run of `trial`'s finalist: the existing one (a resumed stage), or new.
        `epochs`: the fine-tune length planned before timing and before the method's own phase
        took its share (`stretch`); metrics final_epochs and final_phase_epochs say what ran."""
        if trial in self.runs:
            self.client.update_run(self.runs[trial], status="RUNNING")
            self.status[trial] = "RUNNING"
            return self.runs[trial]
        nest = self.trial_run(trial) or self.parent_id
        tags = {TAG_PARENT: nest, TAG_ROLE: ROLE_FINALIST, TAG_FINALIST_OF: str(trial),
                TAG_SEARCH: self.parent_id, TAG_METHOD: method, TAG_STUDY: self.tracker.study}
        run = self.client.create_run(self.experiment_id, start_time=_now_ms(), tags=tags,
                                     run_name=f"final-{trial}-{method}")
        self.client.log_batch(run.info.run_id, params=[Param("trial", str(trial)),
                                                       Param("planned_epochs", str(epochs))],
                              synchronous=True)
        self.runs[trial] = run.info.run_id
        self.status[trial] = "RUNNING"
        return run.info.run_id

    def finish(self, trial: int, metrics: Mapping[str, Any],
               history: Sequence[Mapping[str, Any]] = ()) -> None:
        """End `trial`'s finalist run FINISHED, and give its trial run the retrained accuracy."""
        rid = self.runs[trial]
        ts = _now_ms()
        final = [Metric(k, float(metrics[k]), ts, 0) for k in FINALIST_METRICS
                 if isinstance(metrics.get(k), (int, float))]
        if isinstance(metrics.get("epochs"), (int, float)):
            final.append(Metric("final_epochs", float(metrics["epochs"]), ts, 0))
        if isinstance(metrics.get("phase_epochs"), (int, float)):
            final.append(Metric("final_phase_epochs", float(metrics["phase_epochs"]), ts, 0))
        curves = self.tracker.new_points(rid, self.tracker.curves(history, ts))
        # the hyperparameters it ran with (the trial's, phase lengths stretched); logged once:
        # a resumed stage finishing the same run again must not log a param twice
        params = ([Param("hparams", str(metrics["hparams"]))]
                  if metrics.get("hparams") and "hparams" not in
                  self.client.get_run(rid).data.params else [])
        self.client.log_batch(rid, metrics=final + curves, params=params, synchronous=True)
        self.client.set_terminated(rid, status="FINISHED", end_time=_now_ms())
        self.status[trial] = "FINISHED"
        trial_rid = self.trial_run(trial)
        if trial_rid is None:
            return
        old = self.client.get_run(trial_rid).data.metrics
        moved = [Metric(SEARCH_PREFIX + k, float(old[k]), ts, 0) for k in (VAL_ACC, TEST_ACC)
                 if k in old and SEARCH_PREFIX + k not in old]
        new = [Metric(k, float(metrics[k]), ts, 1) for k in (VAL_ACC, TEST_ACC)
               if isinstance(metrics.get(k), (int, float))]
        self.client.log_batch(trial_rid, metrics=moved + new, tags=[RunTag(TAG_FINALIST, "true")],
                              synchronous=True)

    def fail(self, trial: int, error: str) -> None:
        rid = self.runs[trial]
        self.client.log_batch(rid, tags=[RunTag(TAG_ERROR, error[-240:])], synchronous=True)
        self.client.set_terminated(rid, status="FAILED", end_time=_now_ms())
        self.status[trial] = "FAILED"

    def kill_running(self, keep: set[int] = frozenset()) -> int:
        """End KILLED every finalist run left RUNNING (by a dead or interrupted driver) that is
        not in `keep`; return how many."""
        n = 0
        for trial, rid in self.runs.items():
            if trial in keep:
                continue
            if self.client.get_run(rid).info.status == "RUNNING":
                self.client.set_terminated(rid, status="KILLED", end_time=_now_ms())
                self.status[trial] = "KILLED"
                n += 1
        return n
