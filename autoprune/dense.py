"""The dense baseline: trained once per (model, data, recipe) and reused by every trial.

Cached under `<out>/dense/<hash>.pt` (weights only, read back with `weights_only=True`) with a
JSON sidecar of its accuracy; the hash covers everything that changes the result. A user may
bring their own dense checkpoint instead; it is checked against the model's architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .data import TensorData
from .engine import evaluate_split, train
from .errors import UserError
from .study import Study


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_state(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file, safely, checked against `model`'s parameters."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise UserError(f"{path} is not a readable weights-only checkpoint "
                        f"({type(exc).__name__})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    expected = model.state_dict()
    missing = set(expected) - set(state)
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or wrong or set(state) - set(expected):
        raise UserError(f"{path} does not fit model {type(model).__name__} "
                        f"({len(missing)} missing, {len(wrong)} mis-shaped tensors)")
    return state


def dense_baseline(study: Study, model: nn.Module, data: TensorData, cache_dir: Path, *,
                   seed: int = 0, checkpoint: str | None = None,
                   log: Callable[[str], None] = lambda s: None) -> dict:
    """Put dense weights into `model` (in place) and return their record.

    The record has `path`, `key`, `val_accuracy`, `test_accuracy`, `epochs`. A custom study's
    given module (`Study.custom` without `train_dense`) is its own baseline: `model` already
    holds its weights, which are measured, never trained or cached. Otherwise the cache key
    hashes `study.key_config()`: names for a study file, the architecture, weights and data
    contents for a custom study, so two different user models never share a baseline.
    """
    if checkpoint:
        model.load_state_dict(load_state(checkpoint, model))
        model.to(data.device)
        return {"path": str(checkpoint), "key": "user-checkpoint", "epochs": 0,
                "val_accuracy": evaluate_split(model, data, "val"),
                "test_accuracy": evaluate_split(model, data, "test")}
    key = config_hash({**study.key_config(), "seed": seed})
    if study.objects is not None and not study.objects.train_dense:
        model.to(data.device)
        return {"path": None, "key": f"given-module-{key}", "epochs": 0,
                "val_accuracy": evaluate_split(model, data, "val"),
                "test_accuracy": evaluate_split(model, data, "test")}
    path = Path(cache_dir) / f"{study.name}-{key}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        model.load_state_dict(load_state(path, model))
        model.to(data.device)
        return json.loads(meta_path.read_text())
    log(f"training the dense baseline of {study.name} ({study.dense.epochs} epochs)")
    train(model, data, study.dense, seed=seed,
          on_epoch=lambda r: log(f"  dense epoch {r['epoch'] + 1}: loss {r['loss']:.4f} "
                                 f"val {r['val_accuracy']:.4f}"))
    record = {"path": str(path), "key": key, "epochs": study.dense.epochs,
              "val_accuracy": evaluate_split(model, data, "val"),
              "test_accuracy": evaluate_split(model, data, "test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written baseline
    meta_path.write_text(json.dumps(record, indent=2))
    return record
