"""Study definitions (`studies/*.yaml`): model, data, recipes, search space, default budget.

A study is everything that stays fixed while a search varies the pruning: which model on which
data, how the dense baseline is trained, how each method's phase and the fine-tuning train, the
search space and the budget and trial count a plain `autoprune search` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import yamlio
from .engine import Recipe
from .errors import UserError
from .paths import STUDIES_DIR, resolve_yaml

_KEYS = {"name", "description", "expects", "model", "dataset", "data", "dense", "prune",
         "finetune", "space", "budget", "trials", "allocation"}
_DATA_KEYS = {"val_fraction", "train_subset", "download"}


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
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def key_config(self) -> dict[str, Any]:
        """What determines the dense baseline (its cache key)."""
        return {"model": self.model, "dataset": self.dataset, "val_fraction": self.val_fraction,
                "train_subset": self.train_subset, "dense": self.dense.to_dict()}


def list_studies() -> list[Study]:
    return [load_study(str(p)) for p in sorted(STUDIES_DIR.glob("*.yaml"))]


def load_study(name_or_path: str) -> Study:
    """Load a built-in study by name or a study file by path; errors name the file and key."""
    path = resolve_yaml(name_or_path, STUDIES_DIR)
    if path is None:
        names = ", ".join(p.stem for p in sorted(STUDIES_DIR.glob("*.yaml")))
        raise UserError(f"unknown study '{name_or_path}' (not a file; built-in: {names})")
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
    trials = d.get("trials", 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UserError(f"{source}: 'trials' must be a positive integer")
    vf = data.get("val_fraction", 0.1)
    if not isinstance(vf, (int, float)) or not 0 < vf < 1:
        raise UserError(f"{source}: 'data.val_fraction' must be in (0, 1)")
    sub = data.get("train_subset")
    if sub is not None and (not isinstance(sub, int) or sub < 1):
        raise UserError(f"{source}: 'data.train_subset' must be a positive integer")
    name = d.get("name") or Path(source).stem
    return Study(name=str(name), model=d["model"], dataset=d["dataset"], dense=recipes["dense"],
                 prune=recipes["prune"], finetune=recipes["finetune"],
                 space=str(d.get("space", "default")), budget=str(d.get("budget", "flops=0.4")),
                 trials=trials, description=str(d.get("description", "")),
                 expects=str(d.get("expects", "")), val_fraction=float(vf), train_subset=sub,
                 source=source, raw=d)
