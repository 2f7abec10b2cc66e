"""Datasets as tensors, seeded determinism, clear errors, and a real training run."""

from __future__ import annotations

import pytest
import torch

from autoprune.augment import crop_flip, shift
from autoprune.data import load_dataset
from autoprune.engine import Recipe, evaluate, input_layout, lr_at, to_layout, train
from autoprune.errors import UserError
from autoprune.models import build_model


def test_digits_splits_are_disjoint_and_seeded(digits):
    assert digits.train_x.shape[1:] == (1, 8, 8)
    n = digits.train_x.shape[0] + digits.val_x.shape[0] + digits.test_x.shape[0]
    assert n == 1797
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.val_x, digits.val_x)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.val_x, digits.val_x)
    assert torch.equal(other.test_x, digits.test_x)  # the test split never moves


def test_batches_are_deterministic_for_a_seed(digits):
    def first(seed):
        return next(digits.batches(32, torch.Generator().manual_seed(seed)))[1]
    assert torch.equal(first(3), first(3))
    assert not torch.equal(first(3), first(4))


def test_missing_dataset_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset("mnist", tmp_path)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("imagenette", tmp_path)


def test_mnist_loads_from_shared_raw_files(mnist_root):
    d = load_dataset("mnist", mnist_root)
    assert d.train_x.shape == (54_000, 1, 28, 28) and d.test_x.shape == (10_000, 1, 28, 28)
    counts = torch.bincount(torch.cat([d.train_y, d.val_y]), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_crop_flip_keeps_pixels_and_shape():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8) + 1
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    # every nonzero output pixel comes from the same image
    for i in range(2):
        vals = set(out[i][out[i] != 0].tolist())
        assert vals <= set(x[i].flatten().tolist())


def test_shift_translates_without_mirroring_and_pads_with_the_edge():
    """Each image comes out as itself moved by at most `pad` pixels each way (the border filled
    with its edge pixels, the background of a digit), never mirrored, and the batch differs."""
    x = torch.randn(16, 1, 12, 12)
    x[:, :, :3, :] = x[:, :, -3:, :] = x[:, :, :, :3] = x[:, :, :, -3:] = -0.4  # background
    out = shift(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    moved = 0
    for i in range(16):
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(torch.roll(x[i], (dy, dx), dims=(1, 2)), out[i])]
        assert hits, f"image {i} is not a translate of its input"
        moved += hits[0] != (0, 0)
    assert moved >= 8
    assert shift(torch.zeros(2, 1, 28, 28), torch.Generator()).shape == (2, 1, 28, 28)


def test_a_recipes_augment_changes_training_and_default_keeps_hashes(digits):
    """`augment: shift` trains on moved images (different weights from the same seed); the
    digits' default is no augmentation, so "default" and "none" train alike; a recipe at its
    default serialises as before (dense caches and --resume keep their keys)."""
    assert "augment" not in Recipe().to_dict()
    assert Recipe.from_dict(Recipe(augment="shift").to_dict()).augment == "shift"
    with pytest.raises(UserError, match="augment"):
        Recipe(augment="mixup")
    sub = digits.subset(train=256)
    w = {}
    for kind in ("default", "none", "shift"):
        torch.manual_seed(0)
        m = build_model("lenet-digits", 10, 1, 8)
        train(m, sub, Recipe(epochs=1, batch_size=64, augment=kind), seed=7)
        w[kind] = m.fc2.weight.detach().clone()
    assert torch.equal(w["default"], w["none"])
    assert not torch.allclose(w["shift"], w["none"])


def test_lenet_trains_on_digits_to_95_percent(digits):
    """15 epochs (about 3 s on 2 idle cores; speed is measured in bench/, not here)."""
    model = build_model("lenet-digits", 10, 1, 8)
    history = train(model, digits, Recipe(epochs=15, lr=0.05, batch_size=64), seed=0)
    acc = evaluate(model, digits.test_x, digits.test_y)
    assert acc >= 0.95, acc
    assert len(history) == 15 and history[-1]["val_accuracy"] >= 0.9


def test_training_is_reproducible(digits):
    sub = digits.subset(train=256)
    w = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model("lenet-digits", 10, 1, 8)
        train(m, sub, Recipe(epochs=1, batch_size=64), seed=7)
        w.append(m.fc2.weight.detach().clone())
    assert torch.equal(w[0], w[1])


def test_conv_batches_go_channels_last_with_the_same_values():
    """One-channel images need the copy: `contiguous(channels_last)` leaves their strides."""
    for c in (1, 3):
        x = torch.randn(4, c, 6, 6)
        out = to_layout(x, True)
        assert out.stride(1) == 1 and torch.equal(out, x)
        assert to_layout(x, False) is x
        back = to_layout(out, False)  # and back to the plain strides, which `contiguous` skips
        assert back.stride() == torch.empty(x.shape).stride() and torch.equal(back, x)
    flat = torch.randn(4, 16)
    assert to_layout(flat, True) is flat


class _ViewNet(torch.nn.Module):
    """A hand-written CNN that `.view()`s its feature map: fails on channels_last strides."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(x.shape[0], -1))


def test_channels_last_only_where_the_model_runs_on_it(digits):
    """The built-in CNNs get channels_last batches; a model that cannot take them still trains,
    in the plain layout, and evaluation gives the plain layout's predictions."""
    assert input_layout(build_model("lenet-digits", 10, 1, 8), digits.example())
    assert not input_layout(build_model("lenet300", 10, 1, 8), digits.example())
    view_net = _ViewNet()
    assert not input_layout(view_net, digits.example()) and view_net.training
    for augment in ("none", "shift", "crop-flip"):  # shifted batches come out channels_last
        train(view_net, digits.subset(train=256), Recipe(epochs=1, batch_size=64,
                                                         augment=augment), seed=0)
    model = build_model("lenet-digits", 10, 1, 8)
    train(model, digits.subset(train=512), Recipe(epochs=2, lr=0.05, batch_size=64), seed=0)
    model.eval()
    with torch.no_grad():
        plain = model(digits.test_x.contiguous()).argmax(1)
    expected = float((plain == digits.test_y).float().mean())
    assert evaluate(model, digits.test_x, digits.test_y) == pytest.approx(expected, abs=2e-3)


def test_lr_scale_is_a_multiplier_of_the_rate(digits):
    """`lr_scale` (what the default space searches) trains exactly as the scaled rate would,
    and a recipe at x1 serialises as before, so existing studies keep their hashes."""
    r = Recipe(lr=0.1, schedule="step", milestones=[0.5], gamma=0.1, lr_scale=4)
    assert lr_at(r, 0.0) == pytest.approx(0.4) and lr_at(r, 0.6) == pytest.approx(0.04)
    assert "lr_scale" not in Recipe(lr=0.1).to_dict()
    assert Recipe.from_dict(Recipe(lr_scale=2.5).to_dict()).lr_scale == 2.5
    with pytest.raises(UserError):
        Recipe(lr_scale=0)
    sub = digits.subset(train=256)
    w = []
    for recipe in (Recipe(epochs=1, lr=0.01, lr_scale=4, batch_size=64),
                   Recipe(epochs=1, lr=0.04, batch_size=64),
                   Recipe(epochs=1, lr=0.01, batch_size=64)):
        torch.manual_seed(0)
        m = build_model("lenet-digits", 10, 1, 8)
        train(m, sub, recipe, seed=7)
        w.append(m.fc2.weight.detach().clone())
    assert torch.allclose(w[0], w[1]) and not torch.allclose(w[0], w[2])


def test_schedules():
    r = Recipe(lr=0.1, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert lr_at(r, 0.0) == pytest.approx(0.1)
    assert lr_at(r, 0.6) == pytest.approx(0.01)
    assert lr_at(r, 0.8) == pytest.approx(0.001)
    c = Recipe(lr=0.1, schedule="cosine")
    assert lr_at(c, 0.5) == pytest.approx(0.05) and lr_at(c, 1.0) == pytest.approx(0.0)
    with pytest.raises(UserError):
        Recipe(optimizer="lbfgs")
