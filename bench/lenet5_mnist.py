"""LeNet-5 / MNIST against the ADMM paper (71.2x at 99.2 %): fixed-setting rows and a search row.

    .venv/bin/python bench/lenet5_mnist.py [--data-root DIR] [--budget params=0.014]
        [--methods magnitude,admm,radmm] [--finetune-epochs N] [--search TRIALS]
        [--retrain-epochs N] [--quick] [--out DIR] [--update-docs]

Fixed rows run `autoprune prune --study lenet5-mnist --method M --budget B --json` with the
settings below and the default per-layer split of the budget (no hand-set ratios). The search
row runs `autoprune search --study lenet5-mnist --budget B --trials T --workers 2` (short trials,
the study's own recipe) and then reruns its best in-budget point alone with a longer fine-tune,
using the command that the search prints for it: the per-layer sparsities are the search's,
found, not hand-set. Every row prints the command that reproduces it. The baseline row is the
paper's; the dense row is this run's dense model. `--quick` shortens every phase (a smoke run
that says so in its header, not a reproduction).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

# Per-method settings of a full run. ADMM as in the paper's code but shorter: the paper runs
# 30 iterations x 4.2 epochs at a constant rho 1e-4; a growing rho reaches a sparse W sooner.
FULL = {
    "magnitude": ["--set", "gradual=true", "--set", "epochs=6"],
    "admm": ["--set", "rho=1e-3", "--set", "rho_mult=1.5", "--set", "admm_iters=10",
             "--set", "epochs_per_iter=1"],
    "radmm": ["--set", "rho=1e-3", "--set", "rho_mult=1.5", "--set", "admm_iters=10",
              "--set", "epochs_per_iter=1"],
    "l0": ["--set", "epochs=10"],
    "adaptive_l1": ["--set", "epochs=6"],
}
QUICK = {
    "magnitude": [],
    "admm": ["--set", "admm_iters=2", "--set", "epochs_per_iter=0.25", "--set", "rho=1e-3"],
    "radmm": ["--set", "admm_iters=2", "--set", "epochs_per_iter=0.25", "--set", "rho=1e-3"],
    "l0": ["--set", "epochs=0.5"],
    "adaptive_l1": ["--set", "epochs=0.5"],
}
PAPER = ("ADMM paper (Zhang et al. 2018)", 71.2, 0.992)
# The paper's hand-set per-layer pruned fractions (METHODS.md): a row with them shows how much
# of a gap is the split of the budget and how much the training.
PAPER_RATIOS = "conv1=0.8,conv2=0.92,fc1=0.991,fc2=0.93"


def _run(args: list[str]) -> tuple[dict | None, float, str]:
    """Run `autoprune ARGS --json`; (parsed output or None, seconds, last error line)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "autoprune", *args, "--json"],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        return None, elapsed, (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(proc.stdout), elapsed, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=os.environ.get("AUTOPRUNE_DATA"))
    ap.add_argument("--budget", default="params=0.014")
    ap.add_argument("--methods", default="magnitude,admm,radmm",
                    help="fixed-setting rows ('' for none)")
    ap.add_argument("--finetune-epochs", type=float, default=None,
                    help="fine-tune epochs of the fixed rows (default: the study's)")
    ap.add_argument("--paper-ratios", action="store_true",
                    help="add an ADMM row with the paper's hand-set per-layer ratios")
    ap.add_argument("--search", type=int, default=0, metavar="TRIALS",
                    help="also run a search of this many trials (0: no search row)")
    ap.add_argument("--retrain-epochs", type=float, default=20,
                    help="fine-tune epochs when the search's best point is rerun alone")
    ap.add_argument("--out", default="autoprune-runs/bench-lenet5")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--update-docs", action="store_true",
                    help="write the table into docs/benchmarks.md")
    ap.add_argument("--section", default="lenet5_mnist",
                    help="the docs section it writes (e.g. a search-only run beside the rows)")
    args = ap.parse_args()
    settings = QUICK if args.quick else FULL
    common = ["--out", args.out, *(["--data-root", args.data_root] if args.data_root else [])]
    started = time.time()
    load_start = report.load()
    rows: list[tuple[str, dict, float, str]] = []
    notes: list[str] = []
    dense: dict | None = None

    fixed = [(m, m, []) for m in filter(None, args.methods.split(","))]
    if args.paper_ratios:
        fixed.append(("admm, the paper's per-layer ratios (hand-set)", "admm",
                      ["--layer-sparsity", PAPER_RATIOS]))
    for name, method, extra in fixed:
        cmd = ["prune", "--study", "lenet5-mnist", "--method", method, "--budget", args.budget,
               *settings.get(method, []), *extra]
        if args.finetune_epochs is not None:
            cmd += ["--finetune", f"epochs={args.finetune_epochs:g}"]
        m, elapsed, err = _run([*cmd, *common])
        print(f"{name}: {'failed: ' + err if m is None else 'done'} ({elapsed:.0f} s)",
              file=sys.stderr)
        if m is not None:
            rows.append((name, m, elapsed, "autoprune " + shlex.join(cmd)))
            dense = dense or m

    if args.search:
        cmd = ["search", "--study", "lenet5-mnist", "--budget", args.budget,
               "--trials", str(args.search), "--workers", "2", "--cpus-per-trial", "1"]
        s, elapsed, err = _run([*cmd, *common])
        print(f"search: {'failed: ' + err if s is None else 'done'} ({elapsed:.0f} s)",
              file=sys.stderr)
        best = (s or {}).get("best")
        if best:
            searched = {**best, "weight_compression": None,
                        "dense_test_accuracy": s["dense"]["test_accuracy"]}
            rows.append((f"search best of {args.search} (trial {best['trial']}, "
                         f"{best['method']}), as searched", searched, elapsed,
                         "autoprune " + shlex.join(cmd)))
            notes.append(f"search: {s['trials_completed']} completed, {s['trials_failed']} "
                         f"failed, {s['trials_feasible']} within budget, {elapsed / 60:.1f} min")
            rerun = shlex.split(best["rerun"])[1:]
            rerun = [a for i, a in enumerate(rerun)  # the retrain's epochs replace the trial's
                     if not (a.startswith("epochs=") and rerun[i - 1] == "--finetune")
                     and not (a == "--finetune" and rerun[i + 1].startswith("epochs="))]
            rerun += ["--finetune", f"epochs={args.retrain_epochs:g}"]
            m, elapsed, err = _run([*rerun, *common])
            print(f"retrain: {'failed: ' + err if m is None else 'done'} ({elapsed:.0f} s)",
                  file=sys.stderr)
            if m is not None:
                rows.append((f"search best, retrained alone ({args.retrain_epochs:g} fine-tune "
                              f"epochs)", m, elapsed, "autoprune " + shlex.join(rerun)))
                dense = dense or m
        elif s is not None:
            notes.append("search: no trial within the budget")

    title = f"LeNet-5 on MNIST, budget {args.budget}{' (QUICK smoke run)' if args.quick else ''}"
    lines = [f"**{title}**", "",
             "| row | compression | params_frac | flops_frac | test acc | time s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m, elapsed, _ in rows:
        comp = m.get("weight_compression")
        lines.append(f"| {name} | {f'{comp:.1f}x' if comp else '-'} | {m['params_frac']:.4f} | "
                     f"{m['flops_frac']:.4f} | {m['test_accuracy']:.4f} | {elapsed:.0f} |")
    if dense:
        lines.append(f"| dense LeNet-5 (this run) | 1x | 1 | 1 | "
                     f"{dense['dense_test_accuracy']:.4f} | |")
    lines.append(f"| {PAPER[0]} | {PAPER[1]}x | | | {PAPER[2]} | |")
    lines += ["", "reproduce a row:", "```"]
    lines += [f"{name}:\n  {cmd}" for name, _, _, cmd in rows]
    lines += ["```"]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines += ["", f"Load average at start {load_start}, at end {report.load()}; "
                  f"total {(time.time() - started) / 60:.1f} min."]
    body = "\n".join(lines)
    print(body)
    if args.update_docs:
        title = "LeNet-5 / MNIST against the ADMM paper"
        if args.section != "lenet5_mnist":
            title += f" ({args.section})"
        report.update_section(args.section, title, body)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
