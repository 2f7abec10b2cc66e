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

import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..budget import Budget
from ..data import data_root
from ..errors import UserError
from ..paths import SPACES_DIR, resolve_yaml
from ..pipeline import Workbench
from ..study import Study, load_study
from .callbacks import KILLED_ERROR
from .projection import CostTable, min_reachable
from .space import SearchSpace
from .trial import TrialContext, test_faults

OBJECTIVES = ["val_accuracy", "flops_frac", "params_frac"]
MODES = ["max", "min", "min"]
PARENT_ATTR = "mlflow_parent_run_id"
KILLED_ATTR = "killed"  # user attr of trials stopped by an interrupted or dead driver


@dataclass
class SearchOptions:
    study: str | Study = "digits-lenet"  # a name, a .yaml path, or a Study (e.g. Study.custom)
    space: str | None = None
    budget: str | None = None
    trials: int | None = None
    time_limit: float | None = None  # seconds
    workers: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    sampler: str = "tpe"
    scheduler: str = "none"
    seed: int = 0
    out: str = "autoprune-runs"
    data_root: str | None = None
    ray_address: str | None = None
    tracking_uri: str | None = None
    optuna_storage: str | None = None
    tune_storage: str | None = None
    resume: bool = False
    dense_checkpoint: str | None = None
    max_failures: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def parse_duration(text: str | None) -> float | None:
    """'30m', '2h', '90s', '45' (seconds) -> seconds."""
    if text is None:
        return None
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise UserError(f"--time-limit '{text}' is not a duration like 90s, 30m or 2h") from None
    if not value > 0:
        raise UserError(f"--time-limit must be positive, got '{text}'")
    return value


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=5)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"unknown sampler '{name}'; choose tpe, nsga2 or random")


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


class StudyLock:
    """One search per study folder at a time: a second process gets a clear refusal."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self._fh = None

    def __enter__(self) -> StudyLock:
        self._fh = open(self.path, "a+")  # noqa: SIM115 - held for the whole search
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise UserError(f"another autoprune search is running on {self.path.parent}; "
                            f"wait for it or use another --out") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


def _check_budget_reachable(wb: Workbench, budget: Budget, space: SearchSpace) -> None:
    """Refuse, before any trial, a budget that even the finest granularity cannot reach."""
    max_sparsity = space.max_sparsity
    table = CostTable.from_accountant(wb.accountant, space.prunable(wb.layers))
    reach = min_reachable(table, "weight", max_sparsity)
    for key, limit in budget.limits.items():
        if reach[key] > limit:
            raise UserError(f"budget {key}={limit:g} is below what the space can reach on "
                            f"{wb.study.model} (smallest {key} fraction {reach[key]:.4f} at "
                            f"max_sparsity {max_sparsity:g})")


def _open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage at `url`; an unusable URL is a one-line `UserError`."""
    try:
        return optuna.storages.RDBStorage(url)
    except ImportError as exc:
        raise UserError(f"--optuna-storage {_redact(url)}: the database driver is not "
                        f"installed ({exc.name or exc})") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's many error types: all bad input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open --optuna-storage {_redact(url)}: {first}") from None


def _redact(url: str) -> str:
    """A storage URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _finished_before(storage: optuna.storages.RDBStorage, name: str, resume: bool) -> int:
    """Trials that count towards the budget already in the study (0 for a new study).

    Refuses to add to a study that has trials unless `--resume` says so. Nothing is written.
    """
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if name not in existing or existing[name].n_trials == 0:
        return 0
    if not resume:
        raise UserError(f"the study folder already holds a search of {existing[name].n_trials} "
                        f"trials; pass --resume to continue it, or another --out")
    study = optuna.load_study(study_name=name, storage=storage)
    return finished_count(study)


def _prepare_optuna(storage: optuna.storages.RDBStorage, name: str, sampler) -> optuna.Study:
    """Load or create the study; fail the trials a dead driver left RUNNING."""
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                directions=["maximize", "minimize", "minimize"],
                                load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        storage.set_trial_user_attr(t._trial_id, KILLED_ATTR, True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return study


def reconcile(ot_study: optuna.Study, tracker, parent_id: str) -> int:
    """Make MLflow agree with the Optuna study (the source of truth); return runs fixed.

    After an interrupted or killed driver: trials still RUNNING in Optuna are failed (marked
    killed), and every trial gets exactly one child run whose status matches its Optuna state;
    a child left RUNNING (its driver died) is ended KILLED, a trial told to Optuna but not yet
    logged to MLflow is logged from the study.
    """
    from ..names import TAG_PARENT, TAG_TRIAL

    storage = ot_study._storage
    for t in ot_study.get_trials(deepcopy=False,
                                 states=(TrialState.RUNNING, TrialState.WAITING)):
        storage.set_trial_user_attr(t._trial_id, KILLED_ATTR, True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    runs = tracker.client.search_runs(
        [tracker.client.get_run(parent_id).info.experiment_id],
        f"tags.`{TAG_PARENT}` = '{parent_id}'", max_results=50000)
    status = {int(r.data.tags[TAG_TRIAL]): r.info.status for r in runs
              if r.data.tags.get(TAG_TRIAL, "").lstrip("-").isdigit()}
    fixed = 0
    for t in ot_study.get_trials(deepcopy=False):
        want = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(
            t.state, "KILLED" if t.user_attrs.get(KILLED_ATTR) else "FAILED")
        if status.get(t.number) not in (None, "RUNNING"):
            continue
        metrics = {}
        if t.state == TrialState.COMPLETE:
            metrics = {name: v for name, v in zip(OBJECTIVES, t.values, strict=True)}
            metrics.update({k: t.user_attrs[k] for k in ("test_accuracy", "compact_flops_frac",
                                                         "budget_violation")
                            if isinstance(t.user_attrs.get(k), (int, float))})
        error = t.user_attrs.get("error") or (KILLED_ERROR if want == "KILLED" else None)
        params = {**t.params, **{k: t.user_attrs[k] for k in ("node_id", "node_ip")
                                 if k in t.user_attrs}}
        tracker.log_trial(parent_id, t.number, str(t.params.get("method", "")), params, metrics,
                          status=want, error=error if want != "FINISHED" else None)
        fixed += 1
    return fixed


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards the budgeted number: completed or pruned (not failed)."""
    return len(study.get_trials(deepcopy=False,
                                states=(TrialState.COMPLETE, TrialState.PRUNED)))


def search(opts: SearchOptions, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run (or resume) a search; return the summary that `--json` prints."""
    from ray import tune

    from ..tracking import Tracker, default_tracking_uri
    from .callbacks import Interrupt, ProgressCallback, TrackingCallback
    from .searcher import PruningSearch
    from .trial import run_trial

    study = opts.study if isinstance(opts.study, Study) else load_study(opts.study)
    budget = Budget.parse(opts.budget or study.budget)
    space_path = _space_path(opts, study)
    space = SearchSpace.load(space_path)
    trials = opts.trials or study.trials
    if trials < 1 or opts.workers < 1 or opts.cpus_per_trial <= 0 or opts.gpus_per_trial < 0:
        raise UserError("--trials and --workers must be >= 1, --cpus-per-trial > 0, "
                        "--gpus-per-trial >= 0")
    if opts.ray_address:
        _host_port(opts.ray_address)
    if opts.scheduler not in ("none", "asha"):
        raise UserError(f"unknown scheduler '{opts.scheduler}'; choose none or asha")
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
        storage_url = opts.optuna_storage or f"sqlite:///{study_dir / 'optuna.db'}"
        local_db = storage_url.removeprefix("sqlite:///") if storage_url.startswith(
            "sqlite:///") else None
        done = 0
        if local_db is None or Path(local_db).exists():  # (opening creates the file)
            done = _finished_before(_open_storage(storage_url), study.name, opts.resume)
        remaining = max(0, trials - done)
        if remaining > 0:  # fail fast (no cluster, no GPUs) before anything is written
            _init_ray(opts, log)
        # model, data, dense checkpoint and budget are checked before any store is created
        wb = Workbench.open(study, out, data_root=opts.data_root, seed=opts.seed,
                            checkpoint=opts.dense_checkpoint, log=log)
        _check_budget_reachable(wb, budget, space)
        storage = _open_storage(storage_url)
        ot_study = _prepare_optuna(storage, study.name, sampler)
        dense = {"val_accuracy": wb.dense["val_accuracy"],
                 "test_accuracy": wb.dense["test_accuracy"], "flops": wb.dense["flops"],
                 "params": wb.dense["params"]}
        log(f"dense baseline of {study.name}: val {dense['val_accuracy']:.4f}, "
            f"test {dense['test_accuracy']:.4f}, {dense['flops'] / 1e6:.3f} M MACs, "
            f"{dense['params']:,} params")

        tracking_uri = opts.tracking_uri or default_tracking_uri(out)
        # artifacts beside a local store; a tracking server stores them where it is told to
        tracker = Tracker(tracking_uri, study.name,
                          out / "mlartifacts" if tracking_uri.startswith("sqlite:") else None)
        config_record = {"study": study.name, "study_file": study.source,
                         "space": str(space_path), "budget": str(budget), "trials": trials,
                         "workers": opts.workers, "cpus_per_trial": opts.cpus_per_trial,
                         "gpus_per_trial": opts.gpus_per_trial, "sampler": opts.sampler,
                         "scheduler": opts.scheduler, "seed": opts.seed,
                         "optuna_storage": _redact(storage_url), **study.describe()}
        # One parent run per study: reused by --resume, and by a rerun of a search that was
        # stopped before its first trial.
        parent = ot_study.user_attrs.get(PARENT_ATTR)
        try:
            parent_id = tracker.start_search(config_record, str(budget), dense,
                                             parent_run_id=parent)
        except ValueError:  # the stored parent is not in this tracking store
            log(f"MLflow run {parent} of this study is not in {tracking_uri}; starting a new one")
            parent_id = tracker.start_search(config_record, str(budget), dense)
        ot_study.set_user_attr(PARENT_ATTR, parent_id)
        fixed = reconcile(ot_study, tracker, parent_id)
        if fixed:
            log(f"recorded {fixed} trial(s) that an earlier driver left unfinished")
        if done:
            log(f"resuming: {done} trials already finished, {remaining} to go")

        status = "FINISHED"
        interrupted = False
        progress = ProgressCallback(total=trials, done_before=done, budget=budget, log=log)
        if remaining > 0:
            if study.objects is not None:  # a custom study's model code goes to the workers
                study.objects.ship_by_value()
            ctx = TrialContext(study=study, space=space, out=str(out),
                               study_dir=str(study_dir), budget=str(budget),
                               data_root=str(data_root(opts.data_root)), seed=opts.seed,
                               cpus=opts.cpus_per_trial, checkpoint=_absolute(
                                   opts.dense_checkpoint),
                               faults=test_faults())
            layers = wb.layers
            searcher = PruningSearch(space=Suggest(space, layers),
                                     metric=OBJECTIVES, mode=MODES, sampler=sampler,
                                     storage=storage, study_name=study.name)
            scheduler = None
            if opts.scheduler == "asha":
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(metric="val_accuracy", mode="max", grace_period=1,
                                          reduction_factor=2)
            resources = {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial}
            trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
            tracking_cb = TrackingCallback(tracker, parent_id)
            stop = Interrupt(log)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                            num_samples=remaining,
                                            max_concurrent_trials=opts.workers,
                                            reuse_actors=True, time_budget_s=opts.time_limit),
                run_config=tune.RunConfig(
                    name=f"tune-{int(time.time())}", storage_path=_tune_storage(opts, study_dir),
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
            if interrupted:
                status = "KILLED"
            reconcile(ot_study, tracker, parent_id)

        summary = summarize(ot_study, tracker, parent_id, budget, dense, study.name,
                            status=status,
                            study_ref=_study_ref(opts.study))
        # the time limit ended the search before the budgeted trials finished
        timed_out = (opts.time_limit is not None and not interrupted
                     and finished_count(ot_study) < trials)
        summary["resume_hint"] = resume_hint(opts) if interrupted or timed_out else None
        summary["interrupted"] = interrupted
        summary["time_limit_reached"] = timed_out
        summary["parent_run_id"] = parent_id
        summary["tracking_uri"] = tracking_uri
        return summary


def resume_hint(opts: SearchOptions) -> str:
    """The command that continues this search (what an interrupted search prints)."""
    import shlex

    study = opts.study
    if isinstance(study, Study):
        if study.objects is not None or not Path(study.source).is_file():
            # made in Python: only the same call can bring the same study back
            return (f"call autoprune.search again with the same study, out={opts.out!r} and "
                    f"resume=True")
        study = study.source
    defaults = SearchOptions()
    parts = ["autoprune", "search", "--study", study, "--out", opts.out]
    for flag, value in (("--space", opts.space), ("--budget", opts.budget),
                        ("--trials", opts.trials), ("--ray-address", opts.ray_address),
                        *((f"--{k.replace('_', '-')}", getattr(opts, k))
                          for k in ("workers", "cpus_per_trial", "gpus_per_trial", "sampler",
                                    "scheduler", "seed", "max_failures")
                          if getattr(opts, k) != getattr(defaults, k)),
                        ("--tracking-uri", opts.tracking_uri),
                        ("--optuna-storage", opts.optuna_storage and _redact(opts.optuna_storage)),
                        ("--tune-storage", opts.tune_storage),
                        ("--data-root", opts.data_root)):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in [*parts, "--resume"])


def _tune_storage(opts: SearchOptions, study_dir: Path) -> str:
    """Where Tune keeps trial results and checkpoints: `--tune-storage` (a shared path or an
    object store URI such as s3://bucket/prefix, per study) or `<out>/<study>/tune`."""
    if opts.tune_storage:
        if "://" in opts.tune_storage:
            return opts.tune_storage.rstrip("/") + "/" + study_dir.name
        return str(Path(opts.tune_storage).expanduser().resolve() / study_dir.name)
    return str(study_dir / "tune")


def _init_ray(opts: SearchOptions, log: Callable[[str], None]) -> None:
    import ray

    if ray.is_initialized():
        _check_gpus(opts)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if opts.ray_address:
        _probe(opts.ray_address)
        try:
            ray.init(address=opts.ray_address, log_to_driver=False,
                     logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot join the Ray cluster at {opts.ray_address}: "
                            f"{str(exc).strip().splitlines()[0]}") from None
    else:
        # address="local": a new local instance even where `ray start` left one running
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=True, logging_level="warning")
    log(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):g} GPUs")
    _check_gpus(opts)


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a --ray-address; None for `auto`; a `UserError` for anything else."""
    if address == "auto":
        return None
    host, _, port = address.split("://")[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379) "
                        f"or auto")
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float = 10.0) -> None:
    """Refuse an address nothing listens on: `ray.init` would retry it for many minutes."""
    import socket

    target = _host_port(address)
    if target is None:
        return  # Ray looks for a cluster started on this node and says so if there is none
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot join the Ray cluster at {address}: nothing answers there "
                        f"({exc.strerror or exc}); is `ray start --head` running?") from None


def _check_gpus(opts: SearchOptions) -> None:
    """Refuse at once what no node of the cluster can ever run (Tune would wait forever)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    if opts.gpus_per_trial > 0 and not any(n.get("GPU", 0) >= opts.gpus_per_trial
                                           for n in nodes):
        raise UserError(f"--gpus-per-trial {opts.gpus_per_trial:g} asked, but no node of the Ray "
                        f"cluster has that many GPUs ({total_gpus:g} GPUs in all); use "
                        f"--gpus-per-trial 0 or a cluster with GPUs")
    if not any(n.get("CPU", 0) >= opts.cpus_per_trial for n in nodes):
        biggest = max((n.get("CPU", 0) for n in nodes), default=0)
        raise UserError(f"--cpus-per-trial {opts.cpus_per_trial:g} asked, but the largest node of "
                        f"the Ray cluster has {biggest:g} CPUs")


def trial_points(ot_study: optuna.Study) -> list[dict]:
    """Finished trials as points for the Pareto front, read back from the Optuna study."""
    points = []
    for t in ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        cons = t.constraints  # Optuna 5: {key: value}, feasible when every value <= 0
        violation = max(cons.values()) if cons else t.user_attrs.get("budget_violation", 0.0)
        points.append({"trial": t.number, "method": t.user_attrs.get("method"),
                       "val_accuracy": t.values[0], "flops_frac": t.values[1],
                       "params_frac": t.values[2],
                       "test_accuracy": t.user_attrs.get("test_accuracy"),
                       "compact_flops_frac": t.user_attrs.get("compact_flops_frac"),
                       "run_id": t.user_attrs.get("run_id"),
                       "checkpoint": t.user_attrs.get("checkpoint"),
                       "hparams": t.user_attrs.get("hparams"),
                       # per-layer sparsities and fine-tune overrides: with method and hparams,
                       # all `autoprune prune` needs to rerun this trial alone (e.g. longer)
                       "layer_sparsity": _json_attr(t, "targets"),
                       "finetune": _json_attr(t, "finetune_overrides"),
                       "feasible": violation <= 1e-12})
    return points


def _json_attr(t: optuna.trial.FrozenTrial, key: str) -> dict | None:
    value = t.user_attrs.get(key)
    try:
        return json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        return None


def summarize(ot_study: optuna.Study, tracker, parent_id: str, budget: Budget, dense: dict,
              study_name: str, status: str = "FINISHED", study_ref: str | None = None) -> dict:
    """Counts, the front and the best point inside the budget (what `--json` prints).

    `study_ref` is how the command line can name the study (a built-in name or a file path),
    for the best point's rerun command; None for a study made in Python (no command can).
    """
    from ..pareto import front

    points = trial_points(ot_study)
    tracker.finish_search(parent_id, points, budget.limits, dense, status=status)
    feasible = [p for p in points if p["feasible"]]
    idx = front(feasible) if feasible else []
    pareto = sorted((feasible[i] for i in idx), key=lambda p: p["flops_frac"])
    best = max(feasible, key=lambda p: p["val_accuracy"], default=None)
    if best is not None:
        best = {**best, "rerun": rerun_command(best, study_ref, str(budget))
                if study_ref else None}
    ended = ot_study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    killed = sum(1 for t in ended if t.user_attrs.get(KILLED_ATTR))
    errors = sorted({str(t.user_attrs["error"]) for t in ended if t.user_attrs.get("error")})
    pruned = len(ot_study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    return {"study": study_name, "budget": str(budget), "trials_completed": len(points),
            "trials_feasible": len(feasible), "trials_pruned": pruned,
            "trials_failed": len(ended) - killed, "trials_killed": killed, "errors": errors,
            "dense": dense, "pareto": pareto, "best": best}


def options_dict(opts: SearchOptions) -> dict:
    return asdict(opts)


def _absolute(path: str | None) -> str | None:
    """Workers run elsewhere: they get absolute paths (URIs pass through)."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _study_ref(study: str | Study) -> str | None:
    """How `autoprune prune --study` can name this study, if it can."""
    if isinstance(study, str):
        return study
    if study.objects is None and Path(study.source).is_file():
        return study.source
    return None


def rerun_command(point: dict, study: str, budget: str) -> str | None:
    """The `autoprune prune` command that repeats one trial of the front on its own.

    A search trains each trial briefly; the usual last step is to retrain the chosen one with
    a longer fine-tune (append `--finetune epochs=N`). None when the trial predates the
    recording of its per-layer sparsities.
    """
    import shlex

    layers = point.get("layer_sparsity")
    if not layers or not point.get("method"):
        return None
    hp = json.loads(point["hparams"]) if point.get("hparams") else {}
    parts = ["autoprune", "prune", "--study", study, "--method", str(point["method"]),
             "--budget", budget]
    for k, v in hp.items():
        parts += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    for k, v in (point.get("finetune") or {}).items():
        parts += ["--finetune", f"{k}={v}"]
    parts += ["--layer-sparsity", ",".join(f"{k}={v:.6g}" for k, v in layers.items())]
    return " ".join(shlex.quote(p) for p in parts)


def print_front(summary: dict, stream=sys.stdout) -> None:
    d = summary["dense"]
    print(f"\nPareto front of {summary['study']} (budget {summary['budget']}; "
          f"{summary['trials_completed']} completed, {summary['trials_failed']} failed, "
          f"{summary['trials_pruned']} stopped early, {summary.get('trials_killed', 0)} "
          f"interrupted)", file=stream)
    print(f"dense: val {d['val_accuracy']:.4f} test {d['test_accuracy']:.4f}", file=stream)
    header = (f"{'trial':>5} {'method':<12} {'val':>7} {'test':>7} {'flops':>7} {'params':>7}"
              "  hyperparameters")
    print(header, file=stream)
    for p in summary["pareto"]:
        hp = json.loads(p["hparams"]) if p.get("hparams") else {}
        hps = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in hp.items())
        test = f"{p['test_accuracy']:.4f}" if p.get("test_accuracy") is not None else "-"
        print(f"{p['trial']:>5} {p['method'] or '-':<12} {p['val_accuracy']:>7.4f} {test:>7} "
              f"{p['flops_frac']:>7.4f} {p['params_frac']:>7.4f}  {hps}", file=stream)
    if summary.get("best"):
        b = summary["best"]
        print(f"best in budget: trial {b['trial']} ({b['method']}) val {b['val_accuracy']:.4f}",
              file=stream)
        if b.get("rerun"):
            print(f"rerun it alone (e.g. with a longer fine-tune): {b['rerun']}", file=stream)
    else:
        print("no completed trial met the budget", file=stream)
