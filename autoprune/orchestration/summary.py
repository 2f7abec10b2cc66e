"""The summary of a search (what `--json` prints): counts, the front, the best point inside
the budget and the command that reruns it alone."""

from __future__ import annotations

import json
import shlex

import optuna
from optuna.trial import TrialState

from .. import store
from ..budget import Budget
from ..engine import STUDY
from ..pareto import best as pareto_best
from ..store import KILLED_ATTR


def summarize(ot_study: optuna.Study, tracker, parent_id: str, budget: Budget, dense: dict,
              study_name: str, status: str = "FINISHED", study_ref: str | None = None) -> dict:
    """Counts, the front and the best point inside the budget (what `--json` prints).

    `study_ref` is how the command line can name the study (a built-in name or a file path),
    for the best point's rerun command; None for a study made in Python (no command can).
    """
    points = store.trial_points(ot_study)
    # the front is ranked once, by the tracker that tags and plots it
    pareto = tracker.finish_search(parent_id, points, budget.limits, dense,
                                   status=status)["front"]
    feasible = [p for p in points if p["feasible"]]
    # a point of the front, so never one that another in-budget point dominates; the most
    # accurate of the retrained finalists where the search has any
    best = pareto_best(pareto)
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


def rerun_command(point: dict, study: str, budget: str) -> str | None:
    """The `autoprune prune` command that repeats one trial of the front on its own.

    A search trains each trial briefly; the usual last step is to retrain the chosen one with
    a longer fine-tune (append `--finetune epochs=N`). None when the trial predates the
    recording of its per-layer sparsities.
    """
    layers = point.get("layer_sparsity")
    if not layers or not point.get("method"):
        return None
    hp = json.loads(point["hparams"]) if point.get("hparams") else {}
    parts = ["autoprune", "prune", "--study", study, "--method", str(point["method"]),
             "--budget", budget]
    for k, v in hp.items():
        parts += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    for k, v in (point.get("finetune") or {}).items():
        if v != STUDY:  # the study's own setting: nothing to override
            parts += ["--finetune", f"{k}={v}"]
    # repr: the exact value; a rounded one can flip n_pruned at a .5 boundary (a different plan)
    parts += ["--layer-sparsity", ",".join(f"{k}={v!r}" for k, v in layers.items())]
    return " ".join(shlex.quote(p) for p in parts)
