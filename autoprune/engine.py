"""Train and evaluate loops with hook points for pruning methods.

The loop is a plain PyTorch loop over in-memory tensor batches (see `data.py`); a pruning method
plugs in through `TrainHook` (loss penalty, after-step projection, epoch boundaries) and never
touches the loop itself. On CUDA it uses AMP (bf16 autocast) and a channels_last model. On every
device a convolutional model gets its batches in channels_last strides (`input_layout`): oneDNN's
CPU convolutions run 25-40 % faster on them (LeNet-5, ResNet-20; docs/benchmarks.md).

A hook may also split training into cycles (`TrainHook.lr_restarts`): the recipe's schedule then
runs once per cycle (warm restarts), as ADMM's per-iteration W-steps need. The loop does not know
why a hook asks for restarts, only where.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .augment import AUGMENTATIONS
from .data import TensorData
from .errors import TrainingDiverged, UserError

# A trial's recipe override that keeps the study's own setting (a search space choice)
STUDY = "study"
# overrides of a trial's fine-tune that its method's own phase takes too: a searched rate or
# augmentation describes how this trial trains, not only its last phase
BOTH_PHASES = ("lr", "augment")


@dataclass
class Recipe:
    """How to train: optimiser, schedule, epochs (a study has one per phase)."""

    epochs: float = 10  # fractions allowed (e.g. 0.5 epoch) for quick runs
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    gamma: float = 0.1
    label_smoothing: float = 0.0
    # multiplies `lr`: a search space can scale each study's own rate (SGD and Adam rates differ
    # by orders of magnitude, so no absolute range suits every study). Pruned nets recover far
    # faster at a larger rate than the dense net was fine-tuned with (Le & Hua, ICLR 2021);
    # measured: LeNet-5 at 71x, 4 epochs, x8 gives 0.956 test against 0.783 at x1.
    lr_scale: float = 1.0
    # the batch transform of this phase: "default" is the dataset's own (CIFAR: crop + flip;
    # MNIST-like: none); "none", "crop-flip" or "shift" (augment.py) override it
    augment: str = "default"

    def __post_init__(self) -> None:
        for name in ("epochs", "lr", "momentum", "weight_decay", "batch_size", "gamma",
                     "label_smoothing", "lr_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f"recipe {name} must be a number, got {v!r}")
        if not isinstance(self.batch_size, int):
            raise UserError(f"recipe batch_size must be an integer, got {self.batch_size!r}")
        if not isinstance(self.milestones, (list, tuple)) or not all(
                isinstance(m, (int, float)) and not isinstance(m, bool) for m in self.milestones):
            raise UserError(f"recipe milestones must be a list of numbers, got {self.milestones!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise UserError(f"recipe optimizer must be sgd or adam, got '{self.optimizer}'")
        if self.schedule not in ("cosine", "step", "constant"):
            raise UserError(f"recipe schedule must be cosine, step or constant, "
                            f"got '{self.schedule}'")
        if self.augment not in ("default", *AUGMENTATIONS):
            raise UserError(f"recipe augment must be default, {', '.join(AUGMENTATIONS)}; "
                            f"got {self.augment!r}")
        if not (self.epochs >= 0 and self.lr > 0 and self.batch_size > 0 and self.lr_scale > 0):
            raise UserError("recipe needs epochs >= 0, lr > 0, lr_scale > 0 and batch_size > 0")

    @classmethod
    def from_dict(cls, d: dict | None, **overrides) -> Recipe:
        d = {**(d or {}), **overrides}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown recipe key(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        # left out at their defaults: the hashes of studies written before they existed (dense
        # cache, --resume) stay the same
        if d["lr_scale"] == 1.0:
            del d["lr_scale"]
        if d["augment"] == "default":
            del d["augment"]
        return d

    def overridden(self, overrides: Mapping[str, Any]) -> Recipe:
        """This recipe with a trial's overrides. A value of `STUDY` keeps this recipe's own
        setting: a search space can then offer "the study's recipe" as one choice among others
        (`finetune.augment: {choices: [study, none]}`). Unknown keys and bad values are
        `UserError`s."""
        kept = {k: v for k, v in overrides.items() if not (isinstance(v, str) and v == STUDY)}
        return Recipe.from_dict(asdict(self), **kept) if kept else self

    def augment_name(self, dataset_default: bool) -> str:
        """The batch transform this recipe trains with, `default` resolved (`dataset_default`:
        the dataset's own crop + flip)."""
        if self.augment != "default":
            return self.augment
        return "crop-flip" if dataset_default else "none"

    @property
    def batch_augment(self) -> str | None:
        """What `TensorData.batches` takes: None for the dataset's default."""
        return None if self.augment == "default" else self.augment


class TrainHook:
    """Extension points of the training loop; every method is a no-op by default."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       steps_per_epoch: int, epochs: float) -> None:
        """Called once with the optimiser that will be used (e.g. to mask its state)."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss of every step (ADMM's proximal term, L0, group L1)."""
        return None

    def before_step(self, model: nn.Module) -> None:
        """After backward, before the optimiser step (e.g. mask gradients)."""

    def after_step(self, model: nn.Module) -> None:
        """After the optimiser step (projection, re-zeroing, clamping)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before epoch `epoch` (0-based)."""

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        """After epoch `epoch` (schedules, reweighting, ADMM's Z and U updates)."""

    def lr_restarts(self) -> Sequence[int]:
        """Steps (0 < s < total) at which the LR schedule starts over; asked after
        `on_train_start`. A method whose phase is a sequence of sub-problems (ADMM's W-steps)
        gives each one the whole schedule instead of a slice of one long decay."""
        return ()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator that orders the batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = recipe.lr * recipe.lr_scale
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, nesterov=recipe.momentum > 0)


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimiser steps of `epochs` epochs: the loop's rounding rule, shared with hooks that
    count steps (so their own boundaries land on the loop's last step, not one past it)."""
    return max(1, int(round(epochs * steps_per_epoch)))


def cycle_progress(step: int, total: int, restarts: Sequence[int] = ()) -> float:
    """Progress in [0, 1] of `step` within its schedule cycle; cycles split [0, total) at
    `restarts`. Without restarts this is step / total, the plain single-cycle schedule."""
    start, end = 0, total
    for r in sorted(restarts):
        if r <= step:
            start = r
        elif r < end:
            end = r
            break
    return min(1.0, (step - start) / max(end - start, 1))


def lr_at(recipe: Recipe, progress: float) -> float:
    """Learning rate at `progress` in [0, 1] of training: a pure function of the recipe."""
    peak = recipe.lr * recipe.lr_scale
    if recipe.schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if recipe.schedule == "step":
        return peak * recipe.gamma ** sum(progress >= m for m in recipe.milestones)
    return peak


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to the device; channels_last on CUDA for faster convolutions."""
    model = model.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


def input_layout(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether to feed `model` channels_last batches: it has a Conv2d and runs on one.

    The probe is one forward pass in eval mode on a channels_last copy of `example`: a model
    that `.view()`s a feature map (a common hand-written LeNet) fails on those strides, and
    keeps the plain layout instead of crashing.
    """
    if example.dim() != 4 or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(example.device):
            model(to_layout(example[:2], True))
    except RuntimeError:
        return False
    finally:
        model.train(was_training)
    return True


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-D `x` in exactly the strides asked for (channels_last or plain); the same values.

    One-channel images count as contiguous in both layouts, so `Tensor.contiguous` leaves
    their strides alone; comparing the strides and copying into a buffer of the wanted
    format is what sets them. Both ways matter: an augmented batch may arrive channels_last
    for a model that only runs on the plain layout.
    """
    if x.dim() != 4:
        return x
    _, c, h, w = x.shape
    want = (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    if x.stride() == want:
        return x
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt).copy_(x)


def _data_parallel() -> tuple[int, int]:
    """(rank, world size) of a data-parallel trial (a torch process group), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(model: nn.Module, world: int) -> None:
    """All-reduce every gradient (one flat buffer) and divide by `world`.

    Every rank then takes the same optimiser step, so weights (and masks computed from them)
    stay identical across ranks. A parameter without a gradient this step counts as zero, so
    every rank reduces the same buffer whatever its branch of the graph did.
    """
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def train(model: nn.Module, data: TensorData, recipe: Recipe, *,
          hooks: Sequence[TrainHook] = (), seed: int = 0,
          on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place on `data.train_*` following `recipe`; return per-epoch records.

    Each record has `epoch`, `loss`, `lr` and `val_accuracy`; `on_epoch` receives it as soon as
    the epoch ends (live curves, Ray reports). Raises `TrainingDiverged` on a NaN/inf loss.

    Inside a data-parallel trial (a torch process group, see orchestration/distributed.py)
    every rank draws the same global batch from the same seed, trains on its slice of it, and
    gradients are averaged before the hooks see them: the same steps as one worker, spread.
    """
    rank, world = _data_parallel()
    presliced = getattr(data, "shards_batches", False)  # streamed data slices its own batches
    device = data.device
    model = prepare(model, device)
    channels_last = input_layout(model, data.example())
    gen = seed_everything(seed)
    optimizer = make_optimizer(model, recipe)
    n = data.train_size
    steps_per_epoch = max(1, math.ceil(n / recipe.batch_size))
    n_steps = total_steps(recipe.epochs, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    for h in hooks:
        h.on_train_start(model, optimizer, steps_per_epoch, recipe.epochs)
    restarts = sorted({int(r) for h in hooks for r in h.lr_restarts() if 0 < r < n_steps})
    history: list[dict] = []
    step, epoch = 0, 0
    while step < n_steps:
        for h in hooks:
            h.on_epoch_start(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        count = 0
        for x, y in data.batches(recipe.batch_size, gen, augment=recipe.batch_augment):
            if step >= n_steps:
                break
            if world > 1 and not presliced and x.shape[0] >= world:  # this rank's slice
                x, y = x[rank::world], y[rank::world]
            x = to_layout(x, channels_last)
            lr = lr_at(recipe, cycle_progress(step, n_steps, restarts))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device):
                loss = criterion(model(x), y)
            for h in hooks:
                p = h.penalty(model)
                if p is not None:
                    loss = loss + p
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                _average_gradients(model, world)
            for h in hooks:
                h.before_step(model)
            optimizer.step()
            for h in hooks:
                h.after_step(model)
            loss_sum += loss.detach()
            count += 1
            step += 1
        mean_loss = float(loss_sum) / max(count, 1)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"loss became {mean_loss} in epoch {epoch}")
        for h in hooks:
            h.on_epoch_end(epoch, model)
        record = {"epoch": epoch, "loss": mean_loss,
                  "lr": lr_at(recipe, cycle_progress(step, n_steps, restarts)),
                  "val_accuracy": evaluate_split(model, data, "val")}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        epoch += 1
    return history


def evaluate_split(model: nn.Module, data, split: str) -> float:
    """Top-1 accuracy on a split of in-memory or streamed data (`data.eval_batches`)."""
    return evaluate_with_loss(model, data, split)[0]


@torch.no_grad()
def evaluate_with_loss(model: nn.Module, data, split: str) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy on a split, in one pass.

    The loss separates models that a small validation set scores alike (on digits one of its
    144 images is 0.7 points): the search breaks accuracy ties with it (`pareto.py`).
    """
    was_training = model.training
    correct = total = 0
    loss = 0.0
    channels_last = None
    for x, y in data.eval_batches(split):
        if channels_last is None:
            channels_last = input_layout(model, x)
            model.eval()
        with _autocast(x.device):
            logits = model(to_layout(x, channels_last))
        correct += int((logits.argmax(1) == y).sum())
        loss += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        total += y.shape[0]
    model.train(was_training)
    return correct / max(total, 1), loss / max(total, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on (x, y), in eval mode."""
    was_training = model.training
    channels_last = input_layout(model, x) if x.shape[0] else False
    model.eval()
    correct = 0
    device = x.device
    for i in range(0, x.shape[0], batch_size):
        with _autocast(device):
            logits = model(to_layout(x[i:i + batch_size], channels_last))
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(x.shape[0], 1)
