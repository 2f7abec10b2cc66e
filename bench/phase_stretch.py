"""Does a slower pruning ramp pay at equal epochs? The finalist stretch, measured on its own.

    .venv/bin/python bench/phase_stretch.py [--study lenet5-mnist]
        [--budgets weights=0.00281,weights=0.01405] [--epochs 18] [--ramps 2,8]
        [--augment study] [--strengths 0.5] [--seeds 0,1,2] [--jobs 2] [--data-root DIR]
        [--out DIR] [--quick]

A finalist of an AGP trial (gradual magnitude pruning: a ramp of R epochs, then fine-tuning)
now shares its epochs between ramp and fine-tune as its trial did (`finalists.stretch`), where it
used to keep the trial's short ramp and put every extra epoch into the fine-tune. This script
compares the two at exactly the same number of epochs, without a search around them: each arm is
`autoprune prune --method magnitude --set gradual=true --set epochs=R --finetune epochs=E-R`
with the default (size-prior) split of the budget, as the search's enqueued AGP baseline has it.
R = 0 is one-shot magnitude pruning followed by E fine-tune epochs. `--augment none,shift`
adds a second axis, the batch augmentation of both phases (the recipes' `augment`; `study`
keeps the study's own): is the fine-tune recipe, not the schedule, what limits a ratio?
`--strengths 0.5,1.0` adds a third, the strength of the size prior that splits the budget over
the layers (`sparsity.prior_strength`; 0.5 is the default split, larger spares small layers).

Every run of a seed starts from that seed's dense model (trained once, cached in OUT) and uses
the seed for its own training too, so the spread covers both. Equal epochs means equal compute
here (an epoch costs the same in either phase); each arm's mean seconds are printed beside it.
Runs go `--jobs` at a time, one thread each. Prints one table per budget: test accuracy mean ±
sample sd and per seed, and the validation accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import mean_sd, per_seed  # noqa: E402


def _quiet_worker() -> None:
    """One thread per run: `--jobs` runs then share the cores without oversubscribing them."""
    import torch

    torch.set_num_threads(1)


def dense(study: str, seed: int, out: str, data_root: str | None) -> dict:
    """Train (or load from the cache) the dense model of `seed`; its record."""
    from autoprune.pipeline import Workbench
    from autoprune.study import load_study

    wb = Workbench.open(load_study(study), out, data_root=data_root, seed=seed)
    return {"seed": seed, "val": wb.dense["val_accuracy"], "test": wb.dense["test_accuracy"]}


def split(st, budget: str, seed: int, out: str, data_root: str | None,
          strength: float) -> str | None:
    """`--layer-sparsity` of the size-prior split at `strength`; None for the default one."""
    from autoprune.api import targets_for_budget
    from autoprune.budget import Budget
    from autoprune.orchestration.projection import PRIOR_STRENGTH, CostTable, size_prior
    from autoprune.pipeline import Workbench

    if strength == PRIOR_STRENGTH:
        return None
    wb = Workbench.open(st, out, data_root=data_root, seed=seed)  # the cached dense model
    prior = size_prior(CostTable.from_accountant(wb.accountant), wb.layers, "weight", strength)
    targets = targets_for_budget(wb, "weight", Budget.parse(budget), prior)
    return ",".join(f"{k}={v:.8f}" for k, v in targets.items())


def run(study: str, budget: str, ramp: float, epochs: int, seed: int, out: str,
        data_root: str | None, augment: str = "study", strength: float = 0.5) -> dict:
    """One arm on one seed: magnitude pruning with a ramp of `ramp` epochs (0: one-shot), then
    the rest of `epochs` fine-tuning; `augment` other than "study" replaces both phases' own;
    the budget split over the layers by the size prior at `strength`."""
    import dataclasses

    from autoprune.api import prune
    from autoprune.study import load_study

    st = load_study(study)
    if augment != "study":
        st = dataclasses.replace(st, prune=dataclasses.replace(st.prune, augment=augment),
                                 finetune=dataclasses.replace(st.finetune, augment=augment))

    params = ({"gradual": True, "epochs": ramp} if ramp > 0 else {"gradual": False})
    layers = split(st, budget, seed, out, data_root, strength)
    t0 = time.perf_counter()
    m = prune(st, "magnitude", budget, params={**params, "granularity": "weight"},
              layer_sparsity=layers, finetune={"epochs": round(epochs - ramp)}, out=out,
              data_root=data_root, seed=seed)
    return {"budget": budget, "ramp": ramp, "augment": augment, "strength": strength,
            "seed": seed,
            "test": m["test_accuracy"], "val": m["val_accuracy"], "weights_frac": m["weights_frac"],
            "within_budget": m["within_budget"], "seconds": time.perf_counter() - t0}


def table(rows: list[dict], budget: str, ramps: list[float], epochs: int,
          augments: list[str], strengths: list[float]) -> list[str]:
    lines = ["| arm | test mean ± sd | test per seed | val mean | s / run |",
             "|---|---|---|---:|---:|"]
    for r, a, st in itertools.product(ramps, augments, strengths):
        rs = sorted((x for x in rows if x["budget"] == budget and x["ramp"] == r
                     and x["augment"] == a and x["strength"] == st), key=lambda x: x["seed"])
        if not rs:
            continue
        tests = [x["test"] for x in rs]
        arm = (f"one-shot + fine-tune {epochs}" if r == 0 else
               f"ramp {r:g} + fine-tune {epochs - r:g}")
        arm += "" if a == "study" else f", augment {a}"
        arm += "" if len(strengths) == 1 else f", prior strength {st:g}"
        lines.append(f"| {arm} | {mean_sd(tests)} | {per_seed(tests, 4)} | "
                     f"{statistics.mean(x['val'] for x in rs):.4f} | "
                     f"{statistics.mean(x['seconds'] for x in rs):.1f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="lenet5-mnist")
    ap.add_argument("--budgets", default="weights=0.00281,weights=0.01405")
    ap.add_argument("--epochs", type=int, default=18, help="epochs of every run, ramp included")
    ap.add_argument("--ramps", default="2,8", help="ramp lengths in epochs; 0: one-shot")
    ap.add_argument("--augment", default="study",
                    help="augmentations of both phases to compare (study, none, shift, "
                         "crop-flip); study: the study's recipes as they are")
    ap.add_argument("--strengths", default="0.5",
                    help="size-prior strengths of the per-layer split to compare (0.5: default)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--data-root", default=os.environ.get("AUTOPRUNE_DATA"))
    ap.add_argument("--out", default=None, help="default: autoprune-runs/bench-stretch-<time>")
    ap.add_argument("--quick", action="store_true",
                    help="digits-lenet, params=0.05, 6 epochs, ramps 0,1,4, seeds 0,1 (1 min)")
    args = ap.parse_args()
    if args.quick:
        args.study, args.budgets, args.epochs = "digits-lenet", "params=0.05", 6
        args.ramps, args.seeds = "0,1,4", "0,1"
    budgets = [b for b in args.budgets.split(",") if b]
    ramps = [float(r) for r in args.ramps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    augments = [a for a in args.augment.split(",") if a]
    strengths = [float(x) for x in args.strengths.split(",") if x]
    if any(not 0 <= x <= 3 for x in strengths):
        ap.error("--strengths must lie in [0, 3]")
    if any(a not in ("study", "none", "shift", "crop-flip") for a in augments):
        ap.error("--augment takes study, none, shift or crop-flip")
    if any(not 0 <= r < args.epochs for r in ramps):
        ap.error(f"--ramps must lie in [0, --epochs={args.epochs})")
    out = Path(args.out or f"autoprune-runs/bench-stretch-{int(time.time())}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_quiet_worker) as pool:
        # the dense models first, one per seed: runs of a seed then share its cached one
        dense_rows = [j.result() for j in
                      [pool.submit(dense, args.study, s, str(out), args.data_root) for s in seeds]]
        jobs = [pool.submit(run, args.study, b, r, args.epochs, s, str(out), args.data_root, a,
                            x)
                for b in budgets for s in seeds for r in ramps for a in augments
                for x in strengths]
        for j in jobs:
            rows.append(j.result())
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=1))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# Ramp against fine-tune at {args.epochs} epochs: {args.study}, seeds {args.seeds}, "
          f"{args.jobs} runs at a time x 1 thread, {time.perf_counter() - t0:.0f} s, "
          f"load {load:.2f} at the end\n")
    print("dense test per seed: " + " / ".join(f"{d['test']:.4f}" for d in dense_rows) + "\n")
    for b in budgets:
        missed = [x for x in rows if x["budget"] == b and not x["within_budget"]]
        print(f"## {b}" + (f" ({len(missed)} runs over budget)" if missed else "") + "\n")
        print("\n".join(table(rows, b, ramps, args.epochs, augments, strengths)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
