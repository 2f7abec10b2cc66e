"""Pruning methods. Each module of this package defines one registered `Pruner`.

`load_all()` imports every module here, so a new method is one new file: nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import METHODS, MaskHook, Masks, Pruner, apply_masks, get_method, register

_INFRA = {"base", "compaction", "runner"}


def load_all() -> dict[str, type[Pruner]]:
    """Import every method module of this package (idempotent) and return the registry."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _INFRA and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return METHODS


__all__ = ["METHODS", "MaskHook", "Masks", "Pruner", "apply_masks", "get_method", "load_all",
           "register"]
