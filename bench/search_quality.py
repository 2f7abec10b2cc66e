"""Search quality: autoprune's TPE search against random search and a hand-picked baseline.

    .venv/bin/python bench/search_quality.py [--quick] [--data-root DIR] [--seeds 0,1,2]
        [--studies digits-lenet,lenet300-mnist] [--trials N] [--lenet300-subset 10000]
        [--out DIR] [--update-docs] [--render OUT/results.json]

For every study, budget and seed, with the same trial count (the study's own: 16 for
digits-lenet, 24 for lenet300-mnist), workers and seed:
(a) `search(sampler="tpe")`, autoprune's default search over autoprune/search_spaces/default.yaml;
(b) `search(sampler="random")` over the same space;
(c) the baseline a user would pick by hand: one-shot magnitude pruning with the study's
    fine-tuning, the *same* sparsity in every layer (`targets_for_budget` with a uniform
    allocation: one global shift, so all layers get one value, the least that meets the budget),
    run through `api.prune`.
It reports the hypervolume of each search's in-budget front (reference point: val accuracy 0,
flops_frac 1, params_frac 1; `autoprune.pareto.hypervolume`) and the **test** accuracy of the
in-budget trial with the best *validation* accuracy (what a user would pick), as mean and sample
standard deviation over the seeds. Each seed trains its own dense model (cached in <out>/shared
and handed to all three arms as the dense checkpoint), so every arm prunes the same weights.

Time: LeNet-300-100 trains on the first 10,000 MNIST training images by default (a study file
copy with `data.train_subset`; `--lenet300-subset 0` for all 54,000), so that the full run fits
in about 30 minutes on 2 cores; the output says so. `--quick` runs digits only, one seed, eight
trials per search (about 3 minutes). Raw results are saved to <out>/results.json after every
run; `--render` prints (and with `--update-docs` files) their table again. CPU only: GPU rows
are out of scope here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

# Budgets per study: the flops=0.4 and a hard parameter budget. digits-lenet has only
# 13.7 k parameters: at params=0.02 (274 weights) every method is at chance, so its hard budget
# is params=0.05, where uniform magnitude pruning still learns something.
BUDGETS = {"digits-lenet": ("flops=0.4", "params=0.05"),
           "lenet300-mnist": ("flops=0.4", "params=0.02")}
ARMS = ("tpe", "random", "uniform", "peer")
ARM_LABEL = {"tpe": "autoprune (TPE)", "random": "random search",
             "uniform": "uniform magnitude (hand baseline)",
             "peer": "peer at equal wall-clock (Torch-Pruning global L2 under flops=, "
                     "torch.nn.utils.prune global L1 otherwise)"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def study_file(name: str, root: Path, subset: int) -> Path:
    """The study to run: the built-in file, or for lenet300 a copy limited to `subset` images."""
    from autoprune.paths import STUDIES_DIR

    path = STUDIES_DIR / f"{name}.yaml"
    if name != "lenet300-mnist" or subset <= 0:
        return path
    d = yaml.safe_load(path.read_text())
    d["name"] = f"{name}-sub{subset // 1000}k"
    d.setdefault("data", {})["train_subset"] = subset
    d["description"] = f"{d.get('description', '')} (bench copy: first {subset} training images)"
    copy = root / "studies" / f"{d['name']}.yaml"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(yaml.safe_dump(d, sort_keys=False))
    return copy


def run_search(study_path: Path, study_name: str, budget: str, sampler: str, seed: int,
               trials: int, workers: int, out: Path, data_root: str | None,
               dense_ckpt: str) -> dict:
    """One search; returns its hypervolume, best in-budget pick and timing."""
    import optuna

    from autoprune.orchestration import SearchOptions, search
    from autoprune.pareto import hypervolume
    from autoprune.store import trial_points

    opts = SearchOptions(study=str(study_path), budget=budget, trials=trials, workers=workers,
                         cpus_per_trial=1.0, sampler=sampler, seed=seed, out=str(out),
                         data_root=data_root, dense_checkpoint=dense_ckpt)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Ray Tune's banners; stdout is the table
        summary = search(opts)
    elapsed = time.perf_counter() - t0
    ot = optuna.load_study(study_name=study_name,
                           storage=f"sqlite:///{out / study_name / 'optuna.db'}")
    feasible = [p for p in trial_points(ot) if p["feasible"]]
    best = summary["best"]
    return {"hv": hypervolume(feasible), "test": best["test_accuracy"] if best else None,
            "val": best["val_accuracy"] if best else None,
            "method": best["method"] if best else None, "completed": summary["trials_completed"],
            "feasible": len(feasible), "failed": summary["trials_failed"], "seconds": elapsed}


def run_uniform(study, wb, budget: str, seed: int, out: Path, data_root: str | None,
                dense_ckpt: str) -> dict:
    """Uniform one-shot magnitude pruning at the budget, through the public API."""
    from autoprune import api
    from autoprune.budget import Budget
    from autoprune.pareto import hypervolume

    b = Budget.parse(budget)
    gran = "filter" if b.structured else "weight"  # only filters lower the compacted FLOPs
    targets = api.targets_for_budget(wb, gran, b, allocation=dict.fromkeys(
        wb.accountant.graph.filter_units() if gran == "filter" else wb.layers, 0.5))
    spec = ",".join(f"{k}={v!r}" for k, v in targets.items())  # repr: exact round trip
    t0 = time.perf_counter()
    m = api.prune(study, "magnitude", budget, layer_sparsity=spec, out=out, data_root=data_root,
                  seed=seed, checkpoint=dense_ckpt, params={"granularity": gran})
    elapsed = time.perf_counter() - t0
    ok = bool(m["within_budget"])
    return {"hv": hypervolume([m]) if ok else 0.0, "test": m["test_accuracy"] if ok else None,
            "val": m["val_accuracy"], "method": "magnitude", "completed": 1,
            "feasible": int(ok), "failed": 0, "seconds": elapsed,
            "sparsity": next(iter(targets.values()))}


def run_peer(wb, budget: str, seed: int, seconds: float) -> dict:
    """The peer a user picks instead, pruned once and fine-tuned for `seconds` (equal compute)."""
    import peers

    from autoprune.budget import Budget
    from autoprune.pareto import hypervolume

    b = Budget.parse(budget)
    arm = "tp-global-l2" if b.structured else "tnp-global-l1"
    m = peers.run_arm(arm, wb, b.limits, seed, seconds)
    ok = b.satisfied({k: m[f"{k}_frac"] if f"{k}_frac" in m else m["flops_frac"]
                      for k in b.limits})
    return {"hv": hypervolume([m]) if ok else 0.0, "test": m["test_accuracy"] if ok else None,
            "val": m["val_accuracy"], "method": arm, "completed": 1, "feasible": int(ok),
            "failed": 0, "seconds": m["seconds"], "epochs": m["finetune_epochs"]}


def mean_sd(values: list[float | None], digits: int = 4) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def per_seed(values: list[float | None], digits: int = 3) -> str:
    return " / ".join("-" if v is None else f"{v:.{digits}f}" for v in values)


def render(res: dict) -> list[str]:
    """The markdown of a results record (what `main` saves as results.json)."""
    seeds, quick, workers = res["seeds"], res["quick"], res["workers"]
    lines = [f"# Search quality{' (QUICK smoke run: 1 seed, few trials)' if quick else ''}",
             "",
             f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); per search: the same trial "
             f"count, {workers} workers x 1 CPU, sampler seeded with the seed. HV: "
             f"hypervolume of the in-budget trials, reference point (val accuracy 0, "
             f"flops_frac 1, params_frac 1), higher is better. Test acc: test accuracy of the "
             f"in-budget trial with the best validation accuracy. Values: mean ± sample sd over "
             f"seeds, then per seed. The uniform baseline is a single model, its HV is that of "
             f"one point. CPU only (no GPU on this machine: GPU rows out of scope).", ""]
    lines += ["| study | budget | arm | trials | HV | HV per seed | test acc | test acc per "
              "seed | s / run |",
              "|---|---|---|---:|---:|---|---:|---|---:|"]
    verdicts = []
    for case in res["cases"]:
        sname, budget, row = case["study"], case["budget"], case["arms"]
        if any(not row[a] for a in ARMS):
            continue  # an interrupted run: this case has no complete set of arms
        for arm in ARMS:
            rs = row[arm]
            secs = statistics.mean(r["seconds"] for r in rs)
            lines.append(f"| {sname} | {budget} | {ARM_LABEL[arm]} | {rs[0]['trials']} | "
                         f"{mean_sd([r['hv'] for r in rs])} | {per_seed([r['hv'] for r in rs])} "
                         f"| {mean_sd([r['test'] for r in rs])} | "
                         f"{per_seed([r['test'] for r in rs])} | {secs:.0f} |")
        k = min(len(row[a]) for a in ARMS)
        hv = {a: statistics.mean(r["hv"] for r in row[a][:k]) for a in ARMS}
        acc = {a: statistics.mean(r["test"] if r["test"] is not None else 0.0
                                  for r in row[a][:k]) for a in ARMS}
        wins_hv = sum(t["hv"] > r["hv"] for t, r in zip(row["tpe"][:k], row["random"][:k],
                                                         strict=True))
        wins_acc = sum((t["test"] or 0) > (u["test"] or 0)
                       for t, u in zip(row["tpe"][:k], row["uniform"][:k], strict=True))
        wins_peer = sum((t["test"] or 0) > (u["test"] or 0)
                        for t, u in zip(row["tpe"][:k], row["peer"][:k], strict=True))
        verdicts.append(
            f"- {sname} {budget}: test acc TPE {acc['tpe']:.4f} vs peer at equal wall-clock "
            f"{acc['peer']:.4f} ({'met' if acc['tpe'] > acc['peer'] else 'NOT met'}; "
            f"{wins_peer}/{k} seeds)")
        verdicts.append(
            f"- {sname} {budget}: HV TPE {hv['tpe']:.4f} vs random {hv['random']:.4f} "
            f"({'met' if hv['tpe'] > hv['random'] else 'NOT met'}; TPE higher on {wins_hv}/{k} "
            f"seeds); test acc TPE {acc['tpe']:.4f} vs uniform {acc['uniform']:.4f} "
            f"({'met' if acc['tpe'] > acc['uniform'] else 'NOT met'}; {wins_acc}/{k} seeds)")
    lines += ["", "Targets (TPE best in-budget test accuracy > the peer's at equal wall-clock and "
              "> the uniform baseline's; TPE hypervolume > random's), on the means:", *verdicts]
    notes = [*res["notes"],
             "TPE's first 5 trials are its random start-up (`n_startup_trials=5` in "
             "orchestrator.make_sampler), the same trials random search draws with the same "
             "seed: the arms differ only from trial 6 on."]
    lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    lines += ["", f"Total time {res['seconds'] / 60:.1f} min. Load average (1/5/15 min) at start "
              f"{res['load_start']}, at end {res['load_end']} (2-core machine shared with other "
              f"jobs).", f"machine: {res['machine']}"]
    return lines


def publish(res: dict, update_docs: bool) -> None:
    lines = render(res)
    print("\n".join(lines))
    if update_docs:
        body = "\n".join(line for line in lines[1:] if not line.startswith("machine:"))
        report.update_section("search_quality", "Search quality: TPE vs random vs uniform "
                              "magnitude", body, command=res["command"], when=res["date"],
                              machine_line=res["machine"],
                              load_line=f"{res['load_start']} at start, {res['load_end']} at end")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=os.environ.get("AUTOPRUNE_DATA"))
    ap.add_argument("--studies", default="digits-lenet,lenet300-mnist")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, help="trials per search (default: each study's own "
                                                 "count, 16 digits, 24 lenet300)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lenet300-subset", type=int, default=10_000,
                    help="training images for lenet300-mnist (0: all)")
    ap.add_argument("--out", default=None, help="default: autoprune-runs/bench-search-quality-"
                                                "<time>")
    ap.add_argument("--quick", action="store_true", help="digits only, 1 seed, 8 trials")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="only print (and with --update-docs file) the table of a saved run")
    ap.add_argument("--update-docs", action="store_true",
                    help="write the table into docs/benchmarks.md (section search_quality)")
    args = ap.parse_args()
    if args.render:
        publish(json.loads(Path(args.render).read_text()), args.update_docs)
        return 0
    if args.quick:
        args.studies, args.seeds = "digits-lenet", "0"
        args.trials = args.trials or 8
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = [s for s in studies if s not in BUDGETS]
    if unknown:
        ap.error(f"--studies: no budgets defined for {', '.join(unknown)} "
                 f"(known: {', '.join(BUDGETS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out or f"autoprune-runs/bench-search-quality-{int(time.time())}").resolve()
    if root.exists() and any(root.iterdir()):
        ap.error(f"--out {root} is not empty: a search refuses to reuse a study folder")
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from autoprune.pipeline import Workbench
    from autoprune.study import load_study

    # Everything the table needs, saved after every run: a crash or Ctrl-C loses nothing, and
    # `--render <out>/results.json` prints (or files) what was measured.
    res = {"quick": args.quick, "seeds": seeds, "workers": args.workers, "notes": [],
           "cases": [], "command": report.command_line(), "machine": report.machine(),
           "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_start": report.load(),
           "load_end": None, "seconds": 0.0}
    saved = root / "results.json"
    t_start = time.perf_counter()

    def save() -> None:
        res["seconds"] = time.perf_counter() - t_start
        res["load_end"] = report.load()
        saved.write_text(json.dumps(res, indent=1))

    for name in studies:
        path = study_file(name, root, args.lenet300_subset)
        st = load_study(str(path))
        if st.train_subset:
            res["notes"].append(
                f"{name} runs as `{st.name}`: a copy of the study that trains (dense, pruning "
                f"and fine-tuning) on the first {st.train_subset:,} training images only, to "
                f"fit the time; val and test sets are the full ones.")
        n = args.trials or st.trials
        cases = {b: {"study": st.name, "budget": b, "arms": {a: [] for a in ARMS}}
                 for b in BUDGETS[name]}
        res["cases"] += list(cases.values())
        for seed in seeds:
            wb = Workbench.open(st, root / "shared", data_root=args.data_root, seed=seed,
                                log=_log)
            ckpt = wb.dense["path"]
            _log(f"{st.name} seed {seed}: dense test {wb.dense['test_accuracy']:.4f}")
            for budget, case in cases.items():
                row = case["arms"]
                slug = budget.replace("=", "").replace(",", "-")
                for sampler in ("tpe", "random"):
                    out = root / f"{st.name}-{slug}-{sampler}-s{seed}"
                    r = run_search(path, st.name, budget, sampler, seed, n, args.workers, out,
                                   args.data_root, ckpt)
                    r["trials"] = n
                    row[sampler].append(r)
                    save()
                    _log(f"  {budget} {sampler} seed {seed}: HV {r['hv']:.4f}, best test "
                         f"{r['test']} ({r['method']}), {r['seconds']:.0f} s "
                         f"[{time.perf_counter() - t_start:.0f} s total]")
                r = run_uniform(st, wb, budget, seed, root / "shared", args.data_root, ckpt)
                r["trials"] = 1
                row["uniform"].append(r)
                save()
                _log(f"  {budget} uniform (sparsity {r['sparsity']:.4f}) seed {seed}: test "
                     f"{r['test']}, {r['seconds']:.0f} s")
                r = run_peer(wb, budget, seed, row["tpe"][-1]["seconds"])
                r["trials"] = 1
                row["peer"].append(r)
                save()
                _log(f"  {budget} peer {r['method']} seed {seed}: test {r['test']} after "
                     f"{r['epochs']:g} fine-tune epochs, {r['seconds']:.0f} s")
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()
    save()
    _log(f"raw results: {saved}")
    publish(res, args.update_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
