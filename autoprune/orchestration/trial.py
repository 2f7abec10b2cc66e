"""One search trial, as run in a Ray worker: sampled config -> pruned model -> metrics.

Workers only compute and report; the driver talks to MLflow and Optuna. The `Workbench` (data
on the device, dense weights from the study's cache, the traced graph) is kept per process, so a
reused Ray actor pays for it once.

Reliability:
- a trial checkpoints once, between its two phases (weights with masks applied, the masks, the
  prune phase's history) through `tune.report(..., checkpoint=...)`. When its worker dies (node
  lost, out of memory, killed), Tune restarts it (`FailureConfig(max_failures)`) and the retry
  resumes from that checkpoint: the prune phase is skipped, fine-tuning starts over. The
  granularity is the phase boundary: a worker that dies during the prune phase restarts the
  trial from scratch, one that dies during fine-tuning repeats the fine-tuning only.
- an exception inside a trial (a diverging loss, a method that raises) is not a crash: it is
  reported as a final result with `failed=True` and the error, so the trial is recorded as
  failed at once (no retry of a deterministic error) and the search goes on.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import tune

from ..budget import FRACTION_KEYS, Budget
from ..device import set_threads
from ..errors import TrainingDiverged, UserError
from ..pipeline import Workbench, budget_fractions, granularity_of, run_pruning
from ..pruning.runner import PrunedState
from ..study import Study
from .distributed import RanksLost
from .faults import Faults
from .global_split import global_plan
from .projection import (
    CostTable,
    budget_share,
    fractions,
    project,
    reachable_target,
    size_prior,
    with_prior,
)
from .scheduler import RUNG_KEY, SIZE_KEY, rung_epoch
from .searcher import TRIAL_NUMBER_KEY
from .space import SearchSpace

CKPT_STATE, CKPT_META = "pruned.pt", "pruned.json"


@dataclass(frozen=True)
class TrialContext:
    """Everything a worker needs besides the sampled config (sent once via the object store).

    The study and the space travel as parsed objects, so no node needs the driver's YAML files;
    the dense baseline cache (under `out`) and the data (`data_root`) must be at the same path
    on every node (a shared file system).
    """

    study: Study
    space: SearchSpace
    out: str
    study_dir: str
    budget: str
    data_root: str | None
    seed: int
    cpus: float
    checkpoint: str | None = None
    faults: Faults = field(default_factory=Faults)  # the test hook (faults.py); inert
    shared_data: Any = None  # distributed.SharedData: in-memory data from the object store
    trial_workers: int = 1  # > 1: data-parallel over that many Ray Train workers
    gpus: float = 0.0  # per trial worker


_BENCHES: dict[tuple, Workbench] = {}


def workbench(ctx: TrialContext) -> Workbench:
    """This process's `Workbench` of the trial's study, opened on first use.

    Keyed by the study's fingerprint as well as its name and source: two custom studies
    (`Study.custom`, all of source '<python>') of the same name but other models or data must
    not share one.
    """
    key = (ctx.study.source, ctx.study.name, ctx.study.fingerprint(), ctx.out, ctx.data_root,
           ctx.seed, ctx.checkpoint)
    if key not in _BENCHES:
        _BENCHES.clear()  # one study per process at a time
        data = None
        if ctx.shared_data is not None:
            from .distributed import fetch_data

            data = fetch_data(ctx.shared_data)
        _BENCHES[key] = Workbench.open(ctx.study, ctx.out, data_root=ctx.data_root,
                                       seed=ctx.seed, checkpoint=ctx.checkpoint, data=data)
    return _BENCHES[key]


def node_info() -> dict[str, str]:
    """Where this trial runs: the Ray node id and IP (shown per trial in Optuna and MLflow)."""
    import ray

    try:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    except Exception:  # noqa: BLE001 - informational only
        return {}


# Where a trial's results and checkpoints go: Tune's session. The ranks of a data-parallel
# trial (distributed.py) run `_run` in Ray Train workers and swap these two for their own.
def _report(metrics: dict, checkpoint: tune.Checkpoint | None = None) -> None:
    tune.report(metrics, checkpoint=checkpoint)


def _get_checkpoint() -> tune.Checkpoint | None:
    return tune.get_checkpoint()


def _save_pruned(state: PrunedState, fingerprint: dict, fracs: dict[str, float]) -> None:
    """Report the between-phases state as this trial's Tune checkpoint."""
    with tempfile.TemporaryDirectory(prefix="autoprune-ckpt-") as d:
        torch.save({"state": state.state, "masks": state.masks}, Path(d) / CKPT_STATE)
        (Path(d) / CKPT_META).write_text(json.dumps({**fingerprint, "history": state.history}))
        last = state.history[-1] if state.history else {}
        _report({"val_accuracy": float(last.get("val_accuracy", 0.0)),
                     "loss": float(last.get("loss", 0.0)), "phase": "pruned",
                     "is_final": False, **fracs},
                    checkpoint=tune.Checkpoint.from_directory(d))


def _load_pruned(fingerprint: dict) -> PrunedState | None:
    """The checkpoint of an earlier attempt of this trial, if it has one and it matches."""
    ckpt = _get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        meta_path, state_path = Path(d) / CKPT_META, Path(d) / CKPT_STATE
        if not (meta_path.exists() and state_path.exists()):
            return None
        meta = json.loads(meta_path.read_text())
        if any(meta.get(k) != v for k, v in fingerprint.items()):
            return None  # another trial's or another plan's state: start over
        blob = torch.load(state_path, map_location="cpu", weights_only=True)
    return PrunedState(blob["state"], blob["masks"], meta["history"])


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    """The model's weights at `path`, written whole or not at all (a worker may die mid-way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return path


def _failure(exc: BaseException) -> dict:
    """A final result recording a trial that raised (told to Optuna and MLflow as failed)."""
    if isinstance(exc, (TrainingDiverged, UserError)):
        error, detail = f"{type(exc).__name__}: {exc}", f"{type(exc).__name__}: {exc}"
    else:
        error = f"{type(exc).__name__}: {exc}"
        detail = "".join(traceback.format_exception(exc))
    return {"failed": True, "error": error.splitlines()[0] if error else "error",
            "error_detail": detail, "is_final": True, "val_accuracy": 0.0,
            **{key: 1.0 for key in FRACTION_KEYS.values()}}


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Ray Tune function trainable: reports per-epoch progress, then one final result."""
    number = int(config.get(TRIAL_NUMBER_KEY, -1))
    where = node_info()
    try:
        if ctx.trial_workers > 1:
            from .distributed import run_data_parallel

            final = run_data_parallel(config, ctx, number)
        else:
            final = _run(config, ctx, number)
    except RanksLost:  # a data-parallel trial's worker died: Tune retries it, as a lost worker
        raise
    except Exception as exc:  # noqa: BLE001 - every error of a trial is recorded, not raised
        final = _failure(exc)
    final.update(where)
    tune.report(final)


def _run(config: dict, ctx: TrialContext, number: int) -> dict[str, Any]:
    set_threads(ctx.cpus)
    wb = workbench(ctx)
    space = ctx.space
    plan = space.decode(config, wb.layers)
    budget = Budget.parse(ctx.budget)
    gran = granularity_of(wb, plan.method, plan.params)
    table = CostTable.from_accountant(wb.accountant)
    target = reachable_target(plan.target, space.target_floor, table, budget.limits, gran,
                              space.max_sparsity)
    if plan.split == "global":  # one ranking of every unit of the dense model (global_split.py)
        targets = global_plan(wb, plan, gran, budget.limits, target, space.max_sparsity)
    else:
        allocation = plan.allocation
        if space.prior == "size":
            allocation = with_prior(allocation, size_prior(table, list(allocation), gran,
                                                           plan.prior_strength))
        targets = project(table, allocation, budget.limits, target, gran, space.max_sparsity)
    planned = fractions(table, targets, gran)
    # every report carries the four fractions: the sampler's objectives are the budget's kinds
    planned_fracs = {FRACTION_KEYS[k]: v for k, v in planned.items()}
    ctx.faults.on_start(number)
    fingerprint = {"trial": number, "method": plan.method, "model": wb.study.model,
                   "targets": targets, "flops_frac": planned["flops"],
                   "params_frac": planned["params"]}
    resume = _load_pruned(fingerprint)

    ft_epochs = float(plan.finetune.get("epochs", wb.study.finetune.epochs))
    feasible = budget.satisfied(planned)
    share = budget_share(planned, budget.limits)  # ASHA compares it with no larger trials only

    def progress(rec: dict) -> None:
        # Intermediate reports are never final results. ASHA compares trials only on the
        # reports that carry RUNG_KEY: fine-tune epochs of feasible trials (scheduler.py).
        metrics = {"val_accuracy": rec["val_accuracy"], "loss": rec["loss"],
                   **planned_fracs, "phase": rec["phase"], "epoch": rec["epoch"],
                   "step": rec.get("step", 0), "is_final": False}
        k = rung_epoch(rec, ft_epochs, feasible)
        if k is not None:
            metrics[RUNG_KEY], metrics[SIZE_KEY] = k, share
        _report(metrics)
        ctx.faults.on_epoch(number, rec.get("phase"), ctx.study_dir)

    model, m = run_pruning(wb, plan.method, plan.params, targets, finetune=plan.finetune,
                           seed=ctx.seed + max(number, 0), on_epoch=progress,
                           on_pruned=lambda s: _save_pruned(s, fingerprint, planned_fracs),
                           resume=resume)
    fracs = budget_fractions(m)
    ckpt = save_weights(model, Path(ctx.study_dir) / "checkpoints" / f"trial-{number}.pt")
    final = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and
             not (isinstance(v, float) and math.isnan(v))}
    final.update(is_final=True, failed=False, budget_violation=budget.violation(fracs),
                 target=target, checkpoint=str(ckpt),
                 restored_from_checkpoint=int(resume is not None),
                 layer_sparsity=json.dumps(m["layer_sparsity"]),
                 targets=json.dumps(targets), history=json.dumps(m["history"]),
                 hparams=json.dumps(plan.params), finetune_overrides=json.dumps(plan.finetune))
    return final
