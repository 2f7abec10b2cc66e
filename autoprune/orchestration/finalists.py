"""The finalist stage: the best points of a search retrained with the full fine-tune.

Trials fine-tune briefly (and ASHA stops the weak ones sooner still), which is what lets a
search try many candidates; a model a user ships is fine-tuned for longer. So a search ends by
retraining its `k` most accurate in-budget trials (validation accuracy, ties broken by the
validation loss) with the same method,
hyperparameters, per-layer sparsities and seed, but `epochs` of fine-tuning: what `autoprune
prune` does with the trial's rerun command plus `--finetune epochs=N` (and the stretched phase
lengths below), so a finalist reproduces from one command (its own `rerun`). `best`, the
front, `report` and `export` then use the finalist's accuracy and weights
(`TrialRecord.with_finalist`).

A method with a phase of its own (an AGP ramp, ADMM's W-steps, L0 gates) is stretched with the
fine-tune (`stretch`): the finalist's epochs are shared between the two phases as the trial
shared them, so a trial of a 2-epoch ramp and 4 fine-tune epochs becomes a finalist of an
8-epoch ramp and 17, not of 2 and 23. Slow pruning is what extreme sparsity needs most (Zhu &
Gupta 2017); LeNet-5 on MNIST, 18 epochs, 3 seeds (`bench/phase_stretch.py`): at 355.9x weights
ramp 2 + fine-tune 16 test 0.9692, ramp 8 + 10 test 0.9801; at 71.2x 0.9906 and 0.9911.

Resumable: a finalist's result is stored on the Optuna study (`store.FINALIST_PREFIX`) as soon
as it finishes, and the finalists are chosen from the search-time records only, so a stage
interrupted or killed part-way chooses the same trials again, skips the finished ones and reruns
the rest in their existing MLflow runs (finalist_runs.py).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .. import store
from ..finalist_runs import FINALIST_METRICS, FinalistRuns
from ..record import TrialRecord
from ..study import Study
from .cluster import largest_node_cpus
from .trial import TrialContext

log = logging.getLogger("autoprune")
EPOCH_FACTOR = 3  # finalists fine-tune at least this many times the study's trial fine-tune
MAX_FACTOR = 25  # and, when their length follows the search's time, at most this
SECONDS_ATTR = "finalist_seconds"  # Optuna study attr: each finalist's time, fixed once


@dataclass(frozen=True)
class Finalist:
    """What one finalist retrains (all of it read off its trial's record)."""

    trial: int
    method: str
    params: dict[str, Any]
    targets: dict[str, float]
    finetune: dict[str, Any]  # the trial's fine-tune overrides, epochs raised
    # None: fine-tune for finetune["epochs"]; else for as many epochs as fit in `seconds`
    # (an epoch is timed first), within [finetune["epochs"], max_epochs]
    seconds: float | None = None
    max_epochs: int | None = None
    trial_epochs: float | None = None  # the trial's fine-tune epochs; None: the study's

    @property
    def epochs(self) -> int:
        return int(self.finetune["epochs"])

    def epochs_for(self, epoch_seconds: float, phase: float = 0.0, spent: float = 0.0) -> int:
        """The fine-tune length this finalist plans, given the time of one epoch: what fits in
        its time less `spent` seconds (start-up, timing that epoch) and less the `phase` epochs
        of its trial's own method phase, which `stretch` adds back. (Counting neither, the twelfth
        runs' finalists overran their time by 19-23 %: docs/benchmarks.md.)"""
        if self.seconds is None:
            return self.epochs
        fit = int(max(0.0, self.seconds - spent) / max(epoch_seconds, 1e-9) - phase)
        return max(self.epochs, min(fit, self.max_epochs or fit))

    def refit(self, planned: int, left: float, epoch_seconds: float, least: int) -> int:
        """The fine-tune length once the masks are fixed: as many epochs as fit in the `left`
        seconds at `epoch_seconds` each (the fine-tune's own pace, timed then), at least
        `least` and at most `max_epochs`; `planned` if not fitted to a time.

        The plan came from one dense epoch timed as the finalist started, before the method's
        phase: the fourteenth runs' AGP finalists, three at once on two cores, then ran 13-17 %
        over their time. Refitted at the phase's pace, they ended 9-11 % early (the phase is
        slower per epoch than the fine-tune): docs/benchmarks.md, fifteenth runs.
        """
        if self.seconds is None or epoch_seconds <= 0:
            return planned
        fit = int(max(0.0, left) / epoch_seconds)
        return max(least, min(fit, self.max_epochs or fit))


def final_epochs(study: Study, given: int | None) -> int:
    """`--final-epochs`, or else the least a finalist fine-tunes: EPOCH_FACTOR times the
    study's fine-tune epochs."""
    return int(given) if given is not None else EPOCH_FACTOR * int(study.finetune.epochs)


def finalist_seconds(search_seconds: float, k: int, at_once: int) -> float:
    """Each finalist's time when the stage is to last about as long as the search before it
    (`search_seconds`: the trial stage with its start-up, Ray's included, not the dense model's
    training; `k` finalists, `at_once` at a time, see `pack`): half the user's wall-clock
    explores, half exploits. Counting the trial stage alone gave the digits finalists 14-17 s
    of searches lasting 36-47 s (docs/benchmarks.md, ninth runs).
    A short search still gives each finalist `final_epochs`."""
    rounds = -(-max(k, 1) // max(at_once, 1))
    return max(0.0, search_seconds) / rounds


def pack(k: int, workers: int, cpus: float, gpus: float,
         available: float | None = None, node: float | None = None) -> tuple[int, float]:
    """How many of `k` finalists run at once, and the CPUs each is given.

    On CPUs all `k` run at once and share the `workers` x `cpus` the trials had: the stage
    then uses every core for its whole length. (Run `workers` at a time, a third finalist on
    2 workers would run alone in a second round with one core idle, and a single finalist on
    4 workers would use one core of four.) A share of one CPU or more is whole (Ray wants
    whole numbers above 1, and torch whole threads); below one it is a fraction, cut to
    Ray's 4 decimals so that `k` of them fit. With GPUs a finalist keeps the trial's
    CPUs and GPUs, `workers` at a time: a GPU is not split further than the user split it.
    `available`: the cluster's CPUs, when fewer than `workers` x `cpus` (the trials queued).
    `node`: the CPUs of the cluster's largest node. A finalist is one process on one node, so
    its share is capped there (a lone finalist after 2 one-CPU trials on two one-CPU nodes
    asked for 2 CPUs, which no node has, and Ray waited for ever).
    """
    k = max(1, k)
    if gpus > 0:
        return min(k, max(1, workers)), cpus
    total = max(1, workers) * cpus
    share = (total if available is None else min(total, max(available, 1e-4))) / k
    if node is not None:
        share = min(share, max(node, 1e-4))
    return k, float(int(share)) if share >= 1 else math.floor(share * 1e4) / 1e4


def choose(records: list[TrialRecord], k: int) -> list[TrialRecord]:
    """The `k` most accurate in-budget trials at search time (a tie in validation accuracy:
    the lower validation loss, then the smaller model).

    Not the top of the front: under `params=0.05` the front's other points are models far below
    the budget, on it for their tiny FLOPs (an axis the user did not budget), and the stage
    spent two of its three retrains on them (val 0.92 and 0.94 where a dominated trial had
    0.99) instead of on candidates for the best in-budget model (docs/benchmarks.md, ninth
    runs). The front stays what the user browses; `best` is still a point of it.

    Records must be the search-time ones (`store.trial_records(..., finalists=False)`), so
    that a resumed stage makes the same choice. Trials recorded before their per-layer
    sparsities were kept cannot be retrained and are passed over.
    """
    usable = [r for r in records if r.feasible and r.layer_sparsity and r.method]
    usable.sort(key=lambda r: (-r.val_accuracy, math.inf if r.val_loss is None else r.val_loss,
                               r.flops_frac, r.params_frac, r.trial))
    return usable[:max(0, k)]


def plan(record: TrialRecord, epochs: int, seconds: float | None = None,
         max_epochs: int | None = None) -> Finalist:
    """A trial's finalist: its own settings with at least `epochs` of fine-tuning (with
    `seconds`: as many more as fit in that time, up to `max_epochs`)."""
    ft = dict(record.finetune or {})
    trial_epochs = ft.get("epochs")
    ft["epochs"] = max(int(epochs), int(ft.get("epochs", 0)))
    return Finalist(trial=record.trial, method=str(record.method),
                    params=record.hyperparameters(), targets=dict(record.layer_sparsity or {}),
                    finetune=ft, seconds=seconds, max_epochs=max_epochs,
                    trial_epochs=None if trial_epochs is None else float(trial_epochs))


def stretch(spec: Finalist, epochs: int, trial_epochs: float,
            phase_of: Callable[[dict[str, Any]], float]) -> tuple[dict[str, Any], int]:
    """The hyperparameters and fine-tune epochs of a finalist given `epochs` of fine-tuning.

    Its whole length (the method's phase, `phase_of(params)` epochs, plus `epochs`) is shared
    between the phases in the trial's proportion (`trial_epochs` of fine-tuning): the method's
    length hyperparameters grow by the factor the whole run grows by (`Pruner.stretched`,
    within their valid ranges), and the fine-tune keeps what is left, never less than the
    trial had. A one-shot method (no phase) puts it all into the fine-tune, as before.
    """
    phase = phase_of(spec.params)
    total = phase + epochs
    factor = total / max(phase + trial_epochs, 1e-9)
    if phase <= 0 or trial_epochs <= 0 or factor <= 1:
        return dict(spec.params), epochs
    from ..pruning import get_method

    params = get_method(spec.method).stretched(spec.params, factor)
    return params, max(math.ceil(trial_epochs), int(round(total - phase_of(params))))


def _epoch_seconds(wb, spec: Finalist, seed: int) -> float:
    """The time of one fine-tune epoch of this study here (on a throwaway dense copy)."""
    from ..engine import train

    recipe = wb.study.finetune.overridden({**spec.finetune, "epochs": 1})
    t0 = time.perf_counter()
    train(wb.fresh_model(), wb.data, recipe, seed=seed)
    return time.perf_counter() - t0


def retrain(ctx: TrialContext, spec: Finalist, cpus: float | None = None) -> dict[str, Any]:
    """Run one finalist in a Ray worker (with `cpus` threads' worth of CPU, default the
    trial's); its metrics, or `failed` with the error."""
    from ..device import set_threads
    from ..pipeline import phase_epochs, run_pruning
    from .trial import save_weights, workbench

    start = time.perf_counter()
    try:
        set_threads(ctx.cpus if cpus is None else cpus)
        wb = workbench(ctx)

        def progress(rec: dict) -> None:
            ctx.faults.on_final_epoch(spec.trial)

        seed = ctx.seed + max(spec.trial, 0)
        phase_of = functools.partial(phase_epochs, wb, spec.method)
        epochs = spec.epochs
        timing: dict[str, float] = {}  # what sized it, kept to check the estimates
        if spec.seconds is not None:
            timing["dense_epoch"] = _epoch_seconds(wb, spec, seed)
            epochs = spec.epochs_for(timing["dense_epoch"], phase_of(spec.params),
                                     time.perf_counter() - start)
        trial_epochs = (float(wb.study.finetune.epochs) if spec.trial_epochs is None
                        else spec.trial_epochs)
        params, epochs = stretch(spec, epochs, trial_epochs, phase_of)
        # never shorter in all than the floor (`spec.epochs` + its trial's phase), nor a
        # fine-tune shorter than its trial's
        least = max(math.ceil(trial_epochs),
                    int(round(spec.epochs + phase_of(spec.params) - phase_of(params))))

        timing["planned"] = epochs

        def refit(epoch_seconds: float) -> int:
            nonlocal epochs
            timing.update(refit_at=time.perf_counter() - start, pace=epoch_seconds)
            epochs = spec.refit(epochs, (spec.seconds or 0.0) - timing["refit_at"],
                                epoch_seconds, least)
            return epochs

        model, m = run_pruning(wb, spec.method, params, spec.targets,
                               finetune={**spec.finetune, "epochs": epochs}, seed=seed,
                               on_epoch=progress, refit=refit)
        ckpt = save_weights(model, Path(ctx.study_dir) / "checkpoints" / f"final-{spec.trial}.pt")
    except Exception as exc:  # noqa: BLE001 - recorded as a failed finalist, the search goes on
        return {"failed": True, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return {**{k: float(m[k]) for k in FINALIST_METRICS}, "checkpoint": str(ckpt), "epochs": epochs,
            "phase_epochs": phase_of(params),
            **{k: round(v, 2) for k, v in timing.items()},
            "inside_seconds": round(time.perf_counter() - start, 2),
            "hparams": json.dumps(params), "history": m["history"]}


def run_stage(ot_study: optuna.Study, tracker, parent_id: str, ctx: TrialContext, *, k: int,
              epochs: int, workers: int, cpus: float, gpus: float,
              seconds: float | None = None, max_epochs: int | None = None) -> dict[str, Any]:
    """Retrain the chosen finalists that have no result yet: on CPUs all at once, sharing the
    `workers` x `cpus` of the trial stage; with GPUs `workers` at a time (`pack`).

    `epochs` fixed (`--final-epochs`), or with `seconds` the least of a length that fits in
    `seconds` per finalist (up to `max_epochs`). The time is kept on the study the first time,
    so a resumed stage gives its finalists the same.

    Returns {"chosen": [trial numbers], "ran": n, "interrupted": bool}. Ctrl-C (or a
    KeyboardInterrupt from the caller) cancels the running ones and ends their runs KILLED;
    their results are simply missing, and `--resume` retrains them.
    """
    import ray

    chosen = choose(store.trial_records(ot_study, finalists=False), k)
    done = store.finalist_results(ot_study)
    if seconds is not None:
        if SECONDS_ATTR not in ot_study.user_attrs and seconds > 0:
            ot_study.set_user_attr(SECONDS_ATTR, float(seconds))
        seconds = float(ot_study.user_attrs.get(SECONDS_ATTR, seconds))
    todo = [plan(r, epochs, seconds, max_epochs) for r in chosen if r.trial not in done]
    runs = FinalistRuns(tracker, parent_id)
    for r in chosen:  # finished in Optuna, but the driver died before MLflow heard of it
        result = done.get(r.trial)
        if result is not None and runs.status.get(r.trial) in (None, "RUNNING"):
            runs.start(r.trial, str(r.method), int(result.get("epochs") or epochs))
            if result.get("failed"):
                runs.fail(r.trial, str(result.get("error", "error")))
            else:
                runs.finish(r.trial, result)
    runs.kill_running(keep={f.trial for f in todo})  # chosen no more (e.g. --finalists lowered)
    summary = {"chosen": [r.trial for r in chosen], "ran": 0, "interrupted": False}
    if not todo:
        return summary
    at_once, each = pack(len(todo), workers, cpus, gpus,
                         ray.cluster_resources().get("CPU"), largest_node_cpus())
    length = (f"{todo[0].epochs} fine-tune epochs" if seconds is None else
              f"as many fine-tune epochs as fit in {seconds:.0f} s each (the trial stage's "
              f"time; {todo[0].epochs} to {max_epochs})")
    log.info(f"finalist stage: retraining trial(s) {', '.join(str(f.trial) for f in todo)} "
             f"with {length}, {at_once} at a time with {each:g} CPU(s) each"
             + (f" ({len(chosen) - len(todo)} finished before)" if len(chosen) > len(todo)
                else ""))
    remote = ray.remote(retrain).options(num_cpus=each, num_gpus=gpus, max_retries=1)
    ctx_ref = ray.put(ctx)
    waiting, running = list(todo), {}
    try:
        while waiting or running:
            while waiting and len(running) < at_once:
                spec = waiting.pop(0)
                runs.start(spec.trial, spec.method, spec.epochs)
                running[remote.remote(ctx_ref, spec, each)] = (spec, time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1)
            spec, t0 = running.pop(ready[0])
            _record(ot_study, runs, spec, ray.get(ready[0]), time.monotonic() - t0)
            summary["ran"] += 1
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref, force=True)
        runs.kill_running()
        summary["interrupted"] = True
        log.info("interrupted: the finalists still running are recorded as killed")
    return summary


def finalist_rows(ot_study: optuna.Study, chosen: list[int]) -> list[dict[str, Any]]:
    """What `--json` shows of the finalists: search-time and retrained accuracy side by side."""
    search = {r.trial: r for r in store.trial_records(ot_study, finalists=False)}
    done = store.finalist_results(ot_study)
    rows = []
    for n in chosen:
        r, f = search.get(n), done.get(n, {})
        rows.append({"trial": n, "method": r.method if r else None,
                     "search_val_accuracy": r.val_accuracy if r else None,
                     "search_test_accuracy": r.test_accuracy if r else None,
                     **{k: f.get(k) for k in ("val_accuracy", "test_accuracy", "epochs",
                                              "phase_epochs", "seconds", "failed", "error")
                        if k in f}})
    return rows


def _record(ot_study: optuna.Study, runs: FinalistRuns, spec: Finalist, result: dict,
            seconds: float) -> None:
    """Store one finalist's result (Optuna first: it is what a resumed stage checks)."""
    history = result.pop("history", [])
    result = {**result, "seconds": round(seconds, 2)}
    ot_study.set_user_attr(f"{store.FINALIST_PREFIX}{spec.trial}", result)
    if result.get("failed"):
        runs.fail(spec.trial, result.get("error", "error"))
        log.info(f"finalist of trial {spec.trial} failed: {result.get('error')}")
        return
    runs.finish(spec.trial, result, history)
    phase = result.get("phase_epochs") or 0
    length = (f"its phase {phase:.3g} + {result.get('epochs')} fine-tune epochs" if phase
              else f"{result.get('epochs')} epochs")
    log.info(f"finalist of trial {spec.trial} ({spec.method}, {length}): "
             f"val {result['val_accuracy']:.4f} test {result['test_accuracy']:.4f}")
