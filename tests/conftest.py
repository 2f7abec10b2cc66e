"""Shared fixtures: data roots, small datasets, one Ray for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)


def shared_data_root() -> Path | None:
    """MNIST/Fashion-MNIST raw files: $AUTOPRUNE_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("AUTOPRUNE_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for c in candidates:
        if (c / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return c
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("MNIST raw files not found: set AUTOPRUNE_DATA to a folder with MNIST/raw")
    return root


@pytest.fixture(scope="session")
def digits():
    from autoprune.data import load_dataset

    return load_dataset("digits", device="cpu")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="warning")
    yield ray
    ray.shutdown()


# Trials of about a second: one-shot magnitude, one fine-tune epoch (reliability, cluster tests).
QUICK_SPACE = """
methods:
  magnitude:
    gradual: false
    epochs: 0
finetune:
  epochs: 1
sparsity:
  target_floor: 0.6
"""

TINY_SPACE = """
methods:
  magnitude:
    gradual: {choices: [false, true]}
    epochs: 1
  admm:
    rho: {low: 1.0e-4, high: 1.0e-2, log: true}
    admm_iters: 2
    epochs_per_iter: 0.5
finetune:
  epochs: 1
sparsity:
  target_floor: 0.6
  allocation: {low: 0.05, high: 0.95}
"""


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory) -> str:
    """A search space small enough for searches of a few seconds per trial on digits."""
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return str(path)


@pytest.fixture(scope="session")
def pretrained(digits) -> dict[str, torch.Tensor]:
    """Dense weights of the digits LeNet (3 epochs of SGD), shared by the methods' tests."""
    from autoprune.engine import Recipe, train
    from autoprune.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet-digits", 10, 1, 8)
    train(model, digits, Recipe(epochs=3, lr=0.05, batch_size=64))
    return {k: v.clone() for k, v in model.state_dict().items()}


def fresh_digits_lenet(pretrained: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A new digits LeNet holding `pretrained`."""
    from autoprune.models import build_model

    model = build_model("lenet-digits", 10, 1, 8)
    model.load_state_dict(pretrained)
    return model
