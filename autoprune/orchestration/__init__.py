"""The search's orchestration: spaces, projection, the Optuna searcher, Ray Tune and resume.

Named apart from `autoprune.search` (the API function) so the two never shadow each other.
Callers outside this package use only what is named here (`search`, `SearchOptions`,
`parse_duration`, `resume_hint`), never the modules behind them; they are imported on first use,
so `autoprune.orchestration.space` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"search": "orchestrator", "SearchOptions": "options", "parse_duration": "options",
           "resume_hint": "options"}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_PUBLIC)
