"""Driver-side Tune callbacks: MLflow records and live progress.

They run in the driver process only, so the default SQLite tracking store has a single writer
whatever the number of workers or nodes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from ray.tune import Callback, Stopper

from ..budget import Budget
from ..record import TrialRecord
from .scheduler import BASELINE_KEY, RUNG_KEY, stop_note
from .searcher import TRIAL_NUMBER_KEY

_INTERNAL = {TRIAL_NUMBER_KEY, BASELINE_KEY}
CURVE_KEYS = ("step", "epoch", "phase", "val_accuracy", "loss")  # of an epoch's report
FINAL_METRICS = TrialRecord.RESULT_METRICS
NODE_KEYS = ("node_id", "node_ip")  # where the trial ran, as params of its MLflow run
KILLED_ERROR = "the search was interrupted before this trial finished"
log = logging.getLogger("autoprune")


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "trial raised an error"


class TrackingCallback(Callback):
    """One MLflow child run per trial: opened RUNNING when the trial starts, ended once when it
    ends (a trial Tune retried after its worker died keeps its run and records `retries`).

    A trial that ASHA stopped has no final result: its run ends KILLED with the curves of its
    epoch reports so far and a note saying where and why it was stopped (`stop_note`)."""

    def __init__(self, tracker, parent_id: str) -> None:
        self.tracker = tracker
        self.parent_id = parent_id
        self.run_ids: dict[int, str] = {}
        self.ended: set[int] = set()
        self.curves: dict[int, dict[int, dict]] = {}  # trial -> step -> epoch report

    def _params(self, trial) -> dict:
        return {k: v for k, v in trial.config.items() if k not in _INTERNAL}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        number = trial.config.get(TRIAL_NUMBER_KEY)
        if number is not None and int(number) not in self.run_ids:
            self.run_ids[int(number)] = self.tracker.start_trial(
                self.parent_id, int(number), str(trial.config.get("method", "")),
                self._params(trial), baseline=bool(trial.config.get(BASELINE_KEY)))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        number = trial.config.get(TRIAL_NUMBER_KEY)
        if number is not None and result.get("phase") in ("prune", "finetune"):
            rec = {k: result[k] for k in CURVE_KEYS if k in result}
            self.curves.setdefault(int(number), {})[int(result.get("step", 0))] = rec

    def _log(self, trial, status: str, error: str | None = None,
             stopped: str | None = None) -> None:
        cfg = trial.config
        if TRIAL_NUMBER_KEY not in cfg:
            return  # never got an Optuna trial: nothing to record
        number = int(cfg[TRIAL_NUMBER_KEY])
        result = trial.last_result or {}
        params = self._params(trial)
        params.update({k: result[k] for k in NODE_KEYS if k in result})
        params["retries"] = int(getattr(trial, "num_failures", 0))
        metrics = {k: float(result[k]) for k in FINAL_METRICS
                   if isinstance(result.get(k), (int, float))}
        reports = [rec for _, rec in sorted(self.curves.pop(number, {}).items())]
        # a final result has the whole history; a stopped trial has its epoch reports
        history = json.loads(result["history"]) if result.get("history") else reports
        layers = json.loads(result["layer_sparsity"]) if result.get("layer_sparsity") else None
        if result.get("failed"):
            status = "FAILED"
            error = result.get("error_detail") or result.get("error") or error
        self.run_ids[number] = self.tracker.log_trial(
            self.parent_id, number, str(cfg.get("method", "")), params,
            metrics if status == "FINISHED" else {}, history, layers, status, error,
            stopped=stopped, baseline=bool(cfg.get(BASELINE_KEY)))
        self.ended.add(number)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if result.get("is_final", False):
            self._log(trial, "FINISHED")
        else:  # stopped by the scheduler (its last report is the one it was stopped at)
            self._log(trial, "KILLED", stopped=stop_note(result.get(RUNG_KEY),
                                                         result.get("val_accuracy")))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._log(trial, "FAILED", _error_text(trial))

    def on_experiment_end(self, trials, **info) -> None:
        # A stopped experiment (Ctrl-C) ends its running and pending trials without completing
        # them: record each trial that has not been recorded yet as killed.
        for t in trials:
            number = t.config.get(TRIAL_NUMBER_KEY)
            if number is not None and int(number) not in self.ended:
                self._log(t, "KILLED", KILLED_ERROR)


class ProgressCallback(Callback):
    """One line per finished trial: counts and the best feasible accuracy so far."""

    def __init__(self, total: int | None, done_before: int, budget: Budget) -> None:
        # total None: an open-ended search (a time limit, no trial count)
        self.total, self.done, self.budget = total, done_before, budget
        self.failed = 0
        self.best: tuple[float, str] | None = None

    def _line(self, trials, trial, what: str) -> None:
        running = sum(1 for t in trials if t.status == "RUNNING")
        best = f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "-"
        of = "" if self.total is None else f"/{self.total}"
        log.info(f"[{self.done}{of} done, {running} running, {self.failed} failed] "
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
            at = f" at fine-tune epoch {r[RUNG_KEY]}" if RUNG_KEY in r else ""
            self._line(trials, trial, f"{method} stopped early by ASHA{at} "
                                      f"(val {r.get('val_accuracy', 0.0):.4f})")
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

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        cause = _error_text(trial).split(". ")[0][:120]
        self._line(trials, trial, f"lost its worker ({cause}); retrying from its last "
                                  f"checkpoint")


class Interrupt(Stopper):
    """Ctrl-C handling for the duration of a search (replaces Tune's own handler).

    The first SIGINT asks Tune to stop every trial and end the experiment (the driver then marks
    the running trials killed in Optuna and MLflow and prints how to resume); a second one
    raises KeyboardInterrupt at once. Tune's handler would stop just as gracefully but tells
    nobody that it did.
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.requested

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.info("interrupted: stopping the running trials (Ctrl-C again to quit at once)")

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupt]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals only reach the main thread; nothing to install
            return
        previous = signal.getsignal(signal.SIGINT)
        flag = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
            if flag is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = flag
