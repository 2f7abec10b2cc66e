"""One search trial, as run in a Ray worker: sampled config -> pruned model -> metrics.

Workers only compute and report; the driver talks to MLflow and Optuna. The `Workbench` (data
on the device, dense weights from the study's cache, the traced graph) is kept per process, so a
reused Ray actor pays for it once.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import tune

from ..budget import Budget
from ..device import set_threads
from ..errors import TrainingDiverged
from ..pipeline import Workbench, granularity_of, run_pruning
from ..study import load_study
from .projection import CostTable, fractions, project
from .searcher import TRIAL_NUMBER_KEY
from .space import SearchSpace


@dataclass(frozen=True)
class TrialContext:
    """Everything a worker needs besides the sampled config (sent once via the object store)."""

    study: str  # path of the study file
    space: str  # path of the search space file
    out: str
    study_dir: str
    budget: str
    data_root: str | None
    seed: int
    cpus: float
    checkpoint: str | None = None


_BENCHES: dict[tuple, Workbench] = {}


def workbench(ctx: TrialContext) -> Workbench:
    key = (ctx.study, ctx.out, ctx.data_root, ctx.seed, ctx.checkpoint)
    if key not in _BENCHES:
        _BENCHES.clear()  # one study per process at a time
        _BENCHES[key] = Workbench.open(load_study(ctx.study), ctx.out, data_root=ctx.data_root,
                                       seed=ctx.seed, checkpoint=ctx.checkpoint)
    return _BENCHES[key]


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Ray Tune function trainable: reports per-epoch progress, then one final result."""
    set_threads(ctx.cpus)
    wb = workbench(ctx)
    space = SearchSpace.load(ctx.space)
    plan = space.decode(config, wb.layers)
    budget = Budget.parse(ctx.budget)
    gran = granularity_of(wb, plan.method, plan.params)
    table = CostTable.from_accountant(wb.accountant)
    targets = project(table, plan.allocation, budget.limits, plan.target, gran,
                      space.max_sparsity)
    planned = fractions(table, targets, gran)
    number = int(config.get(TRIAL_NUMBER_KEY, -1))

    def progress(rec: dict) -> None:
        # Intermediate reports let ASHA stop weak trials; they are never final results.
        tune.report({"val_accuracy": rec["val_accuracy"], "loss": rec["loss"],
                     "flops_frac": planned["flops"], "params_frac": planned["params"],
                     "phase": rec["phase"], "is_final": False})

    try:
        model, m = run_pruning(wb, plan.method, plan.params, targets, finetune=plan.finetune,
                               seed=ctx.seed + max(number, 0), on_epoch=progress)
    except TrainingDiverged as exc:
        tune.report({"failed": True, "error": str(exc), "is_final": True,
                     "val_accuracy": 0.0, "flops_frac": 1.0, "params_frac": 1.0})
        return
    fracs = {"flops": m["flops_frac"], "params": m["params_frac"]}
    ckpt_dir = Path(ctx.study_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"trial-{number}.pt"
    fd, tmp = tempfile.mkstemp(dir=ckpt_dir, suffix=".tmp")
    os.close(fd)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, ckpt)
    final = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and
             not (isinstance(v, float) and math.isnan(v))}
    final.update(is_final=True, failed=False, budget_violation=budget.violation(fracs),
                 target=plan.target, checkpoint=str(ckpt),
                 layer_sparsity=json.dumps(m["layer_sparsity"]),
                 targets=json.dumps(targets), history=json.dumps(m["history"]),
                 hparams=json.dumps(plan.params), finetune_overrides=json.dumps(plan.finetune))
    tune.report(final)
