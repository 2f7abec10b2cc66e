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
