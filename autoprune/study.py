"""Study definitions (`studies/*.yaml`): model, data, recipes, search space, default budget.

A study is everything that stays fixed while a search varies the pruning: which model on which
data, how the dense baseline is trained, how each method's phase and the fine-tuning train, the
search space and the budget and trial count a plain `autoprune search` uses.

A study file names its model and data; `Study.custom` makes a study of the user's own objects (an
`nn.Module` or a factory of one, tensors), for the Python API.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import yamlio
from .budget import Budget
from .data import FOLDER_OPTIONS, TensorData, from_tensors, is_streamed
from .engine import Recipe
from .errors import UserError
from .imagefolder import folder_options
from .paths import STUDIES_DIR, resolve_yaml

_KEYS = {"name", "description", "expects", "model", "dataset", "data", "dense", "prune",
         "finetune", "space", "budget", "trials", "allocation"}
_DATA_KEYS = {"val_fraction", "train_subset", "download", *FOLDER_OPTIONS}


@dataclass
class Study:
    name: str
    model: str
    dataset: str
    dense: Recipe
    prune: Recipe  # optimiser/lr/batch of a method's own phase (the method sets its length)
    finetune: Recipe
    space: str = "default"
    budget: str = "flops=0.4"
    trials: int = 20
    description: str = ""
    expects: str = ""
    val_fraction: float = 0.1
    train_subset: int | None = None  # first N training examples only (quick studies)
    data_options: dict[str, Any] = field(default_factory=dict)  # image folders: size, norm, workers
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    # The user's own model and data (`Study.custom`); then `model` and `dataset` are labels.
    objects: UserObjects | None = field(default=None, repr=False)

    def key_config(self) -> dict[str, Any]:
        """What determines the dense baseline (its cache key)."""
        if self.objects is not None:  # no names to key on: hashes of the objects themselves
            return {"model": self.objects.key(), "dataset": {"name": self.dataset,
                                                             "sha256": self.objects.data_hash},
                    "train_subset": self.train_subset, "dense": self.dense.to_dict()}
        key = {"model": self.model, "dataset": self.dataset, "val_fraction": self.val_fraction,
               "train_subset": self.train_subset, "dense": self.dense.to_dict()}
        if self.data_options:  # only then, so the keys of existing caches stay as they were
            key["data_options"] = {k: v for k, v in sorted(self.data_options.items())
                                   if k != "num_workers"}
        return key

    def fingerprint(self) -> str:
        """A hash of everything a pruning run reads from the study (the dense baseline's key,
        the recipes, the name and source), so caches of a `Workbench` never mix two studies."""
        blob = json.dumps({"key": self.key_config(), "prune": self.prune.to_dict(),
                           "finetune": self.finetune.to_dict(), "name": self.name,
                           "source": self.source}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What the study runs on, as plain values (the MLflow parent run's params).

        Never the objects themselves: a custom study is described by its model's class, size
        and hash and its data's sizes and hash.
        """
        d: dict[str, Any] = {"model": self.model, "dataset": self.dataset}
        if self.objects is not None:
            d.update(self.objects.describe())
        return d

    @classmethod
    def custom(cls, name: str, model: nn.Module | Callable[[], nn.Module],
               data: TensorData | Mapping[str, Any] | Sequence[Any], *,
               train_dense: bool | None = None, dense: Recipe | Mapping[str, Any] | None = None,
               prune: Recipe | Mapping[str, Any] | None = None,
               finetune: Recipe | Mapping[str, Any] | None = None, space: str = "default",
               budget: str = "flops=0.4", trials: int = 20, description: str = "",
               val_fraction: float = 0.1, split_seed: int = 0,
               num_classes: int | None = None) -> Study:
        """A study of the user's own model and data, for `autoprune.search` / `autoprune.prune`.

        `model` is either
        - an `nn.Module`: its current weights are the dense baseline (nothing is trained, as
          with `--dense-checkpoint`); with `train_dense=True` the `dense` recipe trains it
          further from those weights first (cached like any dense baseline). The study keeps a
          CPU copy made now, so later changes to the module do not change the study, and the
          module itself is never modified;
        - or a zero-argument callable returning a fresh `nn.Module` (a class, a function, a
          lambda): the `dense` recipe trains it once per configuration, then it is cached.

        `data` is a `TensorData` (see `autoprune.data.from_tensors`), or plain tensors as
        `{"train": (x, y), "test": (x, y)[, "val": (x, y)]}` or `((x, y), (x_test, y_test))`,
        turned into one by `from_tensors` with `val_fraction`, `split_seed`, `num_classes`.
        Inputs are used as given: normalise them beforehand. The number of classes is the width
        of the model's output.

        Everything is checked now, in the driver (`UserError` with a one-line message): a model
        class defined in a script, notebook or test module travels to Ray workers by value.
        """
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UserError(f"study name {name!r} must be letters, digits, '.', '_' or '-' (it "
                            f"names the output folder and the MLflow experiment)")
        data = _user_data(data, val_fraction, split_seed, num_classes)
        objects = UserObjects.make(model, data, train_dense)
        recipes = {key: _recipe(key, value) for key, value in
                   (("dense", dense), ("prune", prune), ("finetune", finetune))}
        Budget.parse(budget)
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
            raise UserError(f"trials must be a positive integer, got {trials!r}")
        if not isinstance(space, str):
            raise UserError(f"space must be a search space name or .yaml path, got "
                            f"{type(space).__name__}")
        return cls(name=name, model=objects.label, dataset=objects.data.info.name,
                   dense=recipes["dense"], prune=recipes["prune"],
                   finetune=recipes["finetune"], space=space, budget=budget, trials=trials,
                   description=str(description), source="<python>", objects=objects,
                   val_fraction=len(data.val_y) / (len(data.train_y) + len(data.val_y)))


def _recipe(key: str, value: Recipe | Mapping[str, Any] | None) -> Recipe:
    if isinstance(value, Recipe):
        return value
    if value is not None and not isinstance(value, Mapping):
        raise UserError(f"'{key}' must be a Recipe or a mapping of recipe keys, got "
                        f"{type(value).__name__}")
    try:
        return Recipe.from_dict(dict(value or {}))
    except (TypeError, UserError) as exc:
        raise UserError(f"'{key}': {exc}") from None


def _user_data(data: Any, val_fraction: float, seed: int, num_classes: int | None) -> TensorData:
    """`Study.custom`'s `data` as a checked CPU `TensorData` with int64 labels."""
    if isinstance(data, TensorData):
        data.validate()
        cpu = data.to("cpu")
        return TensorData(cpu.info, cpu.train_x, cpu.train_y.long(), cpu.val_x,
                          cpu.val_y.long(), cpu.test_x, cpu.test_y.long())
    if isinstance(data, Mapping):
        unknown = set(data) - {"train", "val", "test"}
        if unknown or not {"train", "test"} <= set(data):
            raise UserError("data as a mapping needs keys 'train' and 'test' (and optionally "
                            "'val'), each an (inputs, labels) pair")
        return from_tensors(data["train"], data["test"], val=data.get("val"),
                            val_fraction=val_fraction, seed=seed, num_classes=num_classes)
    if isinstance(data, Sequence) and not isinstance(data, str) and len(data) == 2:
        return from_tensors(data[0], data[1], val_fraction=val_fraction, seed=seed,
                            num_classes=num_classes)
    raise UserError(f"data must be a TensorData (autoprune.data.from_tensors), a mapping "
                    f"{{'train': (x, y), 'test': (x, y)}} or a pair ((x, y), (x_test, y_test)), "
                    f"got {type(data).__name__}")


def _qualname(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _call_factory(factory: Callable[[], nn.Module]) -> nn.Module:
    """Call a user's model factory; anything but a module back is a `UserError`."""
    try:
        model = factory()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: report, do not crash
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"the model factory {_qualname(factory)}() raised "
                        f"{type(exc).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"the model factory {_qualname(factory)}() returned "
                        f"{type(model).__name__}, not a torch nn.Module")
    return model


class UserObjects:
    """The model and data of a study made in Python (`Study.custom`), with their hashes.

    Hashes are taken once, here in the driver, so every Ray worker keys the dense baseline
    the same way. `by_value` names the modules of the model's code that Ray workers may not be
    able to import (see `models.ships_by_value` and `ship_by_value`).
    """

    def __init__(self, *, data: TensorData, module: nn.Module | None,
                 factory: Callable[[], nn.Module] | None, train_dense: bool, label: str,
                 model_class: str, architecture: str, weights: str | None, n_params: int,
                 data_hash: str, by_value: tuple[str, ...]) -> None:
        self.data, self.module, self.factory = data, module, factory
        self.train_dense, self.label, self.model_class = train_dense, label, model_class
        self.architecture, self.weights, self.n_params = architecture, weights, n_params
        self.data_hash, self.by_value = data_hash, by_value

    @classmethod
    def make(cls, model: Any, data: TensorData, train_dense: bool | None) -> UserObjects:
        """Check `model` against `data` and take the hashes (see `Study.custom`)."""
        from .graph import PRUNABLE_TYPES
        from .models import architecture_hash, ships_by_value, weights_hash

        if train_dense is not None and not isinstance(train_dense, bool):
            raise UserError(f"train_dense must be True or False, got {train_dense!r}")
        module: nn.Module | None = None
        factory: Callable[[], nn.Module] | None = None
        if isinstance(model, nn.Module):
            module = copy.deepcopy(model).cpu()  # the study's own snapshot of the weights
            built = module
        elif callable(model):
            if train_dense is False:
                raise UserError("a model factory is always trained (train_dense=False needs a "
                                "trained nn.Module instance)")
            factory = model
            built = _call_factory(factory).cpu()
        else:
            raise UserError(f"model must be a torch nn.Module or a zero-argument callable "
                            f"returning one, got {type(model).__name__}")
        label = type(built).__name__
        if not any(isinstance(m, PRUNABLE_TYPES) for m in built.modules()):
            raise UserError(f"model {label} has no Conv or Linear layer to prune")
        width = _output_width(built, data, label)
        top = max(int(t.max()) for t in (data.train_y, data.val_y, data.test_y))
        if top >= width:
            raise UserError(f"labels go up to {top}, but model {label} outputs {width} classes")
        if width != data.info.num_classes:
            data = TensorData(replace(data.info, num_classes=width), data.train_x, data.train_y,
                              data.val_x, data.val_y, data.test_x, data.test_y)
        names = {type(m).__module__ for m in built.modules()}
        inner = getattr(factory, "func", factory)  # functools.partial
        if inner is not None and getattr(inner, "__module__", None):
            names.add(inner.__module__)
        cls_ = type(built)
        return cls(data=data, module=module, factory=factory,
                   train_dense=factory is not None or bool(train_dense), label=label,
                   model_class=f"{cls_.__module__}.{cls_.__qualname__}",
                   architecture=architecture_hash(built),
                   weights=weights_hash(module) if module is not None else None,
                   n_params=sum(p.numel() for p in built.parameters()),
                   data_hash=data.fingerprint(),
                   by_value=tuple(sorted(n for n in names if ships_by_value(n))))

    def build(self) -> nn.Module:
        """A fresh model: a copy of the given module (its weights), or the factory's."""
        if self.module is not None:
            return copy.deepcopy(self.module)
        assert self.factory is not None
        return _call_factory(self.factory)

    def key(self) -> dict[str, Any]:
        """The model's part of the dense-cache key: its architecture, and for a given module
        its weights (a given module is its own baseline, or the start of its training)."""
        return {"architecture": self.architecture, "weights": self.weights,
                "trained": self.train_dense}

    def describe(self) -> dict[str, Any]:
        if self.factory is not None:
            origin = f"factory {_qualname(self.factory)}, dense-trained"
        elif self.train_dense:
            origin = "module, dense-trained from its weights"
        else:
            origin = "module (its weights are the dense baseline)"
        d = self.data
        return {"model_class": self.model_class, "model_from": origin,
                "model_params": self.n_params, "model_architecture": self.architecture[:16],
                "data_train": int(d.train_x.shape[0]), "data_val": int(d.val_x.shape[0]),
                "data_test": int(d.test_x.shape[0]), "data_classes": d.info.num_classes,
                "data_input_shape": "x".join(map(str, d.train_x.shape[1:])),
                "data_sha256": self.data_hash[:16]}

    def ship_by_value(self) -> None:
        """Have Ray's cloudpickle carry the model's code by value from now on in this process.

        Called by the search before the study is sent to the workers, where the modules in
        `by_value` may not be importable (registration is per module name and harmless to keep:
        by-value code runs wherever the bytes go).
        """
        from ray import cloudpickle

        registered = cloudpickle.list_registry_pickle_by_value()
        for name in self.by_value:
            if name in sys.modules and name not in registered:
                cloudpickle.register_pickle_by_value(sys.modules[name])


def _output_width(model: nn.Module, data: TensorData, label: str) -> int:
    """The number of classes `model` predicts, from a forward pass on two training inputs."""
    x = data.train_x[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - the user's model: report, do not crash
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"model {label} cannot run on inputs of shape {tuple(x.shape)}: "
                        f"{type(exc).__name__}: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model {label} must return logits of shape (batch, classes); on inputs "
                        f"of shape {tuple(x.shape)} it returned {got}")
    if out.shape[1] < 2:
        raise UserError(f"model {label} outputs {out.shape[1]} class(es); it needs at least 2")
    return int(out.shape[1])


def list_studies() -> list[Study]:
    return [load_study(str(p)) for p in sorted(STUDIES_DIR.glob("*.yaml"))]


def _study_path(name_or_path: str) -> Path:
    path = resolve_yaml(name_or_path, STUDIES_DIR)
    if path is None:
        names = ", ".join(p.stem for p in sorted(STUDIES_DIR.glob("*.yaml")))
        raise UserError(f"unknown study '{name_or_path}' (not a file; built-in: {names})")
    return path


def study_text(name_or_path: str) -> str:
    """A study file's text as written (comments kept): what `autoprune studies --show` prints."""
    return _study_path(name_or_path).read_text(encoding="utf-8")


def load_study(name_or_path: str) -> Study:
    """Load a built-in study by name or a study file by path; errors name the file and key."""
    path = _study_path(name_or_path)
    d = yamlio.load(path, "study")
    return study_from_dict(d, str(path))


def study_from_dict(d: Any, source: str = "<dict>") -> Study:
    if not isinstance(d, dict):
        raise UserError(f"{source}: a study must be a mapping of keys to values")
    unknown = set(d) - _KEYS
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    for key in ("model", "dataset"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise UserError(f"{source}: '{key}' is required and must be a string")
    data = d.get("data") or {}
    if not isinstance(data, dict) or set(data) - _DATA_KEYS:
        raise UserError(f"{source}: 'data' must be a mapping with keys among "
                        f"{', '.join(sorted(_DATA_KEYS))}")
    recipes = {}
    for key in ("dense", "prune", "finetune"):
        r = d.get(key) or {}
        if not isinstance(r, dict):
            raise UserError(f"{source}: '{key}' must be a mapping (a training recipe)")
        try:
            recipes[key] = Recipe.from_dict(r)
        except (TypeError, UserError) as exc:
            raise UserError(f"{source}: '{key}': {exc}") from None
    streamed = is_streamed(d["dataset"])
    for key, r in recipes.items():
        if streamed and r.augment != "default":
            raise UserError(f"{source}: '{key}.augment' is for in-memory datasets; "
                            f"{d['dataset']} trains with its own random-resized crops")
    trials = d.get("trials", 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UserError(f"{source}: 'trials' must be a positive integer")
    vf = data.get("val_fraction", 0.1)
    if not isinstance(vf, (int, float)) or not 0 < vf < 1:
        raise UserError(f"{source}: 'data.val_fraction' must be in (0, 1)")
    sub = data.get("train_subset")
    if sub is not None and (not isinstance(sub, int) or sub < 1):
        raise UserError(f"{source}: 'data.train_subset' must be a positive integer")
    options = folder_options(data, source)
    name = d.get("name") or Path(source).stem
    return Study(name=str(name), model=d["model"], dataset=d["dataset"], dense=recipes["dense"],
                 prune=recipes["prune"], finetune=recipes["finetune"],
                 space=str(d.get("space", "default")), budget=str(d.get("budget", "flops=0.4")),
                 trials=trials, description=str(d.get("description", "")),
                 expects=str(d.get("expects", "")), val_fraction=float(vf), train_subset=sub,
                 data_options=options, source=source, raw=d)

