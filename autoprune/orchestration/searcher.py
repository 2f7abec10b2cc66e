"""Ray's `OptunaSearch`, completed for multi-objective pruning searches.

Three things Ray's class does not do (see STACK_NOTES.md):
- tell Optuna whether a completed trial met the budget (`trial.set_constraint`, Optuna 5's
  replacement for samplers' `constraints_func`): infeasible trials never shape the front;
- tell a trial that a scheduler stopped early as PRUNED, not COMPLETE with truncated values (a
  trial's final report carries `is_final`), and a trial that reported failure as FAIL;
- put the Optuna trial number into the config, so that the driver, MLflow and Optuna agree on
  which trial is which (the MLflow child run is keyed by it).

Ray offers no public access to the Optuna trial behind a Tune trial, so this subclass uses
OptunaSearch's own `_ot_trials`, `_ot_study` and `_completed_trials` (checked against Ray 2.60).
"""

from __future__ import annotations

from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from ..record import TrialRecord
from .scheduler import RUNG_KEY, STOPPED_ATTR

TRIAL_NUMBER_KEY = "optuna_trial"
# Final-result fields kept on the Optuna trial, so the front can be rebuilt from the study alone.
KEPT_ATTRS = TrialRecord.OPTUNA_ATTRS
FAILED_ATTRS = TrialRecord.FAILED_ATTRS


class PruningSearch(OptunaSearch):
    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None:
            config[TRIAL_NUMBER_KEY] = self._ot_trials[trial_id].number
        return config

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
            # No values, no intermediate values (Optuna has none for several objectives):
            # TPE counts a PRUNED trial among the worse ones, never as a point of the front.
            if not error and result and RUNG_KEY in result:
                ot_trial.set_user_attr(STOPPED_ATTR, int(result[RUNG_KEY]))
            self._tell(trial_id, None, TrialState.FAIL if error else TrialState.PRUNED)
            return
        violation = float(result.get("budget_violation", 0.0))
        ot_trial.set_constraint("budget", violation)
        for key in KEPT_ATTRS:
            if key in result:
                ot_trial.set_user_attr(key, result[key])
        super().on_trial_complete(trial_id, result, error)

    def _tell(self, trial_id: str, values: Any, state: TrialState) -> None:
        self._ot_study.tell(self._ot_trials[trial_id], values, state=state)
        self._completed_trials.add(trial_id)
