"""One pruning run on a study: dense weights -> per-layer targets -> prune -> fine-tune -> measure.

`autoprune prune` runs it once with fixed settings; every search trial runs it with sampled ones.
A `Workbench` holds what stays fixed across runs of one study in one process (data on the
device, dense weights, the traced channel graph and the accountant), so a Ray actor that runs many
trials pays for them once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .budget import FRACTION_KEYS
from .data import TensorData, load_dataset
from .dense import dense_baseline
from .device import default_device
from .engine import BOTH_PHASES, Recipe, evaluate_split, evaluate_with_loss
from .flops import Accountant, count_dense
from .models import build_model
from .pruning import get_method
from .pruning.runner import PrunedState, prune_and_finetune
from .study import Study


@dataclass
class Workbench:
    study: Study
    data: TensorData
    dense_state: dict[str, torch.Tensor]
    dense: dict[str, Any]  # record: val/test accuracy, path, key
    accountant: Accountant
    seed: int

    @classmethod
    def open(cls, study: Study, out_dir: str | Path, *, data_root: str | None = None,
             seed: int = 0, device: torch.device | str | None = None,
             checkpoint: str | None = None, download: bool = False,
             log: Callable[[str], None] = lambda s: None,
             check_layers: Callable[[list[str]], None] | None = None,
             data: TensorData | None = None) -> Workbench:
        """Load the data and the dense baseline (trained once per configuration, then cached).

        `check_layers` sees the prunable layer names before the dense model is trained, so
        input that names layers is refused in seconds, not after the dense training. A custom
        study (`Study.custom`) brings its data along: `data_root` and `download` do not apply,
        and its validation split was fixed when the data was made. `data`: the study's data
        already loaded (a search's trials get it from Ray's object store), instead of loading.
        """
        device = torch.device(device) if device else default_device()
        if data is not None:  # shared by the driver, split with the same seed
            data = data.to(device)
        elif study.objects is not None:
            data = study.objects.data.to(device)
        else:
            data = load_dataset(study.dataset, data_root, val_fraction=study.val_fraction,
                                seed=seed, device=device, download=download,
                                options=study.data_options)
        if study.train_subset:
            data = data.subset(train=study.train_subset)
        torch.manual_seed(seed)  # the dense model's initialisation is part of the study
        model = cls._build(study, data)
        accountant = Accountant(model, data.example())  # shapes only: weights do not matter
        if check_layers is not None:
            check_layers(list(accountant.graph.layers))
        record = dense_baseline(study, model, data, Path(out_dir) / "dense", seed=seed,
                                checkpoint=checkpoint, log=log)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record = {**record, "flops": accountant.dense_macs, "params": accountant.dense_params}
        return cls(study, data, state, record, accountant, seed)

    @staticmethod
    def _build(study: Study, data: TensorData) -> nn.Module:
        if study.objects is not None:  # the user's module (a copy) or factory
            return study.objects.build().to(data.device)
        info = data.info
        return build_model(study.model, info.num_classes, info.in_channels,
                           info.image_size).to(data.device)

    def fresh_model(self) -> nn.Module:
        """A new model holding the dense weights, on the data's device."""
        model = self._build(self.study, self.data)
        model.load_state_dict(self.dense_state)
        return model

    @property
    def layers(self) -> list[str]:
        return list(self.accountant.graph.layers)


def budget_fractions(metrics: dict[str, Any]) -> dict[str, float]:
    """A run's kept fractions keyed by budget kind, as `Budget.violation` reads them."""
    return {kind: metrics[key] for kind, key in FRACTION_KEYS.items()}


def granularity_of(wb: Workbench, method: str, params: dict[str, Any]) -> str:
    """'weight' or 'filter': what a method with these hyperparameters prunes.

    Asked of an instance with no targets, so each method decides it in one place (its
    `granularity` property) and nothing here names a method.
    """
    model = wb.fresh_model()
    return get_method(method)(model, {}, wb.accountant.graph, **params).granularity


def phase_epochs(wb: Workbench, method: str, params: dict[str, Any]) -> float:
    """Epochs of the method's own phase (before fine-tuning) with these hyperparameters; 0
    for a one-shot method. Asked of an instance, like `granularity_of`."""
    model = wb.fresh_model()
    return float(get_method(method)(model, {}, wb.accountant.graph, **params).prune_epochs)


def run_pruning(wb: Workbench, method: str, params: dict[str, Any], targets: dict[str, float], *,
                finetune: dict[str, Any] | None = None, seed: int | None = None,
                on_epoch: Callable[[dict], None] | None = None,
                on_pruned: Callable[[PrunedState], None] | None = None,
                resume: PrunedState | None = None,
                refit: Callable[[float], int] | None = None) -> tuple[nn.Module, dict]:
    """Prune a fresh dense copy with `method` to `targets`; return the model and its metrics.

    `on_pruned` and `resume` checkpoint and restore the state between the two phases, and
    `refit` sets the fine-tune's length once the masks are fixed (see
    `prune_and_finetune`).
    """
    from .pruning.compaction import compact

    seed = wb.seed if seed is None else seed
    model = wb.fresh_model()
    finetune = finetune or {}
    ft = wb.study.finetune.overridden(finetune)
    prune_recipe: Recipe = wb.study.prune.overridden(
        {k: v for k, v in finetune.items() if k in BOTH_PHASES})
    result = prune_and_finetune(model, wb.data, wb.accountant.graph, method, targets, params,
                                prune_recipe, ft, seed=seed, on_epoch=on_epoch,
                                on_pruned=on_pruned, resume=resume, refit=refit)
    counts = wb.accountant.count(model)
    compacted = compact(model, wb.data.example(), wb.accountant.graph)
    c_macs, c_params = count_dense(compacted, wb.data.example())
    val_accuracy, val_loss = evaluate_with_loss(model, wb.data, "val")
    metrics = {
        "method": method,
        "val_accuracy": val_accuracy, "val_loss": val_loss,
        "test_accuracy": evaluate_split(model, wb.data, "test"),
        "dense_val_accuracy": wb.dense["val_accuracy"],
        "dense_test_accuracy": wb.dense["test_accuracy"],
        "flops": counts.compact_macs, "params": counts.params,
        # the four budget kinds (budget.py): flops_frac is the compacted model's
        "flops_frac": counts.compact_flops_frac, "sparse_flops_frac": counts.sparse_flops_frac,
        "params_frac": counts.params_frac, "weights_frac": counts.weights_frac,
        # measured on the physically compacted copy: must agree with flops_frac
        "compact_flops_frac": c_macs / counts.dense_macs,
        "compact_params_frac": c_params / counts.dense_params,
        "weight_compression": counts.weight_compression,
        "granularity": result.pruner.granularity,
        "layer_sparsity": counts.layer_sparsity(),
        "history": result.history,
        # the fine-tune epoch whose weights were kept: the last unless a collapse was undone
        "finetune_kept_epoch": result.kept_epoch,
    }
    return model, metrics

