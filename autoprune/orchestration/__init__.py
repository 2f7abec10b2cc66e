"""The search's orchestration: spaces, projection, the Optuna searcher, Ray Tune and resume.

Named apart from `autoprune.search` (the API function) so the two never shadow each other.
"""
