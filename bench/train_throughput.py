"""Training throughput: autoprune's engine against a plain PyTorch loop, and LeNet-5's baseline.

    .venv/bin/python bench/train_throughput.py [--data-root DIR] [--epochs-to-99 N] [--quick]

Part 1 times one epoch of LeNet-5 on MNIST through `autoprune.engine.train` and through a
hand-written loop over the same in-memory tensors (same optimiser, batch size, threads), in the
same process, alternating order, and prints both and their ratio (target <= 1.10).
Part 2 trains the dense LeNet-5 with the lenet5-mnist study's recipe until it reaches 99.0 %
test accuracy (the baseline the ADMM paper prunes from) and reports how many epochs it took.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch
from torch import nn

from autoprune.data import load_dataset
from autoprune.engine import Recipe, evaluate, train
from autoprune.models import build_model
from autoprune.study import load_study


def plain_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, bs: int,
                seed: int) -> None:
    """The loop a PyTorch user would write: Adam, shuffled index slices, no hooks."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    model.train()
    for i in range(0, x.shape[0], bs):
        idx = perm[i:i + bs]
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=os.environ.get("AUTOPRUNE_DATA"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-epochs", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="a 10k-example subset, 1 repeat")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", args.data_root, device="cpu")
    if args.quick:
        data = data.subset(train=10_000)
        args.repeats, args.max_epochs = 1, 3
    recipe = Recipe(epochs=1, optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=128,
                    schedule="constant")
    times: dict[str, list[float]] = {"autoprune engine": [], "plain PyTorch loop": []}
    for r in range(args.repeats):
        order = ["autoprune engine", "plain PyTorch loop"]
        for name in order if r % 2 == 0 else order[::-1]:
            torch.manual_seed(0)
            model = build_model("lenet5")
            t0 = time.perf_counter()
            if name == "autoprune engine":
                train(model, data, recipe, seed=0)
            else:
                plain_epoch(model, data.train_x, data.train_y, 1e-3, 128, 0)
                evaluate(model, data.val_x, data.val_y)  # the engine evaluates each epoch too
            times[name].append(time.perf_counter() - t0)
    print(f"# Training throughput, LeNet-5 on MNIST ({data.train_x.shape[0]} training images, "
          f"batch 128, {args.threads} threads)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print("\n| loop | median s/epoch | runs |\n|---|---:|---:|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"| {k} | {med[k]:.2f} | {len(v)} |")
    ratio = med["autoprune engine"] / med["plain PyTorch loop"]
    print(f"\nratio engine / plain = {ratio:.3f} (target <= 1.10)")

    study = load_study("lenet5-mnist")
    torch.manual_seed(0)
    model = build_model("lenet5")
    reached = None
    # the study's recipe, trained epoch by epoch with a constant rate up to max-epochs
    step = replace(study.dense, epochs=1, schedule="constant")
    t0 = time.perf_counter()
    for epoch in range(1, args.max_epochs + 1):
        train(model, data, replace(step, lr=study.dense.lr * (0.7 ** (epoch - 1))), seed=epoch)
        acc = evaluate(model, data.test_x, data.test_y)
        print(f"dense LeNet-5 epoch {epoch}: test accuracy {acc:.4f}")
        if acc >= 0.99 and reached is None:
            reached = epoch
            break
    outcome = f"reached 99.0 % after {reached} epochs" if reached else "did not reach 99.0 %"
    print(f"\nLeNet-5 dense baseline: {outcome} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
