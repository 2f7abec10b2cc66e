"""autoprune: AutoML search over neural-network pruning (Ray Tune + Optuna + MLflow).

The Python API: `autoprune.search(study, ...)`, `autoprune.prune(study, method, budget, ...)`,
`autoprune.export(out, study, to)`, `autoprune.report(out)` (a pandas DataFrame),
and for the user's own model and data `autoprune.Study.custom(...)` with
`autoprune.data.from_tensors(...)` (see README, "Python API"). Everything heavier than this file
(torch, Ray) is imported on first use, so `autoprune --help` stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> (submodule, attribute) resolved on first access
_LAZY = {"Study": ("study", "Study"), "TensorData": ("data", "TensorData"),
         "from_tensors": ("data", "from_tensors"), "UserError": ("errors", "UserError")}
_SUBMODULES = {"api", "data", "errors", "export", "models", "study"}


def search(*args, **kwargs):
    """`autoprune.search(study, budget=..., trials=...)`: see `autoprune.api.search`."""
    from .api import search as _search

    return _search(*args, **kwargs)


def prune(*args, **kwargs):
    """`autoprune.prune(study, method, budget, params=...)`: see `autoprune.api.prune`."""
    from .api import prune as _prune

    return _prune(*args, **kwargs)


def report(*args, **kwargs):
    """`autoprune.report(out)`: the trials of the latest search as a pandas DataFrame; see
    `autoprune.api.report`. (`autoprune.export(out, study, to)` is the callable subpackage
    autoprune.export: see `autoprune.api.export`.)"""
    from .api import report as _report

    return _report(*args, **kwargs)


def __getattr__(name: str) -> Any:
    """`autoprune.Study`, `autoprune.data.from_tensors`, ... without importing torch up front."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
