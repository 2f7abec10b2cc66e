"""autoprune: AutoML search over neural-network pruning (Ray Tune + Optuna + MLflow)."""

__version__ = "0.1.0"


def search(*args, **kwargs):
    """`autoprune.search(study, budget=..., trials=...)`: see `autoprune.api.search`."""
    from .api import search as _search

    return _search(*args, **kwargs)


def prune(*args, **kwargs):
    """`autoprune.prune(study, method, budget, params=...)`: see `autoprune.api.prune`."""
    from .api import prune as _prune

    return _prune(*args, **kwargs)
