"""Which sampler settings find the better front in a short search? TPE variants against random.

    .venv/bin/python bench/sampler_settings.py [--study digits-lenet] [--budget flops=0.4]
        [--trials 24] [--seeds 0,1,2,3,4,5] [--configs tpe,random,tpe-g25,tpe-s14,tpe-s14-g25]
        [--out DIR]

Each arm is the default search (enqueued hand baselines, size-aware ASHA, 2 workers x 1 CPU)
with only the sampler changed, at the same trial count, without the finalist stage (it does not
change which points the trial stage found). Arms:
- `tpe`: autoprune's default (`options.make_sampler`: multivariate, group, 5 startup trials;
  Optuna's multi-objective gamma, ceil(0.1 n) trials in the "good" set);
- `random`: `RandomSampler`;
- `tpe-g25`: a wider good set, ceil(0.25 n);
- `tpe-s14`: 14 startup trials, i.e. 5 random ones after the 9 enqueued baselines;
- `tpe-s14-g25`: both.
The sampler is swapped at the orchestrator's `make_sampler` seam. Reports the hypervolume of
the in-budget trial points (reference: val 0, flops_frac 1, params_frac 1) and the best
point's test accuracy, mean ± sample sd and per seed. Equal trial counts, not equal time: each
arm's mean seconds are printed beside it. digits-lenet with 24 trials has the shape of the
Fashion-MNIST row (9 baselines, 15 sampled trials) at a minute per search.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import mean_sd, per_seed  # noqa: E402


def wide_gamma(n: int) -> int:
    """A good set of a quarter of the trials (module level: Ray pickles the searcher)."""
    return math.ceil(0.25 * n)


CONFIGS = {"tpe": None, "random": None, "tpe-g25": {"gamma": wide_gamma},
           "tpe-s14": {"n_startup_trials": 14},
           "tpe-s14-g25": {"n_startup_trials": 14, "gamma": wide_gamma}}


def sampler_factory(config: str):
    """A `make_sampler` replacement that builds `config`'s sampler."""
    import optuna

    from autoprune.orchestration.options import make_sampler

    def make(name: str, seed: int):
        if config in ("tpe", "random"):
            return make_sampler(config, seed)
        kw = {"n_startup_trials": 5, **CONFIGS[config]}
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, **kw)
    return make


def run(config: str, study: str, budget: str, trials: int, seed: int, out: Path,
        data_root: str | None) -> dict:
    import optuna

    import autoprune.orchestration.orchestrator as orchestrator
    from autoprune.orchestration import SearchOptions, search
    from autoprune.pareto import hypervolume
    from autoprune.store import trial_points

    orchestrator.make_sampler = sampler_factory(config)
    opts = SearchOptions(study=study, budget=budget, trials=trials, workers=2,
                         cpus_per_trial=1.0, seed=seed, out=str(out), finalists=0,
                         data_root=data_root)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        summary = search(opts)
    seconds = time.perf_counter() - t0
    name = summary["study"]
    ot = optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'optuna.db'}")
    feasible = [p for p in trial_points(ot) if p["feasible"]]
    best = summary["best"] or {}
    return {"config": config, "seed": seed, "hv": hypervolume(feasible),
            "test": best.get("test_accuracy"), "completed": summary["trials_completed"],
            "pruned": summary["trials_pruned"], "seconds": seconds}


def table(rows: list[dict], configs: list[str]) -> list[str]:
    lines = ["| sampler | HV mean ± sd | HV per seed | best test mean | completed per seed | "
             "s / search |", "|---|---|---|---:|---|---:|"]
    for c in configs:
        rs = [r for r in rows if r["config"] == c]
        if not rs:
            continue
        hv = [r["hv"] for r in rs]
        tests = [r["test"] for r in rs if r["test"] is not None]
        lines.append(f"| {c} | {mean_sd(hv, 3)} | {per_seed(hv)} | "
                     f"{statistics.mean(tests) if tests else float('nan'):.4f} | "
                     f"{' / '.join(str(r['completed']) for r in rs)} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="digits-lenet")
    ap.add_argument("--budget", default="flops=0.4")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--data-root", default=os.environ.get("AUTOPRUNE_DATA"))
    ap.add_argument("--out", default=None, help="default: autoprune-runs/bench-samplers-<time>")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out or f"autoprune-runs/bench-samplers-{int(time.time())}").resolve()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows: list[dict] = []
    for config in configs:
        for seed in seeds:
            r = run(config, args.study, args.budget, args.trials, seed,
                    root / f"{config}-s{seed}", args.data_root)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            (root / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"# Sampler settings: {args.study} {args.budget}, {args.trials} trials, seeds "
          f"{args.seeds}\n")
    print("\n".join(table(rows, configs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
