"""What a search is asked to do (`SearchOptions`), and the commands that repeat it.

Plain values only: the command line and the Python API fill a `SearchOptions`; the rest of the
orchestration reads it. `resume_hint` is the command that continues a search.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ..errors import UserError
from ..store import redact
from ..study import Study


@dataclass
class SearchOptions:
    study: str | Study = "digits-lenet"  # a name, a .yaml path, or a Study (e.g. Study.custom)
    space: str | None = None
    budget: str | None = None
    trials: int | None = None
    time_limit: float | None = None  # seconds
    workers: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    sampler: str = "tpe"
    # what the sampler optimises: "accuracy" within the budget, or the "front" of accuracy
    # against the budgeted sizes (`Budget.objectives`)
    objective: str = "accuracy"
    scheduler: str = "asha"  # stop weak trials early (scheduler.py); "none": run every trial out
    seed: int = 0
    out: str = "autoprune-runs"
    data_root: str | None = None
    ray_address: str | None = None
    tracking_uri: str | None = None
    optuna_storage: str | None = None
    tune_storage: str | None = None
    resume: bool = False
    dense_checkpoint: str | None = None
    max_failures: int = 1
    trial_workers: int = 1  # > 1: each trial data-parallel over N workers (distributed.py)
    baselines: bool = True  # a new search's first trials are the hand baselines (baselines.py)
    finalists: int = 3  # top front points retrained with the full fine-tune (finalists.py)
    final_epochs: int | None = None  # their fine-tune epochs (default: time-matched, finalists.py)
    extra: dict[str, Any] = field(default_factory=dict)


def parse_duration(text: str | None) -> float | None:
    """'30m', '2h', '90s', '45' (seconds) -> seconds."""
    if text is None:
        return None
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise UserError(f"--time-limit '{text}' is not a duration like 90s, 30m or 2h") from None
    if not value > 0:
        raise UserError(f"--time-limit must be positive, got '{text}'")
    return value


OBJECTIVES = ("accuracy", "front")  # `SearchOptions.objective`


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=5)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"unknown sampler '{name}'; choose tpe, nsga2 or random")


def resume_hint(opts: SearchOptions) -> str:
    """The command that continues this search (what an interrupted search prints)."""

    study = opts.study
    if isinstance(study, Study):
        if study.objects is not None or not Path(study.source).is_file():
            # made in Python: only the same call can bring the same study back
            return (f"call autoprune.search again with the same study, out={opts.out!r} and "
                    f"resume=True")
        study = study.source
    defaults = SearchOptions()
    parts = ["autoprune", "search", "--study", study, "--out", opts.out]
    # an open-ended search (a time limit, no trial count) resumes as one: another such window
    window = (f"{opts.time_limit:g}s" if opts.time_limit is not None and opts.trials is None
              else None)
    for flag, value in (("--space", opts.space), ("--budget", opts.budget),
                        ("--trials", opts.trials), ("--time-limit", window),
                        ("--ray-address", opts.ray_address),
                        *((f"--{k.replace('_', '-')}", getattr(opts, k))
                          for k in ("workers", "cpus_per_trial", "gpus_per_trial", "sampler",
                                    "objective", "scheduler", "seed", "max_failures",
                                    "trial_workers", "finalists", "final_epochs")
                          if getattr(opts, k) != getattr(defaults, k)),
                        ("--tracking-uri", opts.tracking_uri),
                        ("--optuna-storage", opts.optuna_storage and redact(opts.optuna_storage)),
                        ("--tune-storage", opts.tune_storage),
                        ("--data-root", opts.data_root)):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in [*parts, "--resume"])


def absolute(path: str | None) -> str | None:
    """Workers run elsewhere: they get absolute paths (URIs pass through)."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def study_ref(study: str | Study) -> str | None:
    """How `autoprune prune --study` can name this study, if it can."""
    if isinstance(study, str):
        return study
    if study.objects is None and Path(study.source).is_file():
        return study.source
    return None
