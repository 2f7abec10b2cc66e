"""Data throughput: the streamed image-folder path against a bare DataLoader loop and in-memory.

    .venv/bin/python bench/data_throughput.py [--images 1797] [--size 32] [--workers 2]
        [--batch 64] [--repeats 3] [--folder DIR]

Writes scikit-learn's digits as PNGs (upscaled to --size) into a temporary image folder (or
reads --folder, laid out PATH/train/<class>/*), then trains the same small convnet for one epoch
three ways, each timed over --repeats epochs (median and range reported, images/s):
- `bare loop`: torchvision `ImageFolder` + `DataLoader` (same transforms, workers, batch) and a
  hand-written SGD step: what a user writes without autoprune (the baseline);
- `autoprune stream`: `FolderData` through `engine.train` (the path a study with
  `dataset: imagefolder:PATH` takes);
- `autoprune in-memory`: the same images decoded once into tensors, `TensorData` through
  `engine.train` (the fast path for small data; no per-image decoding or random crops).
Target: stream >= 0.9x the bare loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_folder(root: Path, size: int, limit: int) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images[:limit], d.target[:limit], strict=True)):
        folder = root / "train" / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img / 16.0 * 255).astype(np.uint8)).resize((size, size)).save(
            folder / f"{i}.png")
    return root


def net(size: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, 10))


def bare_epoch(data, batch: int, workers: int, size: int) -> float:
    """The baseline: a plain DataLoader over the same training subset, a plain SGD loop."""
    from torch.utils.data import DataLoader

    model = net(size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(data.train_set, batch_size=batch, shuffle=True, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return data.train_size / (time.perf_counter() - t0)


def engine_epoch(data, batch: int, size: int) -> float:
    from autoprune.engine import Recipe, train

    model = net(size)
    recipe = Recipe(epochs=1, lr=0.01, batch_size=batch, weight_decay=0.0, schedule="constant")
    t0 = time.perf_counter()
    train(model, data, recipe, seed=0)
    # train() also evaluates the validation split once: time it and leave it out
    t1 = time.perf_counter()
    from autoprune.engine import evaluate_split

    evaluate_split(model, data, "val")
    return data.train_size / ((t1 - t0) - (time.perf_counter() - t1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1797)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from autoprune.imagefolder import FolderData, FolderSpec

    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or write_folder(Path(tmp), args.size, args.images)
        data = FolderData(FolderSpec(path=root, image_size=args.size, num_workers=args.workers,
                                     val_fraction=0.1))
        mem = data.in_memory()
        rows = {"bare loop (DataLoader + SGD)": [], "autoprune stream": [],
                "autoprune in-memory": []}
        for _ in range(args.repeats):  # interleaved, so drift hits every arm alike
            rows["bare loop (DataLoader + SGD)"].append(
                bare_epoch(data, args.batch, args.workers, args.size))
            rows["autoprune stream"].append(engine_epoch(data, args.batch, args.size))
            rows["autoprune in-memory"].append(engine_epoch(mem, args.batch, args.size))
    base = statistics.median(rows["bare loop (DataLoader + SGD)"])
    print(f"{data.train_size} training images {args.size}x{args.size}, batch {args.batch}, "
          f"{args.workers} loader workers, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} epochs each")
    print(f"{'path':<30} {'images/s median':>15} {'min':>8} {'max':>8} {'vs bare':>8}")
    for name, v in rows.items():
        print(f"{name:<30} {statistics.median(v):>15.0f} {min(v):>8.0f} {max(v):>8.0f} "
              f"{statistics.median(v) / base:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
