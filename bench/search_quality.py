"""Search quality at equal wall-clock: autoprune's search against random search, the uniform
hand baseline and the peer a user would pick instead.

    .venv/bin/python bench/search_quality.py [--quick] [--data-root DIR] [--seeds 0,1,2]
        [--studies digits-lenet,lenet5-mnist,fashion-lenet5] [--trials N] [--subset 10000]
        [--finalists 3] [--final-epochs N] [--arms tpe,random,uniform,peer] [--time-limit 14m]
        [--out DIR] [--update-docs] [--render RESULTS_JSON]

Rows (issue 12): digits flops=0.4 and params=0.05; LeNet-5/MNIST weights=0.01405 (the ADMM
paper's 71.2x) and weights=0.00281 (RADMM's 355.9x); Fashion-MNIST LeNet-5 flops=0.4. For every
row and seed, each arm starts from the same dense weights (trained once per seed, cached in
<out>/shared; a new --out may start with a copy of an earlier one's shared/):
(a) `search(sampler="tpe")`: autoprune's default search (enqueued hand baselines, ASHA, the
    finalist stage), the study's trial count; its wall-clock time W is every other arm's budget;
(a') with `--arms ...,front`: the same search with `objective="front"` (TPE on accuracy and
    the budgeted sizes, the default before the twelfth runs);
(b) `search(sampler="random")`: the same with random sampling (same trials and finalists; its
    own time is reported);
(c) uniform magnitude: the same pruning ratio in every layer (Torch-Pruning with
    `global_pruning=False` under flops=, `torch.nn.utils.prune.l1_unstructured` per layer
    otherwise), then fine-tuned for as many epochs as fit in W;
(d) the peer: Torch-Pruning global group L2 under flops=, `torch.nn.utils.prune.
    global_unstructured` L1 otherwise, fine-tuned for as many epochs as fit in W.
It reports the test accuracy of each arm's pick (a search's most accurate in-budget front point
by validation accuracy, finalists included) and the hypervolume of its in-budget points
(reference: val accuracy 0, flops_frac 1, params_frac 1), mean ± sample sd and per seed.

Time: the MNIST-family studies train on the first `--subset` training images (default 10,000;
0: all 54,000) so that the full run fits in hours, not days, on 2 cores; val and test sets are
the full ones, and the output says so. `--quick`: digits flops=0.4 only, one seed, 8 trials.
Raw results are saved to <out>/results.json after every run; `--render` prints (and with
`--update-docs` files) their table again. CPU only. `--arms` runs only some arms (the search
always: its W is the others' budget); `--time-limit` bounds each search's trial stage (the
papers' targets are "in <= 1 CPU-hour": `--subset 0 --time-limit 14m` keeps W near 30 min);
without `--trials` such a search starts trials until its time is up, as `autoprune search` does.
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
from report import mean_sd, per_seed  # noqa: E402

# Budgets per study: the flops=0.4 and a hard parameter budget. digits-lenet has only
# 13.7 k parameters: at params=0.02 (274 weights) every method is at chance, so its hard budget
# is params=0.05, where uniform magnitude pruning still learns something.
BUDGETS = {"digits-lenet": ("flops=0.4", "params=0.05"),
           "lenet5-mnist": ("weights=0.01405", "weights=0.00281"),
           "fashion-lenet5": ("flops=0.4",),
           "lenet300-mnist": ("flops=0.4", "params=0.02")}
SUBSET_STUDIES = ("lenet5-mnist", "fashion-lenet5", "lenet300-mnist")  # MNIST-sized data
# The papers' LeNet-5 results (test accuracy at a weights= budget) the search is held to.
PAPER_TARGETS = {("lenet5-mnist", "weights=0.01405"): (0.992, "ADMM, 71.2x"),
                 ("lenet5-mnist", "weights=0.00281"): (0.990, "RADMM, 355.9x")}
ARMS = ("tpe", "front", "random", "uniform", "peer")
DEFAULT_ARMS = ("tpe", "random", "uniform", "peer")
# search arms: (sampler, objective); "front" is TPE on accuracy and size (the default before
# the twelfth runs: `--objective front`)
SEARCH_ARMS = {"tpe": ("tpe", "accuracy"), "front": ("tpe", "front"),
               "random": ("random", "accuracy")}
ARM_LABEL = {"tpe": "autoprune search (TPE)", "front": "TPE, --objective front",
             "random": "random search",
             "uniform": "uniform magnitude + fine-tune for W",
             "peer": "peer + fine-tune for W"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def study_file(name: str, root: Path, subset: int, augment: str | None = None) -> Path:
    """The study to run: the built-in file, or a copy: for MNIST-sized data limited to `subset`
    training images, and with `augment` in place of the pruning and fine-tune recipes' own."""
    from autoprune.paths import STUDIES_DIR

    path = STUDIES_DIR / f"{name}.yaml"
    subset = subset if name in SUBSET_STUDIES else 0
    if subset <= 0 and augment is None:
        return path
    d = yaml.safe_load(path.read_text())
    if subset > 0:
        d["name"] = f"{name}-sub{subset // 1000}k"
        d.setdefault("data", {})["train_subset"] = subset
        d["description"] = (f"{d.get('description', '')} (bench copy: first {subset} training "
                            f"images)")
    if augment is not None:
        d["name"] = f"{d['name']}-aug-{augment}"
        for phase in ("prune", "finetune"):
            d.setdefault(phase, {})["augment"] = augment
    copy = root / "studies" / f"{d['name']}.yaml"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(yaml.safe_dump(d, sort_keys=False))
    return copy


def run_search(study_path: Path, study_name: str, budget: str, sampler: str, seed: int,
               trials: int | None, workers: int, out: Path, data_root: str | None,
               dense_ckpt: str, finalists: int, final_epochs: int | None,
               time_limit: float | None = None, objective: str = "accuracy") -> dict:
    """One search; returns its hypervolume, best in-budget pick and timing."""
    import optuna

    from autoprune.orchestration import SearchOptions, search
    from autoprune.pareto import hypervolume
    from autoprune.store import trial_points

    opts = SearchOptions(study=str(study_path), budget=budget, trials=trials, workers=workers,
                         cpus_per_trial=1.0, sampler=sampler, objective=objective,
                         seed=seed, out=str(out),
                         data_root=data_root, dense_checkpoint=dense_ckpt,
                         finalists=finalists, final_epochs=final_epochs,
                         time_limit=time_limit)
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
            "method": best["method"] if best else None,
            "flops": best.get("flops_frac") if best else None,
            "completed": summary["trials_completed"],
            "pruned": summary["trials_pruned"], "feasible": len(feasible),
            "failed": summary["trials_failed"], "killed": summary.get("trials_killed", 0),
            "seconds": elapsed,
            "best_trial": best["trial"] if best else None,
            "best_finalist": bool(best and best.get("finalist")),
            "best_search_test": best.get("search_test_accuracy") if best else None,
            "finalists": summary.get("finalists", [])}


def run_fixed(kind: str, wb, budget: str, seed: int, seconds: float) -> dict:
    """A hand arm ('uniform' or 'peer'), pruned once and fine-tuned for `seconds`."""
    import peers

    from autoprune.budget import Budget
    from autoprune.pareto import hypervolume

    b = Budget.parse(budget)
    arm = {("uniform", True): "tp-uniform-l2", ("uniform", False): "tnp-uniform-l1",
           ("peer", True): "tp-global-l2", ("peer", False): "tnp-global-l1"}[kind, b.structured]
    m = peers.run_arm(arm, wb, b.limits, seed, seconds)
    ok = b.satisfied({k: m[f"{k}_frac"] if f"{k}_frac" in m else m["flops_frac"]
                      for k in b.limits})
    return {"hv": hypervolume([m]) if ok else 0.0, "test": m["test_accuracy"] if ok else None,
            "val": m["val_accuracy"], "method": arm, "flops": m.get("flops_frac"),
            "completed": 1, "feasible": int(ok),
            "failed": 0, "seconds": m["seconds"], "epochs": m["finetune_epochs"]}


def render(res: dict) -> list[str]:
    """The markdown of a results record (what `main` saves as results.json)."""
    seeds, quick, workers = res["seeds"], res["quick"], res["workers"]
    quick_note = " (QUICK smoke run: 1 seed, 8 trials)" if quick else ""
    count = (f"{res['trials']} trials" if res.get("trials")
             else "trials until the time limit" if res.get("time_limit")
             else "the study's trial count")
    lines = [f"# Search quality at equal wall-clock{quick_note}",
             "",
             f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}). Searches: {count}, "
             f"{workers} workers x 1 CPU, sampler seeded with the seed, then the finalist "
             f"stage; their wall-clock time W (finalists included) is what the uniform and peer "
             f"arms get: one pruning, then as many fine-tune epochs as fit in W. Test acc: test "
             f"accuracy of the arm's pick (a search's most accurate in-budget front point by "
             f"validation accuracy). HV: hypervolume of the in-budget points, reference (val 0, "
             f"flops_frac 1, params_frac 1). Kept FLOPs: the pick's MACs after compaction over the "
             f"dense model's (what runs on dense hardware; 1.000 for unstructured sparsity). "
             f"Values: mean ± sample sd over seeds, then per seed. CPU only.", ""]
    lines += ["| study | budget | arm | test acc | test acc per seed | HV | HV per seed | "
              "s / run | fine-tune epochs | kept FLOPs of the pick (compacted) |",
              "|---|---|---|---:|---|---:|---|---:|---|---|"]
    verdicts = []
    for case in res["cases"]:
        sname, budget, row = case["study"], case["budget"], case["arms"]
        arms = [a for a in ARMS if a in res.get("arms", DEFAULT_ARMS)]
        k = min(len(row[a]) for a in arms)
        if k == 0:
            continue  # an interrupted run: this case has no complete set of arms
        # HV is over (val, compacted flops, params): a weight-level model keeps flops_frac 1.0,
        # so under params=/weights= budgets HV says only whether filter trials were found
        hv_ok = "flops" in budget.replace("sparse_flops", "")
        for arm in arms:
            rs = row[arm][:k]
            secs = statistics.mean(r["seconds"] for r in rs)
            label = ARM_LABEL[arm] + (f" ({rs[0]['method']})" if arm in ("uniform", "peer")
                                      else "")
            epochs = " / ".join(f"{r['epochs']:g}" for r in rs) if "epochs" in rs[0] else "-"
            lines.append(f"| {sname} | {budget} | {label} | {mean_sd([r['test'] for r in rs])} "
                         f"| {per_seed([r['test'] for r in rs])} | "
                         + (f"{mean_sd([r['hv'] for r in rs])} | "
                            f"{per_seed([r['hv'] for r in rs])} " if hv_ok else "- | - ")
                         + f"| {secs:.0f} | {epochs} | {per_seed([r.get('flops') for r in rs])} |")
        acc = {a: statistics.mean(r["test"] if r["test"] is not None else 0.0
                                  for r in row[a][:k]) for a in arms}
        parts = []
        for other in arms[1:]:
            wins = sum((t["test"] or 0) > (o["test"] or 0)
                       for t, o in zip(row["tpe"][:k], row[other][:k], strict=True))
            beaten = "beaten" if acc["tpe"] > acc[other] else "NOT beaten"
            parts.append(f"{other} {acc[other]:.4f} ({beaten}, {wins}/{k} seeds)")
        hv_t = statistics.mean(r["hv"] for r in row["tpe"][:k])
        hv_r = statistics.mean(r["hv"] for r in row["random"][:k]) if "random" in arms else None
        verdicts.append(f"- {sname} {budget}: search {acc['tpe']:.4f} vs " + "; ".join(parts)
                        + (f"; HV search {hv_t:.4f} vs random {hv_r:.4f}"
                           if hv_ok and hv_r is not None else ""))
        picks = [f"trial {r['best_trial']} {r['method']}"
                 + (f" (finalist; {r['best_search_test']:.4f} at search time)"
                    if r.get("best_finalist") and r.get("best_search_test") is not None else "")
                 for r in row["tpe"][:k]]
        verdicts.append(f"  search picks per seed: {'; '.join(picks)}")
        target = PAPER_TARGETS.get((case.get("base", ""), budget))
        if target:
            mins = statistics.mean(r["seconds"] for r in row["tpe"][:k]) / 60
            ok = acc["tpe"] >= target[0] and mins <= 60
            verdicts.append(f"  paper target {target[0]:.1%} ({target[1]}) in <= 60 min: "
                            f"{'met' if ok else 'NOT met'} (search {acc['tpe']:.2%} in "
                            f"{mins:.0f} min)")
    lines += ["", "Targets: the search beats every other arm on every row (on the means); "
              "LeNet-5 rows: the papers' accuracy in <= 1 CPU-hour.", *verdicts]
    lines += ["", "Notes:", *[f"- {n}" for n in res["notes"]]]
    lines += ["", f"Total time {res['seconds'] / 60:.1f} min. Load average (1/5/15 min) at start "
              f"{res['load_start']}, at end {res['load_end']} (2-core machine shared with other "
              f"jobs).", f"machine: {res['machine']}"]
    return lines


def publish(res: dict, update_docs: bool) -> None:
    lines = render(res)
    print("\n".join(lines))
    if update_docs:
        body = "\n".join(line for line in lines[1:] if not line.startswith("machine:"))
        report.update_section("search_quality", "Search quality at equal wall-clock: search "
                              "vs random vs uniform vs peer", body,
                              command=res["command"], when=res["date"],
                              machine_line=res["machine"],
                              load_line=f"{res['load_start']} at start, "
                                        f"{res['load_end']} at end")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=os.environ.get("AUTOPRUNE_DATA"))
    ap.add_argument("--studies", default="digits-lenet,lenet5-mnist,fashion-lenet5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, help="trials per search (default: each study's own "
                                                 "count)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--subset", type=int, default=10_000,
                    help="training images of the MNIST-sized studies (0: all)")
    ap.add_argument("--finalists", type=int, default=3, help="finalists per search")
    ap.add_argument("--final-epochs", type=int, default=None,
                    help="finalists' fine-tune epochs (default: the search's, 3x the study's)")
    ap.add_argument("--out", default=None, help="default: autoprune-runs/bench-search-quality-"
                                                "<time>")
    ap.add_argument("--quick", action="store_true",
                    help="digits flops=0.4 only, 1 seed, 8 trials")
    ap.add_argument("--budgets", default=None,
                    help="only these budgets of the studies (comma-separated, e.g. flops=0.4)")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                    help="arms to run: tpe (always: the others get its wall-clock), front "
                         "(TPE with --objective front), random, uniform, peer (default: all "
                         "but front)")
    ap.add_argument("--time-limit", default=None,
                    help="each search's --time-limit (e.g. 13m): its trial stage stops "
                         "starting trials then; the finalist stage follows")
    ap.add_argument("--augment", default=None, choices=("none", "shift", "crop-flip"),
                    help="the augmentation of every arm's pruning and fine-tuning, in place of "
                         "the study's own (the dense model keeps the study's)")
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
    arms = [a for a in ARMS if a in args.arms.split(",")]
    if "tpe" not in arms or len(arms) != len(set(filter(None, args.arms.split(",")))):
        ap.error(f"--arms: a comma-separated subset of {', '.join(ARMS)} that includes tpe")
    from autoprune.errors import UserError
    from autoprune.orchestration.options import parse_duration

    try:
        time_limit = parse_duration(args.time_limit)
    except UserError as exc:
        ap.error(str(exc))
    root = Path(args.out or f"autoprune-runs/bench-search-quality-{int(time.time())}").resolve()
    # shared/ is only the dense models' cache (keyed by study and seed): copied from an earlier
    # run, it spares retraining them; anything else would be a study folder reused
    if root.exists() and any(p.name != "shared" for p in root.iterdir()):
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
           "arms": arms, "time_limit": time_limit, "trials": args.trials,
           "cases": [], "command": report.command_line(), "machine": report.machine(),
           "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_start": report.load(),
           "load_end": None, "seconds": 0.0}
    if time_limit:
        res["notes"].append(f"Each search ran with --time-limit {args.time_limit}: its trial stage "
                            f"started no trial after that"
                            f"{'' if args.trials else ' and started trials until then'}; "
                            f"the finalist stage followed it.")
    if set(arms) != set(DEFAULT_ARMS):
        missing = [ARM_LABEL[a] for a in DEFAULT_ARMS if a not in arms]
        res["notes"].append(f"Arms run: {', '.join(ARM_LABEL[a] for a in arms)} (--arms)"
                            + (f"; not run: {', '.join(missing)}." if missing else "."))
    saved = root / "results.json"
    t_start = time.perf_counter()

    def save() -> None:
        res["seconds"] = time.perf_counter() - t_start
        res["load_end"] = report.load()
        saved.write_text(json.dumps(res, indent=1))

    for name in studies:
        path = study_file(name, root, args.subset, args.augment)
        st = load_study(str(path))
        if args.augment is not None:
            res["notes"].append(f"{name} runs as `{st.name}`: every arm prunes and fine-tunes "
                                f"with augment: {args.augment}.")
        if st.train_subset:
            res["notes"].append(
                f"{name} runs as `{st.name}`: a copy of the study that trains (dense, pruning "
                f"and fine-tuning) on the first {st.train_subset:,} training images only, to "
                f"fit the time; val and test sets are the full ones.")
        # a time limit with no --trials: each search runs until its time is up
        n = args.trials or (None if time_limit else st.trials)
        wanted = BUDGETS[name] if not args.budgets else [
            b for b in BUDGETS[name] if b in args.budgets.split(",")]
        if args.quick:
            wanted = wanted[:1]
        cases = {b: {"study": st.name, "base": name, "budget": b,
                     "arms": {a: [] for a in ARMS}} for b in wanted}
        res["cases"] += list(cases.values())
        for seed in seeds:
            wb = Workbench.open(st, root / "shared", data_root=args.data_root, seed=seed,
                                log=_log)
            ckpt = wb.dense["path"]
            _log(f"{st.name} seed {seed}: dense test {wb.dense['test_accuracy']:.4f}")
            for budget, case in cases.items():
                row = case["arms"]
                slug = budget.replace("=", "").replace(",", "-")
                for arm in [a for a in SEARCH_ARMS if a in arms]:
                    sampler, objective = SEARCH_ARMS[arm]
                    out = root / f"{st.name}-{slug}-{arm}-s{seed}"
                    r = run_search(path, st.name, budget, sampler, seed, n, args.workers, out,
                                   args.data_root, ckpt, args.finalists, args.final_epochs,
                                   time_limit, objective)
                    r["trials"] = (r["completed"] + r["pruned"] + r["failed"]
                                   + r.get("killed", 0))
                    row[arm].append(r)
                    save()
                    _log(f"  {budget} {arm} seed {seed}: HV {r['hv']:.4f}, best test "
                         f"{r['test']} ({r['method']}), {r['seconds']:.0f} s "
                         f"[{time.perf_counter() - t_start:.0f} s total]")
                wall = row["tpe"][-1]["seconds"]  # every hand arm gets the search's time
                for kind in [a for a in ("uniform", "peer") if a in arms]:
                    r = run_fixed(kind, wb, budget, seed, wall)
                    r["trials"] = 1
                    row[kind].append(r)
                    save()
                    _log(f"  {budget} {kind} {r['method']} seed {seed}: test {r['test']} after "
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
