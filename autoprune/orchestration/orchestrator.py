"""The search: Ray Tune runs trials, Optuna proposes them, the driver records them in MLflow.

The Optuna study (SQLite in the study folder, or an RDB URL) is the source of truth for what
has been tried: resuming a search means loading it, failing the trials that were left RUNNING by a
dead driver (marked killed), and running only the trials still missing. Tune's own experiment
state is not restored (its resume path loses multi-objective results, see STACK_NOTES.md). MLflow
holds the same trials as child runs of one parent run per study folder, keyed by the Optuna trial
number, so nothing is recorded twice; `reconcile` brings MLflow in line with the study after a
driver was interrupted or killed. Failure handling as a whole is described in docs/cluster.md.

Everything that can be checked before work starts is (input, cluster reachability and
resources, model, data, dense checkpoint, budget), before any store is created: bad input
leaves an existing output folder as it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna

from .. import store
from ..budget import Budget
from ..data import data_root, is_streamed
from ..engine import Recipe
from ..errors import UserError
from ..paths import SPACES_DIR, resolve_yaml
from ..pipeline import Workbench
from ..study import Study, load_study
from .baselines import baseline_params, enqueue_baselines, variant_axes
from .cluster import host_port, init_ray, tune_storage
from .distributed import share_data, trial_resources
from .faults import Faults
from .finalists import (
    MAX_FACTOR,
    final_epochs,
    finalist_rows,
    finalist_seconds,
    pack,
    run_stage,
)
from .options import OBJECTIVES, SearchOptions, absolute, make_sampler, resume_hint, study_ref
from .projection import CostTable, min_reachable
from .resume import (
    StudyLock,
    finished_before,
    finished_count,
    open_storage,
    prepare_optuna,
    reconcile,
)
from .scheduler import SCHEDULERS, make_scheduler, max_finetune_epochs
from .space import SearchSpace
from .summary import summarize
from .trial import TrialContext

__all__ = ["SearchOptions", "StudyLock", "search"]
log = logging.getLogger("autoprune")


def _space_path(opts: SearchOptions, study: Study) -> Path:
    name = opts.space or study.space
    path = resolve_yaml(name, SPACES_DIR)
    if path is None:
        raise UserError(f"search space '{name}' not found (a .yaml path or one of "
                        f"{', '.join(p.stem for p in sorted(SPACES_DIR.glob('*.yaml')))})")
    return path


@dataclass
class Suggest:
    """The define-by-run space for Ray's OptunaSearch (a class, so Tune can pickle it)."""

    space: SearchSpace
    layers: list[str]

    def __call__(self, trial: optuna.Trial) -> dict | None:
        return self.space.suggest(trial, self.layers)


def _check_budget_reachable(wb: Workbench, budget: Budget, space: SearchSpace) -> None:
    """Refuse, before any trial, a budget that even the finest granularity cannot reach."""
    max_sparsity = space.max_sparsity
    table = CostTable.from_accountant(wb.accountant, space.prunable(wb.layers))
    # the space is already restricted to filter methods under a flops= budget
    gran = "filter" if budget.structured else "weight"
    reach = min_reachable(table, gran, max_sparsity)
    for key, limit in budget.limits.items():
        if reach[key] > limit:
            raise UserError(f"budget {key}={limit:g} is below what the space can reach on "
                            f"{wb.study.model} by {gran} pruning (smallest {key} fraction "
                            f"{reach[key]:.4f} at max_sparsity {max_sparsity:g})")


def search(opts: SearchOptions) -> dict:
    """Run (or resume) a search; return the summary that `--json` prints. Progress goes to the
    "autoprune" logger (INFO)."""
    from ray import tune

    from ..tracking import Tracker
    from .callbacks import Interrupt, ProgressCallback, TrackingCallback
    from .searcher import PruningSearch
    from .trial import run_trial

    study = opts.study if isinstance(opts.study, Study) else load_study(opts.study)
    budget = Budget.parse(opts.budget or study.budget)
    space_path = _space_path(opts, study)
    space = SearchSpace.load(space_path).for_budget(budget.structured)
    trials = opts.trials or study.trials
    # a time limit without --trials: trials start until the time is up (as Optuna's
    # optimize(timeout=...) and Tune's num_samples=-1 do); the study's count then only sizes
    # the enqueued baselines
    open_ended = opts.time_limit is not None and opts.trials is None
    if trials < 1 or opts.workers < 1 or opts.cpus_per_trial <= 0 or opts.gpus_per_trial < 0 \
            or opts.trial_workers < 1 or opts.finalists < 0 \
            or (opts.final_epochs is not None and opts.final_epochs < 1):
        raise UserError("--trials, --workers, --trial-workers and --final-epochs must be >= 1, "
                        "--finalists >= 0, --cpus-per-trial > 0, --gpus-per-trial >= 0")
    if opts.ray_address:
        host_port(opts.ray_address)
    if opts.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{opts.scheduler}'; choose asha or none")
    if opts.objective not in OBJECTIVES:
        raise UserError(f"unknown objective '{opts.objective}'; choose "
                        f"{' or '.join(OBJECTIVES)}")
    sampler = make_sampler(opts.sampler, opts.seed)
    out = Path(opts.out).expanduser().resolve()
    study_dir = out / study.name
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        probe = study_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror}") from None

    with StudyLock(study_dir):
        t_start = time.monotonic()  # the finalists get as long as the search before them
        storage_url = store.optuna_url(study_dir, opts.optuna_storage)
        local_db = store.sqlite_file(storage_url)
        done = 0
        if local_db is None or local_db.exists():  # (opening creates the file)
            done = finished_before(open_storage(storage_url), study.name, opts.resume)
        remaining = -1 if open_ended else max(0, trials - done)
        if remaining != 0 or opts.finalists > 0:  # fail fast (no cluster, no GPUs) before
            init_ray(opts)  # anything is written
        # model, data, dense checkpoint and budget are checked before any store is created
        t_open = time.monotonic()
        wb = Workbench.open(study, out, data_root=opts.data_root, seed=opts.seed,
                            checkpoint=opts.dense_checkpoint, log=log.info)
        t_open = time.monotonic() - t_open  # (may train the dense model: not search time)
        _check_budget_reachable(wb, budget, space)
        space = space.for_data(
            {r.augment_name(wb.data.info.augment) for r in (study.prune, study.finetune)},
            Recipe().augment_name(wb.data.info.augment), is_streamed(study.dataset))
        storage = open_storage(storage_url)
        ot_study, objectives = prepare_optuna(storage, study.name, sampler,
                                              budget.objectives(opts.objective == "front"))
        dense = {"val_accuracy": wb.dense["val_accuracy"],
                 "test_accuracy": wb.dense["test_accuracy"], "flops": wb.dense["flops"],
                 "params": wb.dense["params"]}
        log.info(f"dense baseline of {study.name}: val {dense['val_accuracy']:.4f}, "
            f"test {dense['test_accuracy']:.4f}, {dense['flops'] / 1e6:.3f} M MACs, "
            f"{dense['params']:,} params")

        tracking_uri = opts.tracking_uri or store.default_tracking_uri(out)
        # artifacts beside a local store; a tracking server stores them where it is told to
        tracker = Tracker(tracking_uri, study.name,
                          out / "mlartifacts" if store.sqlite_file(tracking_uri) else None)
        config_record = {"study": study.name, "study_file": study.source,
                         "space": str(space_path), "budget": str(budget),
                         "trials": "until the time limit" if open_ended else trials,
                         "workers": opts.workers, "cpus_per_trial": opts.cpus_per_trial,
                         "gpus_per_trial": opts.gpus_per_trial, "sampler": opts.sampler,
                         "sampler_objectives": ",".join(k for k, _ in objectives),
                         "trial_workers": opts.trial_workers, "finalists": opts.finalists,
                         "final_epochs": final_epochs(study, opts.final_epochs),
                         "scheduler": opts.scheduler, "seed": opts.seed,
                         "optuna_storage": store.redact(storage_url), **study.describe()}
        # One parent run per study: reused by --resume, and by a rerun of a search that was
        # stopped before its first trial.
        parent = store.parent_run_id(ot_study)
        try:
            parent_id = tracker.start_search(config_record, str(budget), dense,
                                             parent_run_id=parent)
        except ValueError:  # the stored parent is not in this tracking store
            log.info(f"MLflow run {parent} of this study is not in {tracking_uri}; starting a "
                     f"new one")
            parent_id = tracker.start_search(config_record, str(budget), dense)
        ot_study.set_user_attr(store.PARENT_ATTR, parent_id)
        fixed = reconcile(ot_study, storage, tracker, parent_id)
        if fixed:
            log.info(f"recorded {fixed} trial(s) that an earlier driver left unfinished")
        if done:
            log.info(f"resuming: {done} trials already finished, "
                     f"{'more until the time limit' if open_ended else remaining} to go")

        status = "FINISHED"
        interrupted = False
        search_seconds = 0.0
        progress = ProgressCallback(total=None if open_ended else trials, done_before=done,
                                    budget=budget)
        ctx = None
        if remaining != 0 or opts.finalists > 0:
            if study.objects is not None:  # a custom study's model code goes to the workers
                study.objects.ship_by_value()
            ctx = TrialContext(study=study, space=space, out=str(out),
                               study_dir=str(study_dir), budget=str(budget),
                               data_root=str(data_root(opts.data_root)), seed=opts.seed,
                               cpus=opts.cpus_per_trial, checkpoint=absolute(
                                   opts.dense_checkpoint),
                               faults=Faults.from_env(), shared_data=share_data(wb.data),
                               trial_workers=opts.trial_workers, gpus=opts.gpus_per_trial)
        if remaining != 0:
            layers = wb.layers
            if opts.baselines and not done and (open_ended or remaining > 1):
                # start from the hand baselines (after `reconcile`, which fails trials left
                # waiting by a dead driver)
                table = CostTable.from_accountant(wb.accountant, space.prunable(layers))
                enqueue_baselines(ot_study, baseline_params(
                    space, table, layers, "filter" if budget.structured else "weight",
                    asdict(study.finetune)),
                    limit=(trials if open_ended else remaining) // 2)
            searcher = PruningSearch(space=Suggest(space, layers),
                                     metric=[k for k, _ in objectives],
                                     mode=[m for _, m in objectives], sampler=sampler,
                                     storage=storage, study_name=study.name,
                                     axes=variant_axes(space))
            # ASHA compares pruned models at equal fine-tune epochs, never prune phases
            scheduler = make_scheduler(opts.scheduler, max_finetune_epochs(
                study.finetune.epochs, space.finetune.get("epochs")), opts.trial_workers)
            if done and scheduler is not None:  # resumed: compare with the earlier trials too
                n_old = scheduler.restore(store.rung_history(ot_study))
                if n_old:
                    log.info(f"ASHA starts from the rung results of {n_old} earlier trial(s)")
            resources = trial_resources(opts)
            trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
            tracking_cb = TrackingCallback(tracker, parent_id)
            stop = Interrupt()
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                            num_samples=remaining,
                                            max_concurrent_trials=opts.workers,
                                            reuse_actors=True, time_budget_s=opts.time_limit),
                run_config=tune.RunConfig(
                    name=f"tune-{int(time.time())}", storage_path=tune_storage(opts, study_dir),
                    callbacks=[tracking_cb, progress], verbose=0, stop=stop,
                    failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                    checkpoint_config=tune.CheckpointConfig()),
            )
            try:
                with stop.installed():
                    tuner.fit()
            except KeyboardInterrupt:  # a second Ctrl-C: quit without Tune's graceful stop
                interrupted = True
            interrupted = interrupted or stop.requested
            # the search's time before the finalists: the trial stage and its start-up (Ray,
            # stores, workers), not the dense model's training
            search_seconds = time.monotonic() - t_start - t_open
            if interrupted:
                status = "KILLED"
            reconcile(ot_study, storage, tracker, parent_id)

        stage = {"chosen": [], "ran": 0, "interrupted": False}
        # --final-epochs fixes the finalists' length; by default the stage lasts about as long
        # as the search before it (finalists.finalist_seconds), the study's 3x as the least
        # (a resumed stage reuses the time first fixed: run_stage keeps it on the study)
        # (a data-parallel trial's CPUs go to single-process finalists: pack shares them)
        final_cpus = opts.cpus_per_trial * opts.trial_workers
        timed = None if opts.final_epochs is not None else finalist_seconds(
            search_seconds, opts.finalists,
            pack(opts.finalists, opts.workers, final_cpus, opts.gpus_per_trial)[0])
        if ctx is not None and opts.finalists > 0 and not interrupted:
            stage = run_stage(ot_study, tracker, parent_id, ctx, k=opts.finalists,
                              epochs=final_epochs(study, opts.final_epochs),
                              workers=opts.workers, cpus=final_cpus,
                              gpus=opts.gpus_per_trial, seconds=timed,
                              max_epochs=MAX_FACTOR * int(study.finetune.epochs))
            if stage["interrupted"]:
                interrupted, status = True, "KILLED"

        summary = summarize(ot_study, tracker, parent_id, budget, dense, study.name,
                            status=status,
                            study_ref=study_ref(opts.study))
        # the time limit ended the search before the budgeted trials finished (an open-ended
        # search always ends on it: that is its plan, and nothing is left to resume)
        timed_out = (opts.time_limit is not None and not interrupted
                     and (open_ended or finished_count(ot_study) < trials))
        summary["resume_hint"] = (resume_hint(opts) if interrupted
                                  or (timed_out and not open_ended) else None)
        summary["open_ended"] = open_ended
        summary["interrupted"] = interrupted
        summary["finalists"] = finalist_rows(ot_study, stage["chosen"])
        summary["time_limit_reached"] = timed_out
        summary["parent_run_id"] = parent_id
        summary["tracking_uri"] = tracking_uri
        return summary
