"""What trials share across a Ray cluster: in-memory data through the object store.

A search's driver has loaded the study's data once (to train or load the dense baseline). For a
data set held in memory (`TensorData`: digits, MNIST, CIFAR, a user's tensors) it puts the six
split tensors into Ray's object store as NumPy arrays; each node then holds one copy, and a
trial's worker maps it (zero-copy on the CPU) instead of reading and normalising the files again.
Streamed folders (`FolderData`) are not shared: their images stay on the shared file system.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import DatasetInfo, TensorData

_FIELDS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


@dataclass(frozen=True)
class SharedData:
    """A handle on a `TensorData` in Ray's object store (small: it pickles as references)."""

    info: DatasetInfo
    ref: Any  # ray.ObjectRef of a dict of NumPy arrays


def share_data(data: object) -> SharedData | None:
    """Put in-memory data into the object store once; None for data that is not shared."""
    import ray

    if not isinstance(data, TensorData):
        return None
    arrays = {k: getattr(data, k).detach().cpu().contiguous().numpy() for k in _FIELDS}
    return SharedData(data.info, ray.put(arrays))


def fetch_data(shared: SharedData) -> TensorData:
    """The shared data as a `TensorData` on the CPU, mapped from this node's object store.

    The arrays are read-only shared memory: nothing in the engine writes into a dataset's
    tensors (batches are gathered copies), so they are wrapped, not copied.
    """
    import ray

    arrays: dict[str, np.ndarray] = ray.get(shared.ref)
    with warnings.catch_warnings():  # "non-writable array": the engine never writes to it
        warnings.simplefilter("ignore", UserWarning)
        tensors = {k: torch.from_numpy(arrays[k]) for k in _FIELDS}
    return TensorData(shared.info, **tensors)
