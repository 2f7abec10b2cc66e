"""`TrialRecord`: one finished trial, the one shape the front, the report and export read.

A trial reports a flat Tune result (Ray needs a dict of scalars); the searcher keeps the fields
named by `TrialRecord.OPTUNA_ATTRS` on the Optuna trial, and `TrialRecord.from_optuna` reads them
back, so the study alone can rebuild every point. `as_point()` is its plain-dict form (what
`--json`, the MLflow tables and `autoprune export` show).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from .names import FLOPS_FRAC, PARAMS_FRAC, VAL_ACC, VAL_LOSS

FEASIBLE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class TrialRecord:
    """A completed trial: its objectives, where its weights are and how to rerun it."""

    trial: int
    method: str | None
    val_accuracy: float
    flops_frac: float
    params_frac: float
    test_accuracy: float | None = None
    val_loss: float | None = None  # breaks ties of val_accuracy (pareto.py)
    compact_flops_frac: float | None = None
    sparse_flops_frac: float | None = None  # MACs of nonzero weights (flops_frac: compacted)
    weights_frac: float | None = None  # nonzero conv/linear weights
    run_id: str | None = None
    checkpoint: str | None = None
    hparams: str | None = None  # the method's hyperparameters as JSON text (as recorded)
    granularity: str | None = None
    # per-layer sparsities and fine-tune overrides: with method and hparams, all that
    # `autoprune prune` needs to rerun this trial alone (e.g. longer)
    layer_sparsity: dict[str, float] | None = None
    finetune: dict[str, Any] | None = None
    feasible: bool = True
    budget_violation: float = 0.0  # how far over the budget (<= 0: within it)
    # Set when the finalist stage retrained this trial with the full fine-tune
    # (orchestration/finalists.py): val/test accuracy and checkpoint are then the finalist's,
    # and the search-time values are kept here.
    finalist: bool = False
    final_epochs: int | None = None
    search_val_accuracy: float | None = None
    search_test_accuracy: float | None = None

    # Final-result fields kept on the Optuna trial, so the front can be rebuilt from the study.
    OPTUNA_ATTRS: ClassVar[tuple[str, ...]] = (
        "method", "test_accuracy", VAL_LOSS, FLOPS_FRAC, PARAMS_FRAC, "compact_flops_frac",
        "sparse_flops_frac", "weights_frac", "checkpoint", "hparams", "granularity",
        "budget_violation", "node_id", "node_ip", "restored_from_checkpoint", "targets",
        "finetune_overrides")
    FAILED_ATTRS: ClassVar[tuple[str, ...]] = ("error", "node_id", "node_ip")
    # Numbers of a trial's final Tune result logged as its MLflow run's metrics.
    RESULT_METRICS: ClassVar[tuple[str, ...]] = (
        "val_accuracy", VAL_LOSS, "test_accuracy", "flops_frac", "sparse_flops_frac",
        "params_frac", "weights_frac", "compact_flops_frac", "compact_params_frac", "flops",
        "params", "weight_compression", "budget_violation", "target", "dense_val_accuracy",
        "dense_test_accuracy", "restored_from_checkpoint", "finetune_kept_epoch")

    @classmethod
    def from_optuna(cls, t: Any) -> TrialRecord:
        """From a COMPLETE Optuna `FrozenTrial` (values[0] is val_accuracy; the other values are
        the budget's kinds, `Budget.objectives`, so the fractions come from the attributes)."""
        attrs = t.user_attrs
        cons = t.constraints  # Optuna 5: {key: value}, feasible when every value <= 0
        violation = max(cons.values()) if cons else attrs.get("budget_violation", 0.0)
        return cls(trial=t.number, method=attrs.get("method"), val_accuracy=t.values[0],
                   flops_frac=_fraction(t, FLOPS_FRAC, 1), params_frac=_fraction(t, PARAMS_FRAC, 2),
                   test_accuracy=attrs.get("test_accuracy"), val_loss=attrs.get(VAL_LOSS),
                   compact_flops_frac=attrs.get("compact_flops_frac"),
                   sparse_flops_frac=attrs.get("sparse_flops_frac"),
                   weights_frac=attrs.get("weights_frac"),
                   run_id=attrs.get("run_id"), checkpoint=attrs.get("checkpoint"),
                   hparams=attrs.get("hparams"), granularity=attrs.get("granularity"),
                   layer_sparsity=_json(attrs.get("targets")),
                   finetune=_json(attrs.get("finetune_overrides")),
                   feasible=violation <= FEASIBLE_TOLERANCE, budget_violation=violation)

    def with_finalist(self, result: dict[str, Any] | None) -> TrialRecord:
        """This record with a finalist's retrained accuracy and weights, if `result` is a
        finished finalist (a failed one leaves the search-time record as it was)."""
        if not result or result.get("failed") or "val_accuracy" not in result:
            return self
        return replace(self, val_accuracy=float(result["val_accuracy"]),
                       test_accuracy=result.get("test_accuracy"),
                       val_loss=result.get(VAL_LOSS),
                       checkpoint=result.get("checkpoint", self.checkpoint), finalist=True,
                       final_epochs=result.get("epochs"),
                       # the rerun command then repeats the finalist, not the short trial
                       # (whose phase lengths the finalist stretched: its own hparams)
                       finetune={**(self.finetune or {}), "epochs": result.get("epochs")},
                       hparams=result.get("hparams", self.hparams),
                       search_val_accuracy=self.val_accuracy,
                       search_test_accuracy=self.test_accuracy)

    def hyperparameters(self) -> dict[str, Any]:
        return json.loads(self.hparams) if self.hparams else {}

    def as_point(self) -> dict[str, Any]:
        """The plain-dict form (keys as in `--json`; `granularity` is left to the model card)."""
        d = asdict(self)
        d.pop("granularity")
        d.pop("budget_violation")
        return d

    def metrics(self) -> dict[str, float]:
        """The numbers of the trial's MLflow run (those the Optuna study keeps)."""
        extra = {"test_accuracy": self.test_accuracy, VAL_LOSS: self.val_loss,
                 "search_val_accuracy": self.search_val_accuracy,
                 "search_test_accuracy": self.search_test_accuracy,
                 "compact_flops_frac": self.compact_flops_frac,
                 "sparse_flops_frac": self.sparse_flops_frac, "weights_frac": self.weights_frac,
                 "budget_violation": self.budget_violation}
        return {**self.objectives(), **{k: float(v) for k, v in extra.items()
                                        if isinstance(v, (int, float))}}

    def objectives(self) -> dict[str, float]:
        return {VAL_ACC: self.val_accuracy, FLOPS_FRAC: self.flops_frac,
                PARAMS_FRAC: self.params_frac}


def _json(value: Any) -> dict | None:
    try:
        return json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        return None


def _fraction(t: Any, key: str, legacy_index: int) -> float:
    """A kept fraction of trial `t`: its attribute, or, in a study made before the fractions
    were kept as attributes, its objective value (then always val, flops, params)."""
    if key in t.user_attrs:
        return float(t.user_attrs[key])
    return t.values[legacy_index]
