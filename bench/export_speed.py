"""Does compaction turn a FLOPs reduction into real CPU speed?

For ResNet-20, ResNet-56 and VGG-16 (CIFAR shapes, random weights) this prunes the channels of
every filter unit uniformly (`graph.filter_units()`: uncoupled layers and, with `--units groups`,
the default, the residual streams as whole groups; `--units free` prunes the uncoupled layers
only, as filter pruning did before groups existed). Lowest group score first; the sparsity is
found by bisection so the accounted FLOPs fraction is as close as possible to the target. Then it
compacts with Torch-Pruning and times CPU inference of the dense and the compacted model at batch
1 and batch 64. The "ideal" speed-up is 1 / flops_frac; a measured/ideal ratio near 1 means
latency follows the MAC count.

    .venv/bin/python bench/export_speed.py [--quick] [--target 0.4] [--threads 2] [--units free]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import cpu_model  # noqa: E402

from autoprune.flops import Accountant, count_dense  # noqa: E402
from autoprune.graph import unit_scores  # noqa: E402
from autoprune.models import build_model  # noqa: E402
from autoprune.pruning.base import apply_masks, filter_masks  # noqa: E402
from autoprune.pruning.compaction import compact  # noqa: E402

MODELS = ("resnet20", "resnet56", "vgg16")


def units_of(acc: Accountant, which: str) -> list[str]:
    """The filter units pruned: all group roots, or only the uncoupled (free) layers."""
    return acc.graph.filter_units() if which == "groups" else acc.graph.free_layers()


def uniform_filter_prune(model: nn.Module, acc: Accountant, sparsity: float,
                         units: list[str]) -> nn.Module:
    """A copy of `model` with `sparsity` of every unit's channels zeroed (smallest mean L2)."""
    pruned = copy.deepcopy(model)
    scores = unit_scores(acc.graph, pruned, units)
    apply_masks(pruned, filter_masks(acc.graph, pruned, dict.fromkeys(units, sparsity), scores))
    return pruned


def search_sparsity(model: nn.Module, acc: Accountant, target: float, units: list[str],
                    steps: int = 14) -> tuple[float, nn.Module]:
    """Bisection on the uniform filter sparsity: flops_frac falls (stepwise) as it grows."""
    lo, hi = 0.0, 0.99
    best: tuple[float, nn.Module, float] = (0.0, model, 1.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        pruned = uniform_filter_prune(model, acc, mid, units)
        frac = acc.count(pruned).flops_frac
        if abs(frac - target) < abs(best[2] - target):
            best = (mid, pruned, frac)
        lo, hi = (mid, hi) if frac > target else (lo, mid)
    return best[0], best[1]


@torch.inference_mode()
def paired_latency_ms(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int,
                      warmup: int, stat: str = "median") -> tuple[float, float]:
    """Median (or fastest) wall time of one forward pass of `a` and of `b`, in milliseconds.

    Runs alternate between the two models so that a load change on a shared machine affects
    both medians alike rather than one model's block of runs. Under heavy, bursty load the
    fastest run (`stat="min"`) is the steadier estimate of the uncontended time.
    """
    for _ in range(warmup):
        a(x)
        b(x)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for model, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            model(x)
            out.append(time.perf_counter() - t0)
    pick = min if stat == "min" else statistics.median
    return 1000.0 * pick(times[0]), 1000.0 * pick(times[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--target", type=float, default=0.4, help="flops_frac to aim for")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--units", default="groups", choices=("groups", "free"),
                    help="prune residual channel groups too (default) or free layers only")
    ap.add_argument("--stat", default="median", choices=("median", "min"),
                    help="latency statistic over the repeats (min: steadier under load)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reps = {1: (10, 3), 64: (3, 1)} if args.quick else {1: (40, 5), 64: (11, 2)}
    print(f"machine: {cpu_model()} | torch threads {torch.get_num_threads()} | "
          f"torch {torch.__version__} | python {platform.python_version()}")
    print(f"target flops_frac {args.target}; units: {args.units}; latency: {args.stat}; repeats "
          f"(runs, warm-up) per batch size: {reps}\n")

    rows = []
    for name in args.models:
        model = build_model(name, 10, 3, 32).eval()
        x1 = torch.randn(1, 3, 32, 32)
        acc = Accountant(model, x1)
        t0 = time.perf_counter()
        units = units_of(acc, args.units)
        sparsity, pruned = search_sparsity(model, acc, args.target, units)
        counts = acc.count(pruned)
        small = compact(pruned, x1, acc.graph).eval()
        setup_s = time.perf_counter() - t0
        macs, params = count_dense(small, x1)
        with torch.inference_mode():
            diff = float((small(x1) - pruned(x1)).abs().max())
        assert macs == counts.macs, (name, macs, counts.macs)
        note = "" if abs(counts.flops_frac - args.target) < 0.02 else \
            f" (target {args.target} not reachable by these units)"
        print(f"{name}: filter sparsity {sparsity:.3f} on {len(units)} {args.units} units "
              f"-> flops_frac {counts.flops_frac:.3f}{note}; compacted MACs "
              f"{macs / 1e6:.1f}M (dense {acc.dense_macs / 1e6:.1f}M), params "
              f"{params / 1e6:.3f}M; max |out diff| {diff:.1e}; setup {setup_s:.1f}s")
        for bs, (n, w) in reps.items():
            xb = torch.randn(bs, 3, 32, 32)
            dense_ms, small_ms = paired_latency_ms(model, small, xb, n, w, args.stat)
            rows.append((name, bs, counts.flops_frac, params / acc.dense_params, dense_ms,
                         small_ms))
    print()
    head = (f"{'model':<9} {'batch':>5} {'flops_frac':>10} {'params_frac':>11} {'dense ms':>9} "
            f"{'compact ms':>10} {'speed-up':>8} {'ideal':>6} {'meas/ideal':>10}")
    print(head)
    print("-" * len(head))
    for name, bs, ff, pf, dms, cms in rows:
        speed, ideal = dms / cms, 1.0 / ff
        flag = "" if speed / ideal >= 0.7 else "  < 0.7"
        print(f"{name:<9} {bs:>5} {ff:>10.3f} {pf:>11.3f} {dms:>9.2f} {cms:>10.2f} "
              f"{speed:>8.2f} {ideal:>6.2f} {speed / ideal:>10.2f}{flag}")


if __name__ == "__main__":
    main()
