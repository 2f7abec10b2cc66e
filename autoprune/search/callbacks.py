"""Driver-side Tune callbacks: MLflow records and live progress.

They run in the driver process only, so the default SQLite tracking store has a single writer
whatever the number of workers or nodes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ray.tune import Callback

from ..budget import Budget
from .searcher import TRIAL_NUMBER_KEY

_INTERNAL = {TRIAL_NUMBER_KEY}
FINAL_METRICS = ("val_accuracy", "test_accuracy", "flops_frac", "params_frac",
                 "compact_flops_frac", "compact_params_frac", "flops", "params",
                 "weight_compression", "budget_violation", "target", "dense_val_accuracy",
                 "dense_test_accuracy")


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "trial raised an error"


class TrackingCallback(Callback):
    """One MLflow child run per trial, written when the trial ends."""

    def __init__(self, tracker, parent_id: str) -> None:
        self.tracker = tracker
        self.parent_id = parent_id
        self.run_ids: dict[int, str] = {}

    def _log(self, trial, status: str, error: str | None = None) -> None:
        cfg = trial.config
        number = int(cfg.get(TRIAL_NUMBER_KEY, -1))
        result = trial.last_result or {}
        params = {k: v for k, v in cfg.items() if k not in _INTERNAL}
        metrics = {k: float(result[k]) for k in FINAL_METRICS
                   if isinstance(result.get(k), (int, float))}
        history = json.loads(result["history"]) if result.get("history") else []
        layers = json.loads(result["layer_sparsity"]) if result.get("layer_sparsity") else {}
        if result.get("failed"):
            status, error = "FAILED", result.get("error", error)
        self.run_ids[number] = self.tracker.log_trial(
            self.parent_id, number, str(cfg.get("method", "")), params,
            metrics if status == "FINISHED" else {}, history, layers, status, error)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        final = (trial.last_result or {}).get("is_final", False)
        self._log(trial, "FINISHED" if final else "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._log(trial, "FAILED", _error_text(trial))


class ProgressCallback(Callback):
    """One line per finished trial: counts and the best feasible accuracy so far."""

    def __init__(self, total: int, done_before: int, budget: Budget,
                 log: Callable[[str], None]) -> None:
        self.total, self.done, self.budget, self.log = total, done_before, budget, log
        self.failed = 0
        self.best: tuple[float, str] | None = None
        self.interrupted = False

    def _line(self, trials, trial, what: str) -> None:
        running = sum(1 for t in trials if t.status == "RUNNING")
        best = f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "-"
        self.log(f"[{self.done}/{self.total} done, {running} running, {self.failed} failed] "
                 f"trial {trial.config.get(TRIAL_NUMBER_KEY)} {what}; best in budget: {best}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        r = trial.last_result or {}
        method = trial.config.get("method", "?")
        if r.get("failed"):
            self.failed += 1
            self._line(trials, trial, f"{method} failed: {r.get('error', '')}")
            return
        if not r.get("is_final"):
            self.done += 1
            self._line(trials, trial, f"{method} stopped early")
            return
        self.done += 1
        feasible = r.get("budget_violation", 1.0) <= 1e-12
        if feasible and (self.best is None or r["val_accuracy"] > self.best[0]):
            self.best = (r["val_accuracy"], method)
        self._line(trials, trial, f"{method} val {r['val_accuracy']:.4f} "
                                  f"flops {r['flops_frac']:.3f} params {r['params_frac']:.3f}"
                                  f"{'' if feasible else ' (over budget)'}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        self._line(trials, trial, f"error: {_error_text(trial)}")

    def on_experiment_end(self, trials, **info) -> None:
        self.interrupted = any(t.status not in ("TERMINATED", "ERROR") for t in trials)
