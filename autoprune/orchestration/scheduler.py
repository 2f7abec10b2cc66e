"""Early stopping of weak trials: successive halving (Ray Tune's ASHA), fair to every method.

A trial has two phases: the method's prune phase (ADMM iterations, AGP ramps, L0 gates, during
which the model is still nearly dense and its accuracy says little about the pruned result),
then fine-tuning of the pruned model at its final sparsity. ASHA compares trials at "rungs" of
a time attribute; here that attribute is `RUNG_KEY`, the fine-tune epoch count, which a trial
reports only in fine-tune epochs, so only pruned models are compared with each other, at equal
fine-tuning. ASHA ignores every result without it (the prune phase, the between-phases
checkpoint, the final result: `AsyncHyperBandScheduler.on_trial_result` returns CONTINUE when
the time attribute is missing). Also left out of the comparison:
- a trial's last fine-tune epoch: it has nothing left to save, and ASHA stops a trial that
  reaches `max_t`, which would record a finished trial as stopped;
- a trial whose planned cost is over the budget (known before training): it cannot reach the
  front, and its accuracy must not set the bar for the feasible ones.

A stopped trial is told to Optuna as PRUNED (searcher.py) with `STOPPED_ATTR`, the fine-tune
epoch it was stopped at, and its MLflow run ends KILLED with a note saying so (`stop_note`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ..errors import UserError

RUNG_KEY = "finetune_epoch"  # the ASHA time attribute: fine-tune epochs done (1-based)
STOPPED_ATTR = "stopped_at_finetune_epoch"  # Optuna user attr of a trial ASHA stopped
SCHEDULERS = ("asha", "none")
REDUCTION_FACTOR = 2  # at each rung, a trial in the lower half of those seen there stops
log = logging.getLogger("autoprune")


def rung_epoch(rec: dict[str, Any], finetune_epochs: float, feasible: bool) -> int | None:
    """The `RUNG_KEY` value of one epoch record of a trial, or None when ASHA must not see it.

    `rec` is a training record (`phase`, 0-based `epoch`); `finetune_epochs` the trial's own
    fine-tune length (fractions allowed: 2.5 epochs make 3 records).
    """
    if rec.get("phase") != "finetune" or not feasible:
        return None
    k = int(rec["epoch"]) + 1
    return k if k < math.ceil(finetune_epochs) else None


def max_finetune_epochs(study_epochs: float, dist: Any | None) -> int:
    """The most fine-tune epoch records any trial of the search can make (ASHA's `max_t`).

    `dist` is the space's `finetune.epochs` (a `space_schema.Dist`) or None. When the space
    searches the epochs, `max_t` must cover the longest: ASHA stops every trial reaching it.
    """
    if dist is None:
        longest = study_epochs
    elif dist.kind == "fixed":
        longest = dist.value
    elif dist.kind == "categorical":
        longest = max(float(c) for c in dist.choices)
    else:
        longest = dist.high
    return math.ceil(float(longest))


def make_scheduler(kind: str, max_t: int, trial_workers: int = 1) -> Any | None:
    """The Tune scheduler of `--scheduler kind` (None: every trial runs to its end).

    `max_t`: `max_finetune_epochs`. With fewer than 2 fine-tune epochs there is no rung to
    compare at (a trial's last epoch is never compared), so no scheduler is made. Nor for
    data-parallel trials (`trial_workers` > 1): a stopped one's Ray Train workers were not
    released and the next trial waited for their CPUs forever (seen on Ray 2.60, 2 CPUs).
    """
    if kind not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{kind}'; choose {' or '.join(SCHEDULERS)}")
    if kind == "none":
        return None
    if trial_workers > 1:
        log.info("ASHA is off for data-parallel trials (--trial-workers > 1): every trial runs "
                 "to its end")
        return None
    if max_t < 2:
        log.info("ASHA has nothing to compare: fine-tuning is one epoch, every trial runs to "
                 "its end")
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=RUNG_KEY, metric="val_accuracy", mode="max", max_t=max_t,
                         grace_period=1, reduction_factor=REDUCTION_FACTOR)


def stop_note(epoch: Any, val_accuracy: Any = None) -> str:
    """What a stopped trial's MLflow run says about it (it did not crash)."""
    where = f"fine-tune epoch {int(epoch)}" if isinstance(epoch, (int, float)) else \
        "a fine-tune epoch"
    val = f" (val {val_accuracy:.4f})" if isinstance(val_accuracy, (int, float)) else ""
    return (f"stopped early by ASHA at {where}{val}: its validation accuracy was in the lower "
            f"half of the trials compared at that epoch. Not an error; recorded as pruned in "
            f"Optuna, never on the front.")
