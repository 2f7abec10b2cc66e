"""MLflow records of a search: one parent run per search, one child run per trial.

Only the driver process calls this module (workers just report to Ray), so a single writer keeps
the default SQLite store safe, and a cluster only changes the tracking URI. Everything goes
through `MlflowClient` with explicit run ids, never the fluent `mlflow.start_run` API: its global
"active run" would tie records to whatever thread or process happens to log.

Layout (all names from names.py):
- parent run, tag autoprune.role=search: the flattened config and budget as params, the dense
  baseline as dense_* metrics, package versions as tags, config.yaml; at the end the Pareto
  table, plot, hypervolume and trial counts.
- child run per trial, tag mlflow.parentRunId (nesting in the UI) and autoprune.trial=<number>
  (idempotent re-logging after a resume), method and sampled hyperparameters as params, final
  metrics, per-epoch curves, layer_sparsity.json, and for failures the error text.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from . import pareto, store
from .front_artifacts import (
    FRONT_CURVE,
    columns_of,
    csv_text,
    front_curve,
    front_table,
    pareto_figure,
    row,
    run_name,
    search_name,
    short_metrics,
)
from .front_artifacts import number as _number
from .mlflow_format import (  # noqa: F401 - part of tracking's face
    _BATCH_ENTITIES,
    _BATCH_PARAMS,
    _PARAM_CHARS,
    _TAG_CHARS,
    ART_TRIALS_TABLE,
    ERROR_TAG_CHARS,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    TRIAL_STATUSES,
    VERSIONED_PACKAGES,
    _flag,
    _key,
    _now_ms,
    _param_str,
    _quote,
    _use_wal,
    _versions,
    flatten,
    runs_url,
)
from .names import (
    ART_CONFIG,
    ART_ERROR,
    ART_FRONT_CSV,
    ART_FRONT_JSON,
    ART_LAYER_SPARSITY,
    ART_PLOT,
    ART_TRIALS_CSV,
    DENSE_PREFIX,
    FLOPS,
    HYPERVOLUME,
    PARAMS,
    PARETO_SIZE,
    ROLE_SEARCH,
    ROLE_TRIAL,
    TAG_BASELINE,
    TAG_BUDGET,
    TAG_ERROR,
    TAG_FEASIBLE,
    TAG_METHOD,
    TAG_NOTE,
    TAG_PARENT,
    TAG_PARETO,
    TAG_ROLE,
    TAG_STOPPED,
    TAG_STUDY,
    TAG_TRIAL,
    TEST_ACC,
    TRIALS_COMPLETED,
    TRIALS_FAILED,
    TRIALS_STOPPED,
    VAL_ACC,
)
from .store import default_tracking_uri  # noqa: F401 - re-exported: where a search logs


def _baseline_tag(baseline: bool) -> dict[str, str]:
    return {TAG_BASELINE: "true"} if baseline else {}


class Tracker:
    """Driver-side MLflow writer and reader of one study's experiment."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None,
                 study: str | None = None, sqlite_wal: bool = True,
                 create: bool = True) -> None:
        """Get or create the experiment `experiment` (one per study).

        `artifact_root` defaults to `mlartifacts` beside a SQLite file; giving the experiment an
        explicit location is what keeps artifacts out of the current directory. `sqlite_wal`
        switches a local SQLite store to write-ahead logging (see `_use_wal`). With
        `create=False` (readers: report, export) nothing is created or changed, and
        `experiment_id` is None when the experiment does not exist.
        """
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.study = study or experiment
        root = artifact_root if artifact_root is not None else store.default_artifact_root(
            tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment = experiment
        self.experiment_id: str | None = None
        self._children: dict[str, dict[int, str]] = {}  # parent id -> {trial number: run id}
        self._dense: dict[str, dict[str, float]] = {}  # parent id -> dense_* metrics
        if not create:
            if exp is not None and exp.lifecycle_stage == "active":
                self.experiment_id = exp.experiment_id
            return
        if exp is None:
            location = Path(root).expanduser().resolve().as_uri() if root is not None else None
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException:  # created meanwhile by another driver
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG,
                                               EXPERIMENT_KIND)
        if sqlite_wal and (db := store.sqlite_file(tracking_uri)) is not None:
            _use_wal(db)

    # ---- writing -----------------------------------------------------------------------------

    def _exp(self) -> str:
        if self.experiment_id is None:
            raise RuntimeError(f"experiment {self.experiment!r} was opened read-only (create=False)"
                               " and does not exist")
        return self.experiment_id

    def _log(self, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
             tags: Sequence[RunTag] = ()) -> None:
        """log_batch within MLflow's per-request limits (usually a single call)."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            p, params = params[:_BATCH_PARAMS], params[_BATCH_PARAMS:]
            t, tags = tags[:_BATCH_PARAMS], tags[_BATCH_PARAMS:]
            m, metrics = metrics[:_BATCH_ENTITIES - len(p) - len(t)], \
                metrics[_BATCH_ENTITIES - len(p) - len(t):]
            self.client.log_batch(run_id, metrics=m, params=p, tags=t, synchronous=True)

    def start_search(self, config: Mapping[str, Any], budget: str, dense: Mapping[str, Any],
                     parent_run_id: str | None = None, run_name: str | None = None) -> str:
        """Open the parent run of a search and return its id.

        With `parent_run_id` (a resumed search) the existing run is checked and set RUNNING
        again; its params are immutable in MLflow, so nothing else is re-logged.
        """
        if parent_run_id is not None:
            try:
                run = self.client.get_run(parent_run_id)
            except MlflowException as e:
                raise ValueError(f"no MLflow run {parent_run_id} to resume") from e
            if run.info.experiment_id != self._exp():
                raise ValueError(f"run {parent_run_id} is not in experiment {self.experiment}")
            self.client.update_run(parent_run_id, status="RUNNING")
            return parent_run_id
        tags = {TAG_ROLE: ROLE_SEARCH, TAG_STUDY: self.study, TAG_BUDGET: budget, **_versions()}
        run = self.client.create_run(self._exp(), start_time=_now_ms(), tags=tags,
                                     run_name=run_name or f"search-{self.study}")
        rid = run.info.run_id
        params = {**flatten(config), "budget": budget}
        ts = _now_ms()
        metrics = [Metric(DENSE_PREFIX + k, _number(dense[k]), ts, 0)
                   for k in (VAL_ACC, TEST_ACC, FLOPS, PARAMS)
                   if k in dense and _number(dense[k]) is not None]
        self._log(rid, metrics, [Param(_key(k), _param_str(v)) for k, v in params.items()])
        plain = json.loads(json.dumps(dict(config), default=str))  # YAML-safe copy
        self.client.log_text(rid, yaml.safe_dump(plain, sort_keys=False), ART_CONFIG)
        self._children[rid] = {}
        self._dense[rid] = {m.key: m.value for m in metrics}
        return rid

    def _dense_of(self, parent_id: str) -> dict[str, float]:
        """The parent's dense_* metrics (read once: a resumed search did not log them here)."""
        if parent_id not in self._dense:
            got = self.client.get_run(parent_id).data.metrics
            self._dense[parent_id] = {k: v for k, v in got.items()
                                      if k.startswith(DENSE_PREFIX)}
        return self._dense[parent_id]

    def _child_map(self, parent_id: str) -> dict[int, str]:
        """Trial number -> child run id, read once per parent (resume safety)."""
        if parent_id not in self._children:
            self._children[parent_id] = {
                n: r.info.run_id
                for n, r in store.child_runs(self.client, self._exp(), parent_id).items()}
        return self._children[parent_id]

    def start_trial(self, parent_id: str, trial_number: int, method: str,
                    params: Mapping[str, Any], baseline: bool = False) -> str:
        """Open the child run of a trial as RUNNING, so a search can be watched live in the UI;
        `log_trial` ends it. A trial that has a run already (resumed, retried) keeps it.
        `baseline`: an enqueued hand baseline, tagged so the UI can tell it from sampled ones."""
        children = self._child_map(parent_id)
        if trial_number in children:
            return children[trial_number]
        tags = {TAG_PARENT: parent_id, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: str(trial_number),
                TAG_METHOD: method, TAG_STUDY: self.study, **_baseline_tag(baseline)}
        run = self.client.create_run(self._exp(), start_time=_now_ms(), tags=tags,
                                     run_name=run_name(trial_number, method))
        rid = run.info.run_id
        children[trial_number] = rid
        flat = {_key(k): _param_str(v) for k, v in {"method": method, **flatten(params)}.items()}
        self._log(rid, params=[Param(k, v) for k, v in flat.items()])
        return rid

    def log_trial(self, parent_id: str, trial_number: int, method: str, params: Mapping[str, Any],
                  metrics: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = (),
                  layer_sparsity: Mapping[str, float] | None = None, status: str = "FINISHED",
                  error: str | None = None, stopped: str | None = None,
                  baseline: bool = False) -> str:
        """Record one trial as a child run of `parent_id`; return the child's run id.

        Idempotent per (parent, trial_number): a second call updates the same run. Params that
        already exist are not re-logged (MLflow params are immutable; a changed value goes to a
        tag `autoprune.param_changed.<key>`), and curve points already stored are skipped.
        `history` records (epoch/step, loss, val_accuracy, phase, lr, ...) become metric curves
        named `<phase>/<key>`, stepped by `step` or else by their position in the list.
        `stopped`: why a scheduler stopped the trial early (a KILLED run that did not crash):
        its `TAG_STOPPED` tag, the run's description and its name say so. `baseline`: as in
        `start_trial`.
        """
        if status not in TRIAL_STATUSES:
            raise ValueError(f"trial status must be one of {TRIAL_STATUSES}, not {status!r}")
        children = self._child_map(parent_id)
        existing = children.get(trial_number)
        tags = {TAG_PARENT: parent_id, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: str(trial_number),
                TAG_METHOD: method, TAG_STUDY: self.study, **_baseline_tag(baseline)}
        if error:
            tail = error.strip()
            if len(tail) > ERROR_TAG_CHARS:
                tail = "..." + tail[-ERROR_TAG_CHARS + 3:]
            tags[TAG_ERROR] = tail
        if stopped:
            tags[TAG_STOPPED] = tags[TAG_NOTE] = stopped[:_TAG_CHARS]
        name = run_name(trial_number, method, metrics) + (" stopped early" if stopped else "")
        all_params = {_key(k): v for k, v in {"method": method, **flatten(params)}.items()}
        ts = _now_ms()
        curves = self.curves(history, ts)
        if existing is None:
            run = self.client.create_run(self._exp(), start_time=ts, tags=tags, run_name=name)
            rid = run.info.run_id
            children[trial_number] = rid
            new_params = {k: _param_str(v) for k, v in all_params.items()}
            run_tags: dict[str, str] = {}
        else:
            rid = existing
            old = self.client.get_run(rid).data
            new_params = {}
            for k, v in all_params.items():
                s = _param_str(v)
                if k not in old.params:
                    new_params[k] = s
                elif old.params[k] != s:
                    tags[f"autoprune.param_changed.{k}"[:250]] = s[:_TAG_CHARS]
            curves = self.new_points(rid, curves)
            run_tags = tags
            if not error and TAG_ERROR in old.tags:  # an earlier failed attempt now succeeded
                self.client.delete_tag(rid, TAG_ERROR)
            self.client.update_run(rid, status="RUNNING", name=name)
        dense = self._dense_of(parent_id)
        short = short_metrics(metrics, dense.get(DENSE_PREFIX + VAL_ACC),
                              dense.get(DENSE_PREFIX + TEST_ACC))
        per_layer = {f"sparsity/{k}": v for k, v in (layer_sparsity or {}).items()}
        final = [Metric(_key(k), x, ts, 0) for k, v in {**metrics, **short, **per_layer}.items()
                 if (x := _number(v)) is not None]
        self._log(rid, final + curves, [Param(k, v) for k, v in new_params.items()],
                  [RunTag(k, v) for k, v in run_tags.items()])
        if layer_sparsity is not None:
            self.client.log_dict(rid, {k: float(v) for k, v in layer_sparsity.items()},
                                 ART_LAYER_SPARSITY)
        if error:
            self.client.log_text(rid, error, ART_ERROR)
        self.client.set_terminated(rid, status=status, end_time=_now_ms())
        return rid

    @staticmethod
    def curves(history: Sequence[Mapping[str, Any]], ts: int) -> list[Metric]:
        out = []
        for i, rec in enumerate(history):
            step = int(rec.get("step", i))
            phase = str(rec.get("phase") or "train")
            for k, v in rec.items():
                if k in ("step", "epoch", "phase"):
                    continue
                x = _number(v)
                if x is not None:
                    out.append(Metric(_key(f"{phase}/{k}"), x, ts, step))
            if "epoch" in rec and _number(rec["epoch"]) is not None:
                out.append(Metric(_key(f"{phase}/epoch"), float(rec["epoch"]), ts, step))
        return out

    def new_points(self, run_id: str, curves: list[Metric]) -> list[Metric]:
        """Curve points whose (key, step) is not stored yet: a re-logged trial adds no repeats."""
        keys = {m.key for m in curves}
        seen = {(k, m.step) for k in keys for m in self.client.get_metric_history(run_id, k)}
        return [m for m in curves if (m.key, m.step) not in seen]

    def finish_search(self, parent_id: str, points: Sequence[Mapping[str, Any]],
                      budget_limits: Mapping[str, float], dense: Mapping[str, Any],
                      status: str = "FINISHED") -> dict[str, Any]:
        """Rank the trials, tag them, store the front table and plot, and end the parent run.

        `points`: dicts with run_id, trial, method, val_accuracy, test_accuracy, flops_frac,
        params_frac, feasible (extra scalar keys become extra table columns). A point without
        run_id is matched to its child run by trial number. The front is taken among feasible
        points only; the hypervolume is that front's, against pareto.DEFAULT_REF.
        Returns {"front": [points, by flops_frac], "hypervolume": float}.
        """
        front_pts = pareto.feasible_front(points)
        on_front = {id(p) for p in front_pts}
        hv = pareto.hypervolume(front_pts)
        children = self._child_map(parent_id)
        tagged: set[str] = set()
        for p in points:
            rid = p.get("run_id") or children.get(int(p.get("trial", -1)))
            if rid:
                tagged.add(rid)
                self._log(rid, tags=[RunTag(TAG_PARETO, _flag(id(p) in on_front)),
                                     RunTag(TAG_FEASIBLE, _flag(bool(p.get("feasible", True))))])
        runs = list(store.search_runs(self.client, [self._exp()],
                                      f"tags.`{TAG_PARENT}` = {_quote(parent_id)}"))
        for r in runs:  # e.g. on the front of an earlier finish, now no longer a point
            if r.info.run_id not in tagged and r.data.tags.get(TAG_PARETO) == "true":
                self._log(r.info.run_id, tags=[RunTag(TAG_PARETO, "false")])
        statuses = [r.info.status for r in runs]
        counts = {HYPERVOLUME: hv, PARETO_SIZE: len(front_pts),
                  TRIALS_COMPLETED: statuses.count("FINISHED"),
                  TRIALS_FAILED: statuses.count("FAILED"),
                  TRIALS_STOPPED: sum(1 for r in runs if r.data.tags.get(TAG_STOPPED))}
        self._log(parent_id, [Metric(k, float(v), _now_ms(), 0) for k, v in counts.items()])
        columns = columns_of(points)
        rows = [row(p, columns) for p in front_pts]
        self.client.log_text(parent_id, csv_text(rows, columns), ART_FRONT_CSV)
        self.client.log_text(parent_id, json.dumps(rows, indent=2, default=str), ART_FRONT_JSON)
        all_rows = [{**row(p, columns), "pareto": id(p) in on_front} for p in points]
        self.client.log_text(parent_id, csv_text(all_rows, (*columns, "pareto")), ART_TRIALS_CSV)
        self.client.log_figure(parent_id, pareto_figure(points, front_pts, budget_limits, dense),
                               ART_PLOT)
        with warnings.catch_warnings():  # pandas 3 deprecation inside mlflow's log_table
            warnings.simplefilter("ignore")
            self.client.log_table(parent_id, front_table(points, on_front, _number(
                dense.get(VAL_ACC))), ART_TRIALS_TABLE)
        ts = _now_ms()
        self._log(parent_id, [Metric(FRONT_CURVE, v, ts, step) for step, v in
                              front_curve(front_pts)])
        self.client.update_run(parent_id, name=search_name(self.study, budget_limits, front_pts))
        self.client.set_terminated(parent_id, status=status, end_time=_now_ms())
        return {"front": front_pts, HYPERVOLUME: hv}
