"""The Python API: what the CLI does, as functions that take and return plain values.

`prune` runs one method with fixed settings; `search` (search/orchestrator.py) runs the
Ray Tune + Optuna search. Both take a study name or file, or a `Study`; users with their own
model and data make one with `Study.custom(name, model=..., data=...)` (an `nn.Module`, trained
or not, or a model factory; a `TensorData` from `autoprune.data.from_tensors`, or tensors).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .budget import Budget
from .errors import UserError
from .orchestration.projection import CostTable, min_reachable, project, size_prior
from .pipeline import Workbench, budget_fractions, granularity_of, run_pruning
from .pruning import get_method
from .study import Study, load_study

log = logging.getLogger("autoprune")


def targets_for_budget(wb: Workbench, granularity: str, budget: Budget,
                       allocation: dict[str, float] | None = None, target: float = 1.0,
                       max_sparsity: float = 0.999) -> dict[str, float]:
    """Per-layer sparsities meeting `budget` (scaled by `target`) with the given preferences.

    Refuses, before any training, a budget that the granularity cannot reach at all.
    """
    table = CostTable.from_accountant(wb.accountant)
    reach = min_reachable(table, granularity, max_sparsity)
    for key, limit in budget.limits.items():
        if reach[key] > limit * target + 1e-12:
            hint = (" (zeros inside channels save no MACs of the compacted model: prune filters, "
                    "e.g. --set granularity=filter, or budget sparse_flops= instead)"
                    if key == "flops" and granularity == "weight" else "")
            raise UserError(f"budget {key}={limit:g} cannot be met by {granularity} pruning of "
                            f"{wb.study.model}: the smallest reachable {key} fraction is "
                            f"{reach[key]:.4f}{hint}")
    alloc = allocation or size_prior(table, wb.layers, granularity)
    return project(table, alloc, budget.limits, target, granularity, max_sparsity)


def parse_layer_sparsity(text: str, layers: list[str]) -> dict[str, float]:
    """'conv1=0.8,fc1=0.99' -> {layer: sparsity}, checked against the model's layers."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in layers:
            raise UserError(f"--layer-sparsity item '{item}': expected LAYER=VALUE with LAYER "
                            f"one of {', '.join(layers)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise UserError(f"--layer-sparsity value '{value}' is not a number") from None
        if not 0 <= out[name] < 1:
            raise UserError(f"--layer-sparsity {name}={value}: must be in [0, 1)")
    return out


def prune(study: str | Study, method: str, budget: str | Budget | None = None, *,
          params: dict[str, Any] | None = None, layer_sparsity: str | None = None,
          out: str | Path = "autoprune-runs", data_root: str | None = None, seed: int = 0,
          checkpoint: str | None = None, finetune: dict[str, Any] | None = None,
          download: bool = False) -> dict:
    """Run one pruning method with fixed settings; return its metrics (see pipeline.run_pruning).

    `study` is a name, a .yaml path or a `Study` (`Study.custom` for the user's own model and
    data; `data_root` and `download` do not apply to it). The dense baseline's accuracies are
    in `dense_val_accuracy` / `dense_test_accuracy`.
    """
    st = study if isinstance(study, Study) else load_study(study)
    get_method(method).make_params(**(params or {}))  # validate before loading anything
    b = budget if isinstance(budget, Budget) else Budget.parse(budget or st.budget)
    if finetune:
        st.finetune.overridden(finetune)  # refuse bad keys now
    Path(out).mkdir(parents=True, exist_ok=True)
    check = (lambda layers: parse_layer_sparsity(layer_sparsity, layers)) if layer_sparsity \
        else None
    wb = Workbench.open(st, out, data_root=data_root, seed=seed, checkpoint=checkpoint,
                        download=download, log=log.info, check_layers=check)
    log.info(f"dense baseline: val {wb.dense['val_accuracy']:.4f} "
             f"test {wb.dense['test_accuracy']:.4f}")
    gran = granularity_of(wb, method, params or {})
    if layer_sparsity:
        targets = parse_layer_sparsity(layer_sparsity, wb.layers)
    else:
        targets = targets_for_budget(wb, gran, b)
    log.info(f"{method} ({gran}) targets: " + ", ".join(f"{k}={v:.3f}" for k, v in targets.items()))
    _, metrics = run_pruning(wb, method, params or {}, targets, finetune=finetune, seed=seed,
                             on_epoch=lambda r: log.info(f"  {r['phase']} epoch {r['epoch'] + 1}: "
                                                    f"loss {r['loss']:.4f} "
                                                    f"val {r['val_accuracy']:.4f}"))
    fracs = budget_fractions(metrics)
    metrics.update(study=st.name, budget=str(b), params_set=params or {}, targets=targets,
                   within_budget=b.satisfied(fracs), dense_flops=wb.dense["flops"],
                   dense_params=wb.dense["params"])
    return metrics


def search(study: str | Study = "digits-lenet", budget: str | None = None,
           **options: Any) -> dict:
    """Run (or with `resume=True` continue) a search; the CLI's `autoprune search` calls this.

    `study` is a name, a .yaml path or a `Study`; a `Study.custom` travels to the Ray workers
    with its model (code included when its module may not be importable there) and data.

    `options` are the fields of `autoprune.orchestration.SearchOptions` (trials,
    workers, sampler, scheduler, out, ray_address, tracking_uri, ...). Returns the summary dict that
    `--json` prints: counts, the Pareto front and the best point inside the budget. Progress
    goes to the "autoprune" logger (INFO; the CLI shows it on stderr).
    """
    from .orchestration import SearchOptions
    from .orchestration import search as run_search

    unknown = set(options) - set(SearchOptions.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown search option(s): {', '.join(sorted(unknown))}")
    return run_search(SearchOptions(study=study, budget=budget, **options))


def export(out: str | Path, study: str | Study, to: str | Path, *, budget: str | None = None,
           pick: str = "max-accuracy", tracking_uri: str | None = None,
           data_root: str | None = None, seed: int = 0) -> dict:
    """Export the best recorded trial of a search (`autoprune export`); returns the model card.

    `study` is a name, a .yaml path or the `Study` searched, a `Study.custom` included: its
    export is rebuilt from the trial checkpoint and the study's model object. Load it back with
    `autoprune.export.load_exported(to)` (for a custom model: `load_exported(to, model=...)`).
    """
    from .export.registry import export_best

    return export_best(out, study, to, budget=budget, pick=pick, tracking_uri=tracking_uri,
                       data_root=data_root, seed=seed)


def report(out: str | Path = "autoprune-runs", study: str | Study | None = None, *,
           front: bool = False, tracking_uri: str | None = None):
    """The trials of the latest search in `out` as a pandas DataFrame, one row per trial
    (method, hyperparameters, per-layer sparsities, every metric; `pareto` marks the front).
    `front=True` keeps the front only. `study` defaults to the most recently searched one."""
    from .reporting import trials_frame

    name = study.name if isinstance(study, Study) else study
    return trials_frame(out, name, tracking_uri, front=front)
