"""Datasets held in memory as tensors, with seeded splits and whole-batch augmentation.

Per-sample `Dataset` + `DataLoader` pipelines cost several times the training step on small nets;
here a dataset is four tensors (train/val/test images and labels) on the training device, a batch
is an index slice of a seeded permutation, and CIFAR augmentation (random crop with 4-pixel
padding, horizontal flip) runs on the whole batch as tensor ops.

Data roots: `--data-root`, else `$AUTOPRUNE_DATA`, else `~/.cache/autoprune/data`, laid out as
torchvision expects (`<root>/MNIST/raw`, `<root>/FashionMNIST/raw`, `<root>/cifar-10-batches-py`).
Nothing is downloaded unless `download=True` is asked for; a missing dataset is a one-line error
that says where the files must be.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int
    augment: bool  # random crop + flip during training
    folder: str  # where torchvision keeps it under the root ('' for bundled data)


DATASETS = {
    "digits": DatasetInfo("digits", 1, 8, 10, False, ""),
    "mnist": DatasetInfo("mnist", 1, 28, 10, False, "MNIST/raw"),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, False, "FashionMNIST/raw"),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, True, "cifar-10-batches-py"),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, True, "cifar-100-python"),
    "imagenet": DatasetInfo("imagenet", 3, 224, 1000, True, "imagenet/train"),
}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}") from None


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: the explicit one, else $AUTOPRUNE_DATA, else the user cache."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("AUTOPRUNE_DATA"):
        return Path(os.environ["AUTOPRUNE_DATA"]).expanduser()
    return Path.home() / ".cache" / "autoprune" / "data"


@dataclass
class TensorData:
    """A dataset split three ways, normalised, as tensors on one device."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def example(self) -> torch.Tensor:
        """One input, for tracing and counting."""
        return self.train_x[:1]

    def to(self, device: torch.device | str) -> TensorData:
        t = {k: getattr(self, k).to(device) for k in
             ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        return TensorData(self.info, **t)

    def subset(self, train: int | None = None, test: int | None = None) -> TensorData:
        """The first `train`/`test` examples (shuffled by the split): tests and smoke runs."""
        return TensorData(self.info, self.train_x[:train], self.train_y[:train], self.val_x,
                          self.val_y, self.test_x[:test], self.test_y[:test])

    def batches(self, batch_size: int, generator: torch.Generator,
                augment: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled training batches; the permutation comes from `generator`."""
        n = self.train_x.shape[0]
        perm = torch.randperm(n, generator=generator).to(self.device)
        do_aug = self.info.augment if augment is None else augment
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = self.train_x[idx]
            if do_aug:
                x = crop_flip(x, generator)
            yield x, self.train_y[idx]


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random `pad`-pixel crop and horizontal flip of a whole batch, as tensor ops."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # n x h
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # n x w
    flip = torch.rand(n, generator=generator).to(x.device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bidx = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def _split(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int):
    """Seeded split of (x, y) into (rest, held-out) with `fraction` held out."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    k = int(round(x.shape[0] * fraction))
    held, rest = perm[:k], perm[k:]
    return x[rest], y[rest], x[held], y[held]


def _normalise(train: torch.Tensor, *others: torch.Tensor):
    """Per-channel standardisation with the training split's statistics."""
    dims = [0, 2, 3]
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _missing(info: DatasetInfo, root: Path) -> UserError:
    return UserError(
        f"dataset '{info.name}' not found: expected its files in {root / info.folder} "
        f"(set --data-root or AUTOPRUNE_DATA, or pass --download where the network allows)")


def _load_raw(info: DatasetInfo, root: Path, download: bool):
    """(train_x uint8/float NCHW, train_y, test_x, test_y) as CPU tensors."""
    if info.name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        # scikit-learn ships no test split: hold out a fixed 20 %, the same for every seed.
        tx, ty, sx, sy = _split(x, y, 0.2, seed=0)
        return tx, ty, sx, sy
    if info.name == "imagenet":
        if not (root / info.folder).exists():
            raise _missing(info, root)
        raise UserError("imagenet does not fit in memory: this version trains only on in-memory "
                        "datasets; bring a dense checkpoint and a streaming loader via the API")
    import torchvision.datasets as tvd

    if info.name in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if info.name == "mnist" else tvd.FashionMNIST
        if not download and not (root / info.folder / "train-images-idx3-ubyte").exists():
            raise _missing(info, root)
        try:
            tr, te = (cls(str(root), train=t, download=download) for t in (True, False))
        except (RuntimeError, OSError) as exc:
            raise UserError(f"{_missing(info, root)} ({exc})") from None
        return (tr.data.unsqueeze(1).float() / 255.0, tr.targets.long(),
                te.data.unsqueeze(1).float() / 255.0, te.targets.long())
    cls = tvd.CIFAR10 if info.name == "cifar10" else tvd.CIFAR100
    if not download and not (root / info.folder).exists():
        raise _missing(info, root)
    try:
        tr, te = (cls(str(root), train=t, download=download) for t in (True, False))
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{_missing(info, root)} ({exc})") from None

    def conv(ds):
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.tensor(ds.targets, dtype=torch.long)

    return (*conv(tr), *conv(te))


def load_dataset(name: str, root: str | os.PathLike | None = None, *, val_fraction: float = 0.1,
                 seed: int = 0, device: torch.device | str | None = None,
                 download: bool = False) -> TensorData:
    """Load `name` into memory, carve a seeded validation split from training, normalise.

    The split depends only on `seed`, so every trial of a study sees the same validation set.
    """
    info = dataset_info(name)
    train_x, train_y, test_x, test_y = _load_raw(info, data_root(root), download)
    # Statistics of the whole training set, so normalisation does not depend on the split seed.
    train_x, test_x = _normalise(train_x, test_x)
    train_x, train_y, val_x, val_y = _split(train_x, train_y, val_fraction, seed)
    data = TensorData(info, train_x, train_y, val_x, val_y, test_x, test_y)
    if device is not None:
        data = data.to(device)
    return data
