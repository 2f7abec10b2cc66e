"""Whole-batch augmentations of in-memory image tensors: what a recipe's `augment` names.

They run on a batch as tensor ops on its device (no per-image Python), drawing from the
training loop's generator, so an epoch's transforms are seeded like its order, and every rank of
a data-parallel trial draws the same ones. `crop-flip` is CIFAR's (a dataset's default where its
`DatasetInfo.augment` is set); `shift` suits digits and letters, which must not be mirrored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import UserError

AUGMENTATIONS = ("none", "crop-flip", "shift")  # what a recipe's `augment` may name


def augmentation(kind: bool | str) -> Callable[[torch.Tensor, torch.Generator],
                                               torch.Tensor] | None:
    """The batch transform `kind` names (True: crop-flip; False or "none": None)."""
    if kind is True or kind == "crop-flip":
        return crop_flip
    if kind == "shift":
        return shift
    if kind is False or kind == "none":
        return None
    raise UserError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")


def _random_crop(x: torch.Tensor, generator: torch.Generator, pad: int, mode: str,
                 flip: bool) -> torch.Tensor:
    """One random window of the `pad`-padded batch per image (and a coin-flip mirror)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode=mode)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # n x h
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # n x w
    if flip:
        mirror = torch.rand(n, generator=generator).to(x.device) < 0.5
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    bidx = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)  # channels_last strides; the engine sets the layout


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random `pad`-pixel crop and horizontal flip of a whole batch (CIFAR's augmentation)."""
    return _random_crop(x, generator, pad, "constant", flip=True)


def shift(x: torch.Tensor, generator: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Random translation of each image by up to `pad` pixels each way (default: 7 % of its
    side, 2 pixels on 28x28 MNIST, 1 on 8x8 digits), no flip: digits and letters change meaning
    mirrored. The border is extended with the edge pixels, i.e. the background, not zeros: on
    normalised MNIST a zero is not the background's value.
    LeNet-5 at 71.2x (weights=0.01405), 18 epochs of ramp and fine-tune, 3 seeds
    (bench/phase_stretch.py --augment none,shift): see docs/benchmarks.md."""
    if pad is None:
        pad = max(1, round(0.07 * min(x.shape[-2:])))
    return _random_crop(x, generator, pad, "replicate", flip=False)
