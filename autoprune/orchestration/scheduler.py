"""Early stopping of weak trials: successive halving (ASHA), fair to every method and size.

A trial has two phases: the method's prune phase (ADMM iterations, AGP ramps, L0 gates, during
which the model is still nearly dense and its accuracy says little about the pruned result),
then fine-tuning of the pruned model at its final sparsity. ASHA compares trials at "rungs" of
a time attribute; here that attribute is `RUNG_KEY`, the fine-tune epoch count, which a trial
reports only in fine-tune epochs, so only pruned models are compared with each other, at equal
fine-tuning. Every result without it is ignored (the prune phase, the between-phases
checkpoint, the final result). Also left out of the comparison:
- a trial's last fine-tune epoch: it has nothing left to save;
- a trial whose planned cost is over the budget (known before training): it cannot reach the
  front, and its accuracy must not set the bar for the feasible ones.

Size-aware: a search is multi-objective, and each trial aims at its own share of the budget
(`SIZE_KEY`, from `target_floor` up to 1). Ray's ASHA ranks by accuracy alone, so a smaller
model was stopped for being less accurate than larger ones: on Fashion-MNIST at flops=0.4 it
stopped 19-20 of 24 trials, nearly every sampled trial below the full budget, and the front
below the budget stayed empty. Here a trial arriving at a rung is compared only with the
trials recorded there that are no larger than it (share at most its own plus
`SIZE_TOLERANCE`), and stops when it is in their lower half (`continues`): a model must beat
smaller ones to justify its size, while a trial of the full budget is compared with all, as
before. This is successive halving on the accuracy-size trade-off the front is made of (cf.
multi-objective ASHA, Schmucker et al. 2021), with one comparison rule a user can check.

The enqueued hand baselines (baselines.py) are never stopped: their rung results set the bar
for the sampled trials, but each runs to its end. A search promises never to return a model
worse than them, and ASHA broke that promise on digits at params=0.05: it stopped 5-6 of the 8
baselines on each of 3 seeds, mostly at fine-tune epoch 1 (the global-magnitude one, the peer's
own pruning, on seed 0), and the search lost to the peer. Spared, a baseline ASHA had stopped
became the pick of seed 1 (docs/benchmarks.md, ninth and tenth runs). A trial is a baseline
when its config carries `BASELINE_KEY` (searcher.py sets it).

A stopped trial is told to Optuna as PRUNED (searcher.py) with `STOPPED_ATTR`, the fine-tune
epoch it was stopped at, and its MLflow run ends KILLED with a note saying so (`stop_note`).
Every rung result is also kept on its Optuna trial (`store.RUNGS_ATTR`), so that a resumed search
compares its new trials with the old ones (`SizeAwareASHA.restore`) instead of letting every
new trial through until the rungs fill again.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from ..errors import UserError
from ..names import VAL_ACC

RUNG_KEY = "finetune_epoch"  # the ASHA time attribute: fine-tune epochs done (1-based)
STOPPED_ATTR = "stopped_at_finetune_epoch"  # Optuna user attr of a trial ASHA stopped
SIZE_KEY = "budget_share"  # reported with each rung: the share of the budget the plan uses
SIZE_TOLERANCE = 0.02  # shares this much larger still count as "no larger" (equal-size plans)
BASELINE_KEY = "enqueued_baseline"  # trial config key of an enqueued baseline: never stopped
SCHEDULERS = ("asha", "none")
REDUCTION_FACTOR = 2  # at each rung, a trial in the lower half of its comparison set stops
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


def continues(accuracy: float, share: float, recorded: list[tuple[float, float]],
              reduction_factor: float = REDUCTION_FACTOR) -> bool:
    """Whether a trial arriving at a rung goes on (pure: the rule of `SizeAwareASHA`).

    `recorded`: (accuracy, share) of the trials that reached this rung before it. Only those
    no larger than it (share <= its own + `SIZE_TOLERANCE`) are compared; it goes on when its
    accuracy is at least their (1 - 1/reduction_factor) quantile, as in Ray's ASHA, and always
    when none of them is that small.
    """
    peers = [a for a, s in recorded if s <= share + SIZE_TOLERANCE]
    if not peers:
        return True
    cutoff = float(np.nanpercentile(peers, (1.0 - 1.0 / reduction_factor) * 100.0))
    return accuracy >= cutoff


class SizeAwareASHA(FIFOScheduler):
    """Asynchronous successive halving over fine-tune epochs, comparing each trial only with
    trials no larger than it (`continues`; module docstring).

    Rungs are at grace_period * reduction_factor**k epochs below `max_t`; a trial is judged
    once at each rung, against the trials that reached it earlier (asynchronous, like Ray's
    `AsyncHyperBandScheduler`, one bracket). An enqueued baseline (`BASELINE_KEY` in its
    config) is recorded at each rung but never stopped.
    """

    def __init__(self, max_t: int, grace_period: int = 1,
                 reduction_factor: float = REDUCTION_FACTOR):
        super().__init__()
        self.max_t, self.reduction_factor = max_t, reduction_factor
        milestones, m = [], grace_period
        while m < max_t:
            milestones.append(m)
            m = max(m + 1, int(round(m * reduction_factor)))
        # milestone -> {trial_id: (accuracy, share)}
        self.rungs: dict[int, dict[str, tuple[float, float]]] = {m: {} for m in milestones}
        self.stopped = 0
        self.spared = 0  # rung comparisons an enqueued baseline lost but went on from

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        epoch, acc = result.get(RUNG_KEY), result.get(VAL_ACC)
        if epoch is None or acc is None:
            return TrialScheduler.CONTINUE
        share = float(result.get(SIZE_KEY, 1.0))
        for milestone in sorted(self.rungs, reverse=True):
            recorded = self.rungs[milestone]
            if epoch < milestone or trial.trial_id in recorded:
                continue
            go_on = continues(float(acc), share, list(recorded.values()),
                              self.reduction_factor)
            recorded[trial.trial_id] = (float(acc), share)
            if not go_on and (getattr(trial, "config", None) or {}).get(BASELINE_KEY):
                self.spared += 1
                log.debug(f"baseline trial {trial.trial_id} goes on past rung {milestone}")
            elif not go_on:
                self.stopped += 1
                return TrialScheduler.STOP
            break
        return TrialScheduler.CONTINUE

    def restore(self, history: list[dict[int, tuple[float, float]]]) -> int:
        """Record the rung results of an earlier run of this search (`store.rung_history`:
        one {fine-tune epoch: (accuracy, share)} per old trial), as if those trials had just
        reached them; returns how many old trials were recorded."""
        n = 0
        for i, rungs in enumerate(history):
            hit = False
            for milestone, recorded in self.rungs.items():
                if milestone in rungs:
                    acc, share = rungs[milestone]
                    recorded[f"earlier-{i}"] = (float(acc), float(share))
                    hit = True
            n += hit
        return n

    def debug_string(self) -> str:
        seen = ", ".join(f"epoch {m}: {len(r)}" for m, r in sorted(self.rungs.items()))
        return (f"SizeAwareASHA: {self.stopped} stopped, {self.spared} baseline(s) spared; "
                f"trials per rung: {seen}")


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
    return SizeAwareASHA(max_t=max_t)


def stop_note(epoch: Any, val_accuracy: Any = None) -> str:
    """What a stopped trial's MLflow run says about it (it did not crash)."""
    where = f"fine-tune epoch {int(epoch)}" if isinstance(epoch, (int, float)) else \
        "a fine-tune epoch"
    val = f" (val {val_accuracy:.4f})" if isinstance(val_accuracy, (int, float)) else ""
    return (f"stopped early by ASHA at {where}{val}: its validation accuracy was in the lower "
            f"half of the trials no larger than it compared at that epoch. Not an error; "
            f"recorded as pruned in Optuna, never on the front.")
