"""What trials share across a Ray cluster: in-memory data through the object store.

A search's driver has loaded the study's data once (to train or load the dense baseline). For a
data set held in memory (`TensorData`: digits, MNIST, CIFAR, a user's tensors) it puts the six
split tensors into Ray's object store as NumPy arrays; each node then holds one copy, and a
trial's worker maps it (zero-copy on the CPU) instead of reading and normalising the files again.
Streamed folders (`FolderData`) are not shared: their images stay on the shared file system.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
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


# -- data-parallel trials (`--trial-workers N`) ------------------------------------------------
#
# The Tune trial (a light function on one node) starts a Ray Train `TorchTrainer` of N workers
# (gloo on CPU, NCCL on GPU; `--cpus-per-trial`/`--gpus-per-trial` per worker) and waits for it.
# Every rank runs the very trial of trial.py (`_run`): the same plan, the same seeds, the same
# global batches, each training on its slice with gradients averaged (engine.train), the prune
# phase's masks and weights taken from rank 0 (pruning/runner.py). Rank 0 alone writes the
# trial's checkpoint and result; its progress reaches Tune through `TuneReportCallback`.
# The between-phases checkpoint is a folder beside the trial checkpoints (shared storage), so a
# retried trial (`--max-failures`) resumes from it as a one-worker trial resumes from Tune's.


def _paths(ctx: Any, number: int) -> tuple[Path, Path]:
    base = Path(ctx.study_dir) / "checkpoints"
    return base / f"trial-{number}.dp-pruned", base / f"trial-{number}.dp-result.json"


def run_data_parallel(config: dict, ctx: Any, number: int) -> dict:
    """Run one trial over `ctx.trial_workers` Ray Train workers; return its final result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    _, result_file = _paths(ctx, number)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    per_worker = {"CPU": float(ctx.cpus)}
    if ctx.gpus > 0:
        per_worker["GPU"] = float(ctx.gpus)
    trainer = TorchTrainer(
        _rank_main, train_loop_config={"config": config, "ctx": ctx, "number": number},
        scaling_config=ScalingConfig(num_workers=int(ctx.trial_workers), use_gpu=ctx.gpus > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"trial-{number}-{uuid.uuid4().hex[:8]}",
                             storage_path=str(result_file.parent / "ray-train"),
                             callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - sorted below: the trial's own error, or a lost rank
        raise _cause(exc) from None
    finally:  # the scratch folders of ranks > 0 that were killed before removing their own
        for scratch in result_file.parent.glob(f"trial-{number}.rank-*"):
            shutil.rmtree(scratch, ignore_errors=True)
    if not result_file.exists():
        raise RuntimeError(f"data-parallel trial {number} ended without a result")
    return json.loads(result_file.read_text())


class RanksLost(RuntimeError):
    """A rank of a data-parallel trial died (node lost, killed): Tune retries the trial."""


def _cause(exc: BaseException) -> BaseException:
    """The error a rank's own code raised (recorded as the trial's failure, as for one worker),
    else `RanksLost` (a worker process died: retried from the between-phases checkpoint)."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        # Ray Train hands back what the trial's code raised, unwrapped; its own errors (a
        # failed health check, a dead actor) mean that the worker itself is gone
        err = failures[rank]
        err = getattr(err, "_base_exc", err)
        if isinstance(err, Exception) and not type(err).__module__.startswith("ray."):
            return err
    return RanksLost(f"a worker of the data-parallel trial was lost: {str(exc)[:200]}")


def _rank_main(loop_config: dict) -> None:
    """One rank of a data-parallel trial (a Ray Train worker with a torch process group)."""
    import ray.train
    from ray import tune

    from . import trial

    config, ctx, number = loop_config["config"], loop_config["ctx"], loop_config["number"]
    rank = ray.train.get_context().get_world_rank()
    pruned_dir, result_file = _paths(ctx, number)

    def report(metrics: dict, checkpoint: tune.Checkpoint | None = None) -> None:
        if checkpoint is not None and rank == 0:  # the between-phases state, kept atomically
            tmp = pruned_dir.with_name(pruned_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint.path, tmp)
            shutil.rmtree(pruned_dir, ignore_errors=True)
            tmp.rename(pruned_dir)
        ray.train.report(metrics)  # a barrier: every rank reports as often

    def get_checkpoint() -> tune.Checkpoint | None:
        return tune.Checkpoint.from_directory(str(pruned_dir)) if pruned_dir.is_dir() else None

    trial._report, trial._get_checkpoint = report, get_checkpoint  # this worker process only
    # rank 0 writes the trial's checkpoint; the others' copies go to a scratch folder beside
    # it, removed when the rank ends (and by the trial's driver, if the rank was killed)
    scratch = None if rank == 0 else tempfile.mkdtemp(prefix=f"trial-{number}.rank-{rank}-",
                                                      dir=pruned_dir.parent)
    run_ctx = ctx if scratch is None else dataclasses.replace(
        ctx, study_dir=scratch, faults=type(ctx.faults)())
    try:
        final = trial._run(config, run_ctx, number)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if rank == 0:
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**final, "trial_workers": int(ctx.trial_workers)}))
        os.replace(tmp, result_file)


# A data-parallel trial's own Tune function only waits for its workers (which Ray Train places
# in a placement group of their own): it holds a sliver of a CPU, not a worker's share.
DRIVER_CPUS = 0.01


def trial_resources(opts: Any) -> dict[str, float]:
    """What Tune reserves per trial: the trial itself, or (data-parallel) its waiting driver."""
    if opts.trial_workers > 1:
        return {"cpu": DRIVER_CPUS, "gpu": 0.0}
    return {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial}
