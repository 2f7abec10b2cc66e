"""Search: spaces, projection, Optuna searcher, Ray orchestration."""
