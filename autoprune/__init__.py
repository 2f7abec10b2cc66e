"""autoprune: AutoML search over neural-network pruning (Ray Tune + Optuna + MLflow)."""

__version__ = "0.1.0"
