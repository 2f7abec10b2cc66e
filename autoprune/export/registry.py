"""Which recorded trial to export (`select_point`), and `export_best`: export it and register it
in the MLflow Model Registry as `<study>@best`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .. import pareto, store
from ..errors import UserError
from ..study import Study, load_study
from .card import export_model, write_card

PICKS = ("max-accuracy", "min-flops")
REGISTRY_ALIAS = "best"
ARTIFACT_DIR = "export"
log = logging.getLogger("autoprune")


def _pick(points: list[dict], pick: str) -> dict:
    if pick == "max-accuracy":  # what the search names best, among these points
        ordered = sorted(points, key=lambda p: p["trial"])
        chosen = pareto.best([ordered[i] for i in pareto.front(ordered)])
        return dict(chosen) if chosen is not None else ordered[0]
    if pick == "min-flops":
        return min(points, key=lambda p: (p["flops_frac"], -p["val_accuracy"], p["trial"]))
    raise UserError(f"unknown --pick '{pick}'; choose {' or '.join(PICKS)}")


def select_point(points: list[dict], budget: str | None, pick: str) -> dict:
    """The feasible point to export: within `budget` if given, best by `pick`."""
    if pick not in PICKS:
        raise UserError(f"unknown --pick '{pick}'; choose {' or '.join(PICKS)}")
    feasible = [p for p in points if p.get("feasible", True)]
    if not feasible:
        raise UserError("the search recorded no completed trial within its budget: nothing to "
                        "export")
    if budget:
        from ..budget import Budget

        b = Budget.parse(budget)
        def fracs(p: dict) -> dict[str, float]:  # a fraction an old record lacks never fits
            return {k: p.get(f"{k}_frac") if p.get(f"{k}_frac") is not None else float("inf")
                    for k in ("flops", "sparse_flops", "params", "weights")}

        feasible = [p for p in feasible if b.satisfied(fracs(p))]
        if not feasible:
            raise UserError(f"no recorded point meets budget {budget} (search with that budget, "
                            f"or export under a looser one)")
    return _pick(feasible, pick)


def register_export(tracking_uri: str, study: str, export_dir: Path, point: dict,
                    parent_id: str | None) -> dict[str, Any]:
    """Log the export folder to the trial's MLflow run and register it as `<study>@best`."""
    from mlflow.exceptions import MlflowException

    from ..names import TAG_STUDY, TAG_TRIAL
    from ..tracking import Tracker

    tracker = Tracker(tracking_uri, study)
    client = tracker.client
    exp_id = tracker.experiment_id
    run_id = store.trial_run(client, exp_id, int(point["trial"]), point.get("run_id"), parent_id)
    created = run_id is None
    if created:
        run_id = client.create_run(exp_id, run_name=f"export-trial-{point['trial']}",
                                   tags={TAG_TRIAL: str(point["trial"]),
                                         TAG_STUDY: study}).info.run_id
    client.log_artifacts(run_id, str(export_dir), ARTIFACT_DIR)
    if created:
        client.set_terminated(run_id)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    try:
        client.get_registered_model(study)
    except MlflowException:
        client.create_registered_model(
            study, description=f"pruned {study} models exported by autoprune")
    version = client.create_model_version(name=study, source=source, run_id=run_id,
                                          tags={TAG_TRIAL: str(point["trial"])})
    client.set_registered_model_alias(study, REGISTRY_ALIAS, version.version)
    return {"registered_model": study, "version": int(version.version),
            "model_uri": f"models:/{study}@{REGISTRY_ALIAS}", "run_id": run_id,
            "artifact_uri": source, "tracking_uri": tracking_uri}


def export_best(out: str | os.PathLike, study: str | Study, to: str | os.PathLike,
                budget: str | None = None, pick: str = "max-accuracy",
                tracking_uri: str | None = None, data_root: str | None = None, seed: int = 0,
                *, optuna_storage: str | None = None) -> dict[str, Any]:
    """Export the best recorded trial of the search in `<out>/<study>` and register it.

    `study` is a name, a YAML path or a `Study`: a `Study.custom` search is exported from its
    trial checkpoint and the study's own model object (load it back with
    `load_exported(to, model=<an instance of the class>)`).
    Returns the model card plus `registered_model`, `version`, `model_uri`, `run_id`.
    """
    from ..dense import load_state
    from ..pipeline import Workbench

    st = study if isinstance(study, Study) else load_study(study)
    out_dir = Path(out).expanduser().resolve()
    study_dir = out_dir / st.name
    ot_study = store.open_search(study_dir, st.name, optuna_storage)
    records = {r.trial: r for r in store.trial_records(ot_study)}
    point = select_point([r.as_point() for r in records.values()], budget, pick)
    log.info(f"exporting trial {point['trial']} ({point['method']}): "
             f"val {point['val_accuracy']:.4f}, flops {point['flops_frac']:.4f}, "
             f"params {point['params_frac']:.4f}")
    ckpt = point.get("checkpoint") or str(study_dir / "checkpoints" / f"trial-{point['trial']}.pt")
    if not Path(ckpt).exists():
        raise UserError(f"checkpoint of trial {point['trial']} not found: {ckpt}")

    wb = Workbench.open(st, out_dir, data_root=data_root, seed=seed, log=log.info)
    model = wb.fresh_model()
    model.load_state_dict(load_state(ckpt, model))
    parent_id = store.parent_run_id(ot_study)
    metrics = {"method": point.get("method"), "hparams": point.get("hparams") or {},
               "granularity": records[point["trial"]].granularity,
               "val_accuracy": point["val_accuracy"], "test_accuracy": point["test_accuracy"]}
    source = {"out": str(out_dir), "optuna_study": st.name, "trial": point["trial"],
              "checkpoint": str(ckpt), "mlflow_parent_run_id": parent_id, "pick": pick,
              "budget": budget}
    card = export_model(model, st, wb.data.example(), to, metrics=metrics, dense=wb.dense,
                        source=source, data=wb.data,
                        reproduce=_reproduce(point, st, study, out_dir, to, budget, pick))
    reg = register_export(tracking_uri or store.default_tracking_uri(out_dir), st.name,
                          Path(to).expanduser(), point, parent_id)
    card["source"]["mlflow_run_id"] = reg["run_id"]
    write_card(card, Path(to).expanduser())
    return {**card, **reg}


def _reproduce(point: dict, st: Study, given: str | Study, out: Path, to: str | os.PathLike,
               budget: str | None, pick: str) -> dict[str, str]:
    """The commands that make this export again, and that rerun its trial alone."""
    import shlex

    from ..orchestration.summary import rerun_command

    if isinstance(given, Study):  # made in Python: the call, not a command line, names it
        return {"export": f"autoprune.export({str(out)!r}, study, {str(to)!r}, "
                          f"budget={budget!r}, pick={pick!r})"}
    parts = ["autoprune", "export", "--out", str(out), "--study", given, "--to", str(to),
             "--pick", pick] + (["--budget", budget] if budget else [])
    out_cmds = {"export": " ".join(shlex.quote(x) for x in parts)}
    rerun = rerun_command(point, given, budget or st.budget)
    if rerun:
        out_cmds["trial"] = rerun
    return out_cmds
