"""Where tensors live and how many threads a process may use: one place for both decisions."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """CUDA when present (data and model both go there), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(cpus: float | int | None) -> int:
    """Give torch as many intra-op threads as the CPUs this process was allotted.

    Ray trials on a shared machine would otherwise each spawn one thread per core and thrash.
    """
    n = int(cpus) if cpus else (os.cpu_count() or 1)
    n = max(1, n)
    torch.set_num_threads(n)
    return n
