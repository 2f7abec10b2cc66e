"""Image folders streamed from disk: the data path for datasets that do not fit in memory.

The in-memory `TensorData` (data.py) stays the fast path for small data; this is the other one,
with the same training and evaluation interface (`batches`, `eval_batches`, `example`,
`train_size`), so the engine runs both the same way. A folder is laid out as torchvision's
`ImageFolder` expects, one sub-folder per class, under split folders:

    PATH/train/<class>/*.png|jpg|...    required
    PATH/val/<class>/*                  optional: else carved from train (seeded val_fraction)
    PATH/test/<class>/*                 optional: else carved from train likewise

Images are read by `DataLoader` worker processes, pinned when the device is a GPU, and
transformed as ImageNet training does: random resized crop and horizontal flip for training,
resize to 256/224 of the size then centre crop for evaluation, then normalisation with the
study's statistics (ImageNet's by default). Every problem with the folder (missing, empty, no
class folders, a split whose classes differ from train's, an unreadable image) is a one-line
`UserError` naming the path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import UserError

if TYPE_CHECKING:
    from .data import TensorData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FolderSpec:
    """How to read a folder: what a study's `dataset: imagefolder:PATH` and `data:` say."""

    path: Path
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    val_fraction: float = 0.1
    seed: int = 0
    num_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))


class _Checked(Dataset):
    """A dataset whose unreadable items become one-line `UserError`s naming the file."""

    def __init__(self, base, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base.samples)

    def __getitem__(self, i: int):
        path, label = self.base.samples[i]
        try:
            img = self.base.loader(path)
        except Exception as exc:  # PIL raises several types for broken files
            raise UserError(f"cannot read image {path}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        return self.transform(img), label


def _transforms(spec: FolderSpec, train: bool):
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    if train:
        return T.Compose([T.RandomResizedCrop(spec.image_size), T.RandomHorizontalFlip(), *norm])
    resize = int(round(spec.image_size * 256 / 224))
    return T.Compose([T.Resize(resize), T.CenterCrop(spec.image_size), *norm])


def _image_folder(path: Path):
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise UserError(f"image folder {path} does not exist or is not a folder")
    if not any(p.is_dir() for p in path.iterdir()):
        raise UserError(f"image folder {path} has no class folders (expected {path}/<class>/*)")
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"image folder {path}: {str(exc).splitlines()[0]}") from None


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _carve(n: int, fraction: float, seed: int, parts: int) -> list[torch.Tensor]:
    """Seeded disjoint index sets: `parts` held-out sets of `fraction` each, then the rest."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * fraction))
    held = [perm[i * k:(i + 1) * k] for i in range(parts)]
    return [*held, perm[parts * k:]]


class FolderData:
    """A dataset streamed from an image folder, split three ways (see the module docstring)."""

    # In a data-parallel trial `batches` yields this rank's slice of each global batch itself,
    # so that each rank decodes only its images (engine.train slices in-memory batches).
    shards_batches = True

    def __init__(self, spec: FolderSpec, device: torch.device | str = "cpu") -> None:
        from .data import DatasetInfo

        self.spec = spec
        self._device = torch.device(device)
        root = Path(spec.path).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist or is not a folder")
        train = _image_folder(root / "train")
        found = {s: _image_folder(root / s) for s in ("val", "test") if (root / s).exists()}
        for split, ds in found.items():
            if ds.classes != train.classes:
                raise UserError(f"image folder {root / split} has classes {ds.classes[:5]}... "
                                f"but {root / 'train'} has {train.classes[:5]}...: they must "
                                f"be the same class folders")
        missing = [s for s in ("val", "test") if s not in found]
        views = {split: _Checked(ds, _transforms(spec, False)) for split, ds in found.items()}
        train_view = _Checked(train, _transforms(spec, True))
        if missing:
            eval_view = _Checked(train, _transforms(spec, False))
            *held, rest = _carve(len(train.samples), spec.val_fraction, spec.seed, len(missing))
            for split, idx in zip(missing, held, strict=True):
                views[split] = Subset(eval_view, idx.tolist())
            train_view = Subset(train_view, rest.tolist())
        self.train_set, self.val_set, self.test_set = train_view, views["val"], views["test"]
        for split in SPLITS:
            if len(getattr(self, f"{split}_set")) == 0:
                raise UserError(f"image folder {root}: the {split} split has no images")
        self.root, self.classes = root, list(train.classes)
        self.info = DatasetInfo(f"imagefolder:{root}", 3, spec.image_size, len(self.classes),
                                True, str(root), (3, spec.image_size, spec.image_size))
        self._files = [p for p, _ in train.samples] + [p for ds in found.values()
                                                         for p, _ in ds.samples]

    # -- the interface the engine uses (shared with TensorData) -------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def train_size(self) -> int:
        return len(self.train_set)

    def split_size(self, split: str) -> int:
        return len(getattr(self, f"{split}_set"))

    def to(self, device: torch.device | str) -> FolderData:
        out = object.__new__(FolderData)
        out.__dict__.update(self.__dict__)
        out._device = torch.device(device)
        return out

    def _loader(self, ds, batch_size: int, generator: torch.Generator | None) -> DataLoader:
        workers = self.spec.num_workers
        return DataLoader(ds, batch_size=batch_size, shuffle=generator is not None,
                          generator=generator, num_workers=workers,
                          pin_memory=self._device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if workers else None)

    def _moved(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for x, y in loader:
                yield (x.to(self._device, non_blocking=True),
                       y.to(self._device, non_blocking=True))
        except UserError:
            raise
        except Exception as exc:  # a worker's UserError comes back re-wrapped: keep one line
            msg = str(exc)
            line = next((s for s in msg.splitlines() if "cannot read image" in s), None)
            if line is None:
                raise
            raise UserError(line[line.index("cannot read image"):]) from None

    def batches(self, batch_size: int, generator: torch.Generator,
                augment: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled, augmented training batches (order from `generator`).

        Always the folder's own random-resized-crop augmentation: `augment` may only ask for
        that (None or True), since the batch transforms of `augment.py` work on whole
        in-memory batches of one image size."""
        if augment not in (None, True):
            raise UserError(f"augment {augment!r} is for in-memory datasets; an image folder "
                            f"trains with its own random-resized crops (augment: default)")
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,),
                                                              generator=generator)))
        rank, world = _rank_world()
        if world > 1:
            return self._moved(self._rank_loader(batch_size, gen, rank, world))
        return self._moved(self._loader(self.train_set, batch_size, gen))

    def _rank_loader(self, batch_size: int, gen: torch.Generator, rank: int,
                     world: int) -> DataLoader:
        """This rank's slice of each global batch: the batches one worker's
        `DataLoader(shuffle=True, generator=gen)` draws (its base seed, then the permutation)."""
        torch.empty((), dtype=torch.int64).random_(generator=gen)
        perm = torch.randperm(len(self.train_set), generator=gen).tolist()
        batches = []
        for i in range(0, len(perm), batch_size):
            b = perm[i:i + batch_size]
            batches.append(b[rank::world] if len(b) >= world else b)  # as engine.train does
        workers = self.spec.num_workers
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=workers,
                          generator=gen,  # seeds the workers' augmentation
                          pin_memory=self._device.type == "cuda",
                          prefetch_factor=4 if workers else None)

    def eval_batches(self, split: str, batch_size: int = 256
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`split` ('val' or 'test'), in order, with the evaluation transform."""
        return self._moved(self._loader(getattr(self, f"{split}_set"), batch_size, None))

    def example(self) -> torch.Tensor:
        """One evaluation-transformed input (for tracing and counting), on the device."""
        x, _ = self.val_set[0]
        return x.unsqueeze(0).to(self._device)

    def subset(self, train: int | None = None, test: int | None = None) -> FolderData:
        """The first `train`/`test` examples of the (seeded) splits: quick studies and tests."""
        out = self.to(self._device)
        if train is not None:
            out.train_set = Subset(self.train_set, range(min(train, len(self.train_set))))
        if test is not None:
            out.test_set = Subset(self.test_set, range(min(test, len(self.test_set))))
        return out

    def in_memory(self) -> TensorData:
        """Every image decoded once (evaluation transform) into a `TensorData`.

        The fast path for a folder small enough to hold in memory: no per-image decoding per
        epoch, but also no random-resized-crop augmentation.
        """
        from .data import TensorData

        def stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
            idx = list(range(len(ds)))
            while isinstance(ds, Subset):  # subsets of subsets: compose the indices
                idx, ds = [ds.indices[i] for i in idx], ds.dataset
            plain = _Checked(ds.base, _transforms(self.spec, False))
            xs, ys = zip(*(plain[i] for i in idx), strict=True)
            return torch.stack(xs).to(self._device), torch.tensor(ys, device=self._device)

        info = dataclasses.replace(self.info, augment=False)
        return TensorData(info, *stack(self.train_set), *stack(self.val_set),
                          *stack(self.test_set))

    def fingerprint(self) -> str:
        """A hash of the file list with sizes and modification times, and the read settings.

        Cheap on large folders (no image is opened); part of the dense-cache key.
        """
        h = hashlib.sha256(repr((self.spec.image_size, self.spec.mean, self.spec.std,
                                 self.spec.val_fraction, self.spec.seed)).encode())
        for p in self._files:
            st = os.stat(p)
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()


def folder_options(data: dict, source: str) -> dict[str, Any]:
    """The image-folder keys of a study's `data:` mapping (`FOLDER_OPTIONS`), checked."""
    from .data import FOLDER_OPTIONS

    out = {k: data[k] for k in FOLDER_OPTIONS if k in data}
    for k in ("image_size", "num_workers"):
        v = out.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                              or v < (1 if k == "image_size" else 0)):
            raise UserError(f"{source}: 'data.{k}' must be a "
                            f"{'positive' if k == 'image_size' else 'non-negative'} integer")
    for k in ("mean", "std"):
        v = out.get(k)
        if v is not None and (not isinstance(v, list) or len(v) != 3 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                or (k == "std" and min(v) <= 0)):
            raise UserError(f"{source}: 'data.{k}' must be a list of 3 numbers (one per RGB "
                            f"channel{', positive' if k == 'std' else ''})")
    return {k: [float(x) for x in v] if isinstance(v, list) else v for k, v in out.items()}
