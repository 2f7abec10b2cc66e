"""Ray's `OptunaSearch`, completed for multi-objective pruning searches.

What Ray's class does not do (see STACK_NOTES.md):
- tell Optuna whether a completed trial met the budget (`trial.set_constraint`, Optuna 5's
  replacement for samplers' `constraints_func`): infeasible trials never shape the front;
- tell a trial that a scheduler stopped early as PRUNED, not COMPLETE with truncated values (a
  trial's final report carries `is_final`), and a trial that reported failure as FAIL;
- put the Optuna trial number into the config (and `BASELINE_KEY` for an enqueued hand
  baseline, which the scheduler never stops), so that the driver, MLflow and Optuna agree on
  which trial is which (the MLflow child run is keyed by it);
- once every hand baseline has finished, enqueue the best one again with the other values of a
  searched `study` choice and a stronger size prior (`baselines.enqueue_variants`);
- keep each rung result on the Optuna trial (`RUNGS_ATTR`; Optuna takes no intermediate
  values for several objectives), so that a resumed search's ASHA starts from them; with one
  objective (the default, `Budget.objectives`) also as the trial's intermediate values, which
  TPE uses to rank the trials ASHA stopped among themselves.

Ray offers no public access to the Optuna trial behind a Tune trial, so this subclass uses
OptunaSearch's own `_ot_trials`, `_ot_study` and `_completed_trials` (checked against Ray 2.60).
"""

from __future__ import annotations

from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from ..names import VAL_ACC
from ..record import TrialRecord
from ..store import RUNGS_ATTR
from .baselines import BASELINE_ATTR, enqueue_variants
from .scheduler import BASELINE_KEY, RUNG_KEY, SIZE_KEY, STOPPED_ATTR

TRIAL_NUMBER_KEY = "optuna_trial"
# Final-result fields kept on the Optuna trial, so the front can be rebuilt from the study alone.
KEPT_ATTRS = TrialRecord.OPTUNA_ATTRS
FAILED_ATTRS = TrialRecord.FAILED_ATTRS


class PruningSearch(OptunaSearch):
    def __init__(self, *args: Any, axes: dict[str, tuple[Any, list[Any]]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._axes = axes or {}  # `baselines.variant_axes`: what the best baseline varies

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None:
            ot_trial = self._ot_trials[trial_id]
            config[TRIAL_NUMBER_KEY] = ot_trial.number
            if ot_trial.user_attrs.get(BASELINE_ATTR):
                config[BASELINE_KEY] = True
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # (Ray's own method does nothing for several objectives.) Tune calls this only for
        # results its scheduler let through; a stopping one reaches `on_trial_complete`.
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._keep_rung(trial_id, result)

    def _keep_rung(self, trial_id: str, result: dict) -> None:
        """Add a rung result (one with `RUNG_KEY`) to the trial's `RUNGS_ATTR`."""
        if RUNG_KEY not in result or VAL_ACC not in result:
            return
        ot_trial = self._ot_trials[trial_id]
        rungs = dict(ot_trial.user_attrs.get(RUNGS_ATTR, {}))
        rungs[str(int(result[RUNG_KEY]))] = [float(result[VAL_ACC]),
                                             float(result.get(SIZE_KEY, 1.0))]
        ot_trial.set_user_attr(RUNGS_ATTR, rungs)
        if len(self._ot_study.directions) == 1:
            ot_trial.report(float(result[VAL_ACC]), int(result[RUNG_KEY]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if result and result.get("failed"):
            for key in FAILED_ATTRS:
                if key in result:
                    ot_trial.set_user_attr(key, result[key])
            self._tell(trial_id, None, TrialState.FAIL)
            return
        if not result or not result.get("is_final"):
            # stopped by a scheduler (or errored): its last values are not a finished model.
            # Told without values (with one objective Optuna gives it its last intermediate
            # value): TPE ranks a PRUNED trial after the completed ones, by its last rung's
            # accuracy, and it is never a point of the front (only COMPLETE trials are).
            if not error and result and RUNG_KEY in result:
                ot_trial.set_user_attr(STOPPED_ATTR, int(result[RUNG_KEY]))
                self._keep_rung(trial_id, result)
            self._tell(trial_id, None, TrialState.FAIL if error else TrialState.PRUNED)
            return
        violation = float(result.get("budget_violation", 0.0))
        ot_trial.set_constraint("budget", violation)
        for key in KEPT_ATTRS:
            if key in result:
                ot_trial.set_user_attr(key, result[key])
        super().on_trial_complete(trial_id, result, error)
        enqueue_variants(self._ot_study, self._axes)

    def _tell(self, trial_id: str, values: Any, state: TrialState) -> None:
        self._ot_study.tell(self._ot_trials[trial_id], values, state=state)
        self._completed_trials.add(trial_id)
        enqueue_variants(self._ot_study, self._axes)
