"""The peers a user would pick instead of autoprune, run on a study's own dense weights.

    .venv/bin/python bench/peers.py [--study digits-lenet] [--budget flops=0.4] [--seeds 0,1,2]
        [--data-root DIR] [--out DIR] [--seconds S] [--lr-scale X] [--json]

Arms (each starts from the same cached dense model the study's `autoprune prune` uses):
- `tp-global-l2`: Torch-Pruning's `MetaPruner` with `GroupMagnitudeImportance(p=2)` and
  `global_pruning=True` (the one call a user makes by hand), the pruning ratio found by bisection
  so the *compacted* model keeps at most the budget's FLOPs and/or params fraction; then the
  study's fine-tune recipe. Structured: the FLOPs drop is real on dense hardware.
- `tnp-global-l1`: `torch.nn.utils.prune.global_unstructured` with `L1Unstructured` over every
  conv/linear weight but the logits layer's, at the budget's `params=`/`weights=` fraction of
  those weights; then masked fine-tuning (the reparametrisation keeps zeros at zero).
  Unstructured: it saves no FLOPs on dense hardware, so it is skipped under a `flops=` budget.

`--seconds S` gives every arm the same wall-clock budget: after pruning, an arm fine-tunes for
as many whole epochs as fit in what is left of S (one epoch probed on a throwaway copy first),
instead of the study's fixed fine-tune length. That is the equal-compute comparison a search
must win. The functions are imported by bench/search_quality.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("autoprune.bench")

PRUNABLE = (nn.Conv2d, nn.Conv1d, nn.Linear)


def _macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    from autoprune.flops import count_dense

    return count_dense(model, example)


def tp_global(model: nn.Module, example: torch.Tensor, limits: dict[str, float],
              output_layer: str, p: int = 2, steps: int = 24,
              global_pruning: bool = True) -> nn.Module:
    """Torch-Pruning global group-magnitude pruning to the largest ratio within `limits`
    (`global_pruning=False`: the same ratio in every layer, the uniform hand baseline).

    `limits` holds kept fractions of the dense model for 'flops' and/or 'params', measured on
    the physically pruned model. Bisection over `pruning_ratio` (each probe prunes a fresh copy),
    so the result is the least-pruned model that meets every limit.
    """
    import torch_pruning as tp

    dense_macs, dense_params = _macs_params(model, example)

    def pruned(ratio: float) -> nn.Module:
        m = copy.deepcopy(model).eval()
        ignored = [m.get_submodule(output_layer)]
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(
            p=p), global_pruning=global_pruning, pruning_ratio=ratio, ignored_layers=ignored,
            max_pruning_ratio=0.95)
        pruner.step()
        return m

    def fits(m: nn.Module) -> bool:
        macs, params = _macs_params(m, example)
        fr = {"flops": macs / dense_macs, "params": params / dense_params}
        return all(fr[k] <= v + 1e-12 for k, v in limits.items() if k in fr)

    # Torch-Pruning leaves a layer whole when a global ratio would empty it, so very high ratios
    # can give *larger* models: bisect below the first ratio that fits.
    lo, hi = 0.0, 0.9
    if not fits(best := pruned(hi)):
        raise ValueError(f"Torch-Pruning cannot reach {limits} even at ratio {hi}")
    for _ in range(steps):
        mid = (lo + hi) / 2
        m = pruned(mid)
        if fits(m):
            hi, best = mid, m
        else:
            lo = mid
    return best


def _keep(m: nn.Module, limits: dict[str, float]) -> float:
    """The fraction of conv/linear weights to keep so that `limits` hold."""
    n_weights = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, PRUNABLE))
    n_params = sum(p.numel() for p in m.parameters())
    keeps = []
    if "weights" in limits:
        keeps.append(limits["weights"])
    if "params" in limits:
        keeps.append((limits["params"] * n_params - (n_params - n_weights)) / n_weights)
    keep = min(keeps)
    if keep <= 0:
        raise ValueError(f"{limits} leaves no weight to keep")
    return keep


def tnp_uniform(model: nn.Module, limits: dict[str, float]) -> nn.Module:
    """`torch.nn.utils.prune.l1_unstructured` with the same amount in every conv/linear layer
    (the uniform hand baseline under params=/weights=); carries the reparametrisation."""
    from torch.nn.utils import prune as tnp

    m = copy.deepcopy(model)
    keep = _keep(m, limits)
    for mod in m.modules():
        if isinstance(mod, PRUNABLE):
            n = mod.weight.numel()
            tnp.l1_unstructured(mod, "weight", amount=n - max(1, int(keep * n)))
    return m


def tnp_global(model: nn.Module, limits: dict[str, float]) -> nn.Module:
    """`torch.nn.utils.prune.global_unstructured` (L1) over every conv/linear weight.

    Keeps the largest fraction of those weights that meets `limits` ('weights': of the
    conv/linear weights; 'params': of all parameters, biases and BatchNorm counted as kept). The
    returned copy carries torch's pruning reparametrisation (weight_orig * weight_mask), so
    training it keeps pruned weights at zero; `finalise` makes the zeros permanent.
    """
    from torch.nn.utils import prune as tnp

    m = copy.deepcopy(model)
    params = [(mod, "weight") for mod in m.modules() if isinstance(mod, PRUNABLE)]
    n_weights = sum(mod.weight.numel() for mod, _ in params)
    keep = _keep(m, limits)
    tnp.global_unstructured(params, pruning_method=tnp.L1Unstructured,
                            amount=n_weights - int(keep * n_weights))
    return m


def finalise(model: nn.Module) -> nn.Module:
    """Remove torch's pruning reparametrisations, leaving plain (zero-holding) weights."""
    from torch.nn.utils import prune as tnp

    for mod in model.modules():
        if tnp.is_pruned(mod) and hasattr(mod, "weight_orig"):
            tnp.remove(mod, "weight")
    return model


def _epoch_cost(model: nn.Module, data, recipe, seed: int, seconds: float) -> tuple[float, float]:
    """(seconds per epoch, fixed seconds per `train` call) of `recipe` on `model`, probed.

    One epoch first; then, if it was short, enough epochs to fill about 2 % of `seconds` (at
    most 20 s): the median of their times (all but the first) is the per-epoch cost, robust to
    the jitter of sub-second epochs; what the first took beyond it is the call's fixed cost.
    The model is restored after (one carrying torch's pruning reparametrisation cannot be
    deep-copied, so its state is kept instead).
    """
    from autoprune.engine import train

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stamps = [time.perf_counter()]

    def stamp(_rec: dict) -> None:
        stamps.append(time.perf_counter())

    train(model, data, dataclasses.replace(recipe, epochs=1), seed=seed, on_epoch=stamp)
    first = stamps[1] - stamps[0]
    k = int(min(0.02 * seconds, 20.0) // max(first, 1e-9))
    steps = [first]
    if k >= 3:
        stamps[:] = [time.perf_counter()]
        train(model, data, dataclasses.replace(recipe, epochs=k), seed=seed, on_epoch=stamp)
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    model.load_state_dict(state)
    per_epoch = statistics.median(steps[1:]) if len(steps) > 2 else first
    return max(per_epoch, 1e-9), max(0.0, steps[0] - per_epoch)


def finetune(model: nn.Module, data, recipe, seed: int, seconds: float | None = None) -> float:
    """Fine-tune in place with `recipe`; with `seconds`, as many epochs as fit. Returns epochs.

    The epoch count is fixed before training (the recipe's schedule, cosine by default, spans
    it), so it comes from a probe (`_epoch_cost`). The arm's real time still misses `seconds`
    by up to a third on half-minute budgets, as the epoch time moves with the machine's load
    (docs/benchmarks.md, eighth runs): the tables report each arm's real seconds.
    """
    from autoprune.engine import train

    epochs = float(recipe.epochs)
    if seconds is not None:
        deadline = time.perf_counter() + seconds
        per_epoch, overhead = _epoch_cost(model, data, recipe, seed, seconds)
        epochs = float(max(1, int((deadline - time.perf_counter() - overhead) // per_epoch)))
    if epochs > 0:
        train(model, data, dataclasses.replace(recipe, epochs=epochs), seed=seed)
    return epochs


def run_arm(arm: str, wb, limits: dict[str, float], seed: int,
            seconds: float | None = None, lr_scale: float = 1.0) -> dict[str, Any]:
    """One peer arm on a `Workbench` (dense weights, data, accountant); returns its metrics.
    `lr_scale` multiplies the study's fine-tune rate (a peer given the rate a search found)."""
    from autoprune.engine import evaluate
    from autoprune.pruning.compaction import compact

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, data = wb.fresh_model(), wb.data
    example = data.example()
    out_layer = wb.accountant.graph.output_layer
    if arm == "tp-global-l2":
        pruned = tp_global(model, example, {k: v for k, v in limits.items()
                                            if k in ("flops", "params")}, out_layer)
    elif arm == "tp-uniform-l2":
        pruned = tp_global(model, example, {k: v for k, v in limits.items()
                                            if k in ("flops", "params")}, out_layer,
                           global_pruning=False)
    elif arm == "tnp-global-l1":
        pruned = tnp_global(model, limits)
    elif arm == "tnp-uniform-l1":
        pruned = tnp_uniform(model, limits)
    else:
        raise ValueError(f"unknown arm {arm!r}")
    left = None if seconds is None else seconds - (time.perf_counter() - t0)
    recipe = dataclasses.replace(wb.study.finetune, lr_scale=lr_scale)
    epochs = finetune(pruned, data, recipe, seed, left)
    pruned = finalise(pruned)
    dense_macs, dense_params = wb.accountant.dense_macs, wb.accountant.dense_params
    c_macs, c_params = _macs_params(compact(pruned, example) if arm.startswith("tnp-")
                                    else pruned, example)
    nz_weights = sum(int((mod.weight != 0).sum()) for mod in pruned.modules()
                     if isinstance(mod, PRUNABLE))
    all_weights = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, PRUNABLE))
    nz_params = sum(int((p != 0).sum()) for p in pruned.parameters())
    return {"arm": arm, "seed": seed, "val_accuracy": evaluate(pruned, data.val_x, data.val_y),
            "test_accuracy": evaluate(pruned, data.test_x, data.test_y),
            "flops_frac": c_macs / dense_macs, "params_frac": nz_params / dense_params,
            "compact_params_frac": c_params / dense_params,
            "weights_frac": nz_weights / all_weights, "finetune_epochs": epochs,
            "seconds": time.perf_counter() - t0}


def _arms_for(limits: dict[str, float]) -> list[str]:
    arms = []
    if {"flops", "params"} & set(limits):
        arms.append("tp-global-l2")
    if "flops" not in limits and {"params", "weights"} & set(limits):
        arms.append("tnp-global-l1")
    return arms


def _parse_limits(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        k, _, v = item.partition("=")
        out[k.strip()] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="digits-lenet")
    ap.add_argument("--budget", default="flops=0.4", help="flops=/params=/weights= fractions")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-root")
    ap.add_argument("--out", default="autoprune-runs/bench-peers")
    ap.add_argument("--seconds", default=None,
                    help="equal wall-clock budget per arm; several (e.g. 25,60,150) measure "
                         "each arm's accuracy against fine-tune length")
    ap.add_argument("--lr-scale", type=float, default=1.0,
                    help="multiply the study's fine-tune learning rate (default 1: as is)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from autoprune.pipeline import Workbench
    from autoprune.study import load_study

    limits = _parse_limits(args.budget)
    study = load_study(args.study)
    try:
        lengths = [None] if not args.seconds else [float(x) for x in args.seconds.split(",")]
    except ValueError:
        ap.error(f"--seconds '{args.seconds}' is not a number or a list like 25,60,150")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        wb = Workbench.open(study, args.out, data_root=args.data_root, seed=seed, device="cpu")
        for arm in _arms_for(limits):
            for seconds in lengths:
                r = run_arm(arm, wb, limits, seed, seconds, args.lr_scale)
                r["dense_test_accuracy"] = wb.dense["test_accuracy"]
                if len(lengths) > 1:  # one row per fine-tune length
                    r["arm"] = f"{arm} {seconds:g}s"
                rows.append(r)
                log.info("%s seed %d: test %.4f flops %.3f params %.3f (%.1fs, %g epochs)",
                         r["arm"], seed, r["test_accuracy"], r["flops_frac"], r["params_frac"],
                         r["seconds"], r["finetune_epochs"])
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        return 0
    print(f"study {args.study}, budget {args.budget}, seeds {args.seeds}"
          f"{f', {args.seconds} s per arm' if args.seconds else ', study fine-tune'}")
    print(f"{'arm':<20} {'test mean':>9} {'sd':>7} {'flops':>7} {'params':>7} {'epochs':>7}"
          f"  per seed")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        accs = [r["test_accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{arm:<20} {statistics.mean(accs):>9.4f} {sd:>7.4f} "
              f"{statistics.mean(r['flops_frac'] for r in rs):>7.3f} "
              f"{statistics.mean(r['params_frac'] for r in rs):>7.3f} "
              f"{statistics.mean(r['finetune_epochs'] for r in rs):>7.0f}  "
              + " ".join(f"{a:.4f}" for a in accs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
