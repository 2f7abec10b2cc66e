"""The test hook of the trial path: faults injected on purpose (tests only).

Reliability tests need a worker that dies mid-trial, a trial that raises and trials slow enough
to interrupt. The driver reads these variables once (`Faults.from_env`) and hands the result to
the workers in the `TrialContext` (workers of an existing Ray cluster do not see the driver's
environment); a trial calls `on_start` and `on_epoch`, which do nothing unless a variable is set:

    AUTOPRUNE_TEST_KILL_TRIAL=<n>   SIGKILL the worker of trial n once, after its first
                                    fine-tune epoch (a marker file in the study folder makes it
                                    happen only the first time)
    AUTOPRUNE_TEST_RAISE_TRIAL=<n>  trial n raises RuntimeError (every attempt)
    AUTOPRUNE_TEST_SLOW_TRIAL=<s>   every trial sleeps s seconds after each epoch; the
                                    finalist of trial n sleeps s * (n + 1) (finalists run at
                                    once, and must still end one after another)
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "AUTOPRUNE_TEST_"


@dataclass(frozen=True)
class Faults:
    kill_trial: int | None = None
    raise_trial: int | None = None
    slow_seconds: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        def number(name: str) -> int | None:
            value = environ.get(PREFIX + name)
            return int(value) if value is not None else None

        return cls(kill_trial=number("KILL_TRIAL"), raise_trial=number("RAISE_TRIAL"),
                   slow_seconds=float(environ.get(PREFIX + "SLOW_TRIAL") or 0))

    def on_start(self, number: int) -> None:
        """Before the trial's training: raise if this trial is the one to fail."""
        if self.raise_trial is not None and self.raise_trial == number:
            raise RuntimeError(f"injected failure of trial {number} (AUTOPRUNE_TEST_RAISE_TRIAL)")

    def on_final_epoch(self, trial: int) -> None:
        """After each epoch of the finalist of `trial` (finalists.py): sleep, longer for a
        later trial, so a test can kill the driver between two finalists' ends."""
        if self.slow_seconds:
            time.sleep(self.slow_seconds * (max(trial, 0) + 1))

    def on_epoch(self, number: int, phase: str, study_dir: str) -> None:
        """After each epoch: sleep, or die like a lost worker would (once, in fine-tuning)."""
        if self.slow_seconds:
            time.sleep(self.slow_seconds)
        if self.kill_trial is None or self.kill_trial != number or phase != "finetune":
            return
        marker = Path(study_dir) / f".killed-trial-{number}"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
