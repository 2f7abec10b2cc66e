"""Datasets held in memory as tensors, with seeded splits and whole-batch augmentation.

Per-sample `Dataset` + `DataLoader` pipelines cost several times the training step on small nets;
here a dataset is four tensors (train/val/test images and labels) on the training device, a batch
is an index slice of a seeded permutation, and augmentation runs on the whole batch as tensor
ops: CIFAR's random crop with 4-pixel padding and horizontal flip (a dataset's default), or a
random shift of 7 % of the side (a recipe's `augment: shift`, for digits that must not flip).

Data roots: `--data-root`, else `$AUTOPRUNE_DATA`, else `~/.cache/autoprune/data`, laid out as
torchvision expects (`<root>/MNIST/raw`, `<root>/FashionMNIST/raw`, `<root>/cifar-10-batches-py`).
Nothing is downloaded unless `download=True` is asked for; a missing dataset is a one-line error
that says where the files must be.

A user's own data enters through `from_tensors` (train/test tensors, a seeded validation split);
it is taken as already normalised, since only its owner knows how it should be.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .augment import augmentation
from .errors import UserError

if TYPE_CHECKING:
    from .imagefolder import FolderData


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int
    augment: bool  # random crop + flip during training
    folder: str  # where torchvision keeps it under the root ('' for bundled data)
    input_shape: tuple[int, ...] = ()  # one example's shape (user data; built-ins leave it empty)


DATASETS = {
    "digits": DatasetInfo("digits", 1, 8, 10, False, ""),
    "mnist": DatasetInfo("mnist", 1, 28, 10, False, "MNIST/raw"),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, False, "FashionMNIST/raw"),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, True, "cifar-10-batches-py"),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, True, "cifar-100-python"),
    "imagenet": DatasetInfo("imagenet", 3, 224, 1000, True, "imagenet"),
}
# Streamed from disk (imagefolder.py), never loaded into memory as a whole.
STREAMED = {"imagenet"}
FOLDER_PREFIX = "imagefolder:"
FOLDER_OPTIONS = ("image_size", "mean", "std", "num_workers")  # a study's data: keys for folders


def is_streamed(dataset: str) -> bool:
    """Whether a study's dataset is read from disk batch by batch (its own augmentation)."""
    return str(dataset).startswith(FOLDER_PREFIX) or dataset in STREAMED


def dataset_info(name: str) -> DatasetInfo:
    if name.startswith(FOLDER_PREFIX) and name[len(FOLDER_PREFIX):].strip():
        return DatasetInfo(name, 3, 224, 0, True, name[len(FOLDER_PREFIX):])
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)} or "
                        f"{FOLDER_PREFIX}PATH") from None


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: the explicit one, else $AUTOPRUNE_DATA, else the user cache.

    Always absolute: trial workers run in other directories (and on other nodes), so a path
    relative to where the user typed the command means nothing to them.
    """
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get("AUTOPRUNE_DATA"):
        return Path(os.environ["AUTOPRUNE_DATA"]).expanduser().resolve()
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

    @property
    def train_size(self) -> int:
        return self.train_x.shape[0]

    def split_size(self, split: str) -> int:
        return getattr(self, f"{split}_x").shape[0]

    def eval_batches(self, split: str, batch_size: int = 1024
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`split` ('val' or 'test') in order, as slices (the interface `FolderData` shares)."""
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    def example(self) -> torch.Tensor:
        """One input, for tracing and counting."""
        return self.train_x[:1]

    def to(self, device: torch.device | str) -> TensorData:
        t = {k: getattr(self, k).to(device) for k in
             ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        return TensorData(self.info, **t)

    def fingerprint(self) -> str:
        """A content hash of the six tensors (shapes, dtypes, values).

        Part of the dense-cache key of a study on user data: two data sets that differ in any
        value never share a cached dense baseline.
        """
        h = hashlib.sha256()
        for name in _SPLITS:
            t = getattr(self, name).detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def validate(self) -> TensorData:
        """Refuse (`UserError`) what training would trip over later with an obscure error.

        Inputs are floating point and finite, with one feature shape in all three splits; labels
        are 1-D integer class ids in [0, num_classes), as many as inputs. Returns self.
        """
        shape = None
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            _check_pair(split, x, y)
            if shape is not None and tuple(x.shape[1:]) != shape:
                raise UserError(f"{split} inputs have shape {tuple(x.shape[1:])} per example, "
                                f"train inputs {shape}")
            shape = tuple(x.shape[1:])
            if y.numel() and int(y.max()) >= self.info.num_classes:
                raise UserError(f"{split} labels go up to {int(y.max())}, but the data has "
                                f"{self.info.num_classes} classes")
        if self.train_x.shape[0] == 0 or self.val_x.shape[0] == 0 or self.test_x.shape[0] == 0:
            raise UserError(f"every split needs examples: {self.train_x.shape[0]} train, "
                            f"{self.val_x.shape[0]} validation, {self.test_x.shape[0]} test")
        return self

    def subset(self, train: int | None = None, test: int | None = None) -> TensorData:
        """The first `train`/`test` examples (shuffled by the split): tests and smoke runs."""
        return TensorData(self.info, self.train_x[:train], self.train_y[:train], self.val_x,
                          self.val_y, self.test_x[:test], self.test_y[:test])

    def batches(self, batch_size: int, generator: torch.Generator,
                augment: bool | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled training batches; the permutation comes from `generator`.

        `augment`: None, the dataset's default; False or "none"; True or "crop-flip"; "shift".
        """
        n = self.train_x.shape[0]
        perm = torch.randperm(n, generator=generator).to(self.device)
        transform = augmentation(self.info.augment if augment is None else augment)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = self.train_x[idx]
            if transform is not None:
                x = transform(x, generator)
            yield x, self.train_y[idx]


_SPLITS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def _check_pair(split: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One split's inputs and labels, as `TensorData.validate` wants them (else `UserError`)."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise UserError(f"{split} inputs and labels must be tensors, got {type(x).__name__} "
                        f"and {type(y).__name__}")
    if not x.is_floating_point():
        raise UserError(f"{split} inputs must be floating point and already normalised, got "
                        f"{x.dtype} (e.g. convert images with x.float() / 255, then standardise)")
    if x.dim() < 2:
        raise UserError(f"{split} inputs must have a batch dimension and at least one feature "
                        f"dimension, got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise UserError(f"{split} labels must be a 1-D tensor of integer class ids, got "
                        f"{y.dtype} of shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{split} has {x.shape[0]} inputs but {y.shape[0]} labels")
    if y.numel() and int(y.min()) < 0:
        raise UserError(f"{split} labels must be class ids >= 0, found {int(y.min())}")
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"{split} inputs hold NaN or infinite values")


def _as_tensor(split: str, what: str, value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(value))
        # NumPy's default float64 would not run through a float32 model: use torch's default
        return t.float() if t.dtype == torch.float64 else t
    raise UserError(f"{split} {what} must be a torch tensor or a NumPy array, got "
                    f"{type(value).__name__}")


def _as_pair(split: str, pair: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
        raise UserError(f"{split} must be a pair (inputs, labels), got {type(pair).__name__}")
    x, y = _as_tensor(split, "inputs", pair[0]), _as_tensor(split, "labels", pair[1])
    _check_pair(split, x, y)
    return x, y.long()


def from_tensors(train: Sequence, test: Sequence, *, val: Sequence | None = None,
                 val_fraction: float = 0.1, seed: int = 0, num_classes: int | None = None,
                 name: str = "custom") -> TensorData:
    """A user's own data as a `TensorData`: `train`, `test` (and `val`) are (inputs, labels).

    Inputs are float tensors (or NumPy arrays; float64 ones become float32) of shape (N, ...)
    taken as they are: they must already be normalised the way the model expects, since only
    the user knows how (built-in data sets are standardised per channel by `load_dataset`).
    Labels are integer class ids. Without `val`, a validation split of `val_fraction` is carved
    from training with `seed`, by the same seeded split as `load_dataset`, so it is
    reproducible. `num_classes` defaults to the largest label + 1. Tensors are moved to the
    CPU (not copied when already there); a pruning run moves them to its device.
    """
    train_x, train_y = _as_pair("train", train)
    test_x, test_y = _as_pair("test", test)
    if val is not None:
        val_x, val_y = _as_pair("val", val)
    else:
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
                or not 0 < val_fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed must be an integer, got {seed!r}")
        train_x, train_y, val_x, val_y = _split(train_x, train_y, float(val_fraction), seed)
    top = max((int(t.max()) for t in (train_y, val_y, test_y) if t.numel()), default=0)
    if num_classes is None:
        num_classes = max(top + 1, 2)
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(name, str) or not name:
        raise UserError(f"the data's name must be a non-empty string, got {name!r}")
    shape = tuple(int(s) for s in train_x.shape[1:])
    info = DatasetInfo(name, in_channels=shape[0] if len(shape) > 1 else 1,
                       image_size=shape[-1] if len(shape) > 1 else 0, num_classes=num_classes,
                       augment=False, folder="", input_shape=shape)
    return TensorData(info, train_x, train_y, val_x, val_y, test_x, test_y).validate()


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
                 download: bool = False, options: dict | None = None) -> TensorData | FolderData:
    """Load `name` into memory, carve a seeded validation split from training, normalise.

    The split depends only on `seed`, so every trial of a study sees the same validation set.
    `imagefolder:PATH` and `imagenet` (`<root>/imagenet/{train,val}`) are streamed from disk
    instead (`FolderData`); `options` are then `FOLDER_OPTIONS` (image size, normalisation,
    loader workers). A relative PATH is taken under the data root, which every node resolves
    the same way.
    """
    info = dataset_info(name)
    if name.startswith(FOLDER_PREFIX) or name in STREAMED:
        return _load_folder(info, data_root(root), val_fraction, seed, device, options or {})
    train_x, train_y, test_x, test_y = _load_raw(info, data_root(root), download)
    # Statistics of the whole training set, so normalisation does not depend on the split seed.
    train_x, test_x = _normalise(train_x, test_x)
    train_x, train_y, val_x, val_y = _split(train_x, train_y, val_fraction, seed)
    data = TensorData(info, train_x, train_y, val_x, val_y, test_x, test_y)
    if device is not None:
        data = data.to(device)
    return data


def _load_folder(info: DatasetInfo, root: Path, val_fraction: float, seed: int,
                 device: torch.device | str | None, options: dict) -> FolderData:
    from .imagefolder import FolderData, FolderSpec

    path = Path(info.folder).expanduser()
    path = path if path.is_absolute() else root / path
    if info.name in STREAMED and not path.exists():
        raise _missing(info, root)
    size = options.get("image_size", info.image_size)
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()
            if k in FOLDER_OPTIONS}
    data = FolderData(FolderSpec(path=path, val_fraction=val_fraction, seed=seed,
                                 **{**opts, "image_size": size}), device or "cpu")
    return data  # classes come from the folder (a stand-in may hold fewer)
