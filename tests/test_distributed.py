"""Trials beyond one process: in-memory data shared through Ray's object store."""

from __future__ import annotations

import torch

from autoprune.data import DATASETS, TensorData


def _fake_mnist() -> TensorData:
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(n, 1, 28, 28, generator=g) for n in (64, 16, 16)]
    y = [torch.randint(0, 10, (n,), generator=g) for n in (64, 16, 16)]
    return TensorData(DATASETS["mnist"], x[0], y[0], x[1], y[1], x[2], y[2])


def test_shared_data_round_trips_through_the_object_store(ray_session):
    from autoprune.orchestration.distributed import fetch_data, share_data

    data = _fake_mnist()
    shared = share_data(data)
    back = fetch_data(shared)
    assert back.info == data.info
    for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(back, k), getattr(data, k))


def test_trial_workbench_uses_the_shared_data_not_the_disk(ray_session, tmp_path):
    """A trial given the driver's data opens its workbench with no data files at all."""
    from autoprune.models import build_model
    from autoprune.orchestration.distributed import share_data
    from autoprune.orchestration.space import SearchSpace
    from autoprune.orchestration.trial import TrialContext, workbench
    from autoprune.paths import SPACES_DIR
    from autoprune.study import load_study

    data = _fake_mnist()
    dense = tmp_path / "dense.pt"
    torch.manual_seed(0)
    torch.save(build_model("lenet5", 10, 1, 28).state_dict(), dense)
    ctx = TrialContext(study=load_study("lenet5-mnist"),
                       space=SearchSpace.load(SPACES_DIR / "default.yaml"), out=str(tmp_path),
                       study_dir=str(tmp_path / "s"), budget="flops=0.5",
                       data_root=str(tmp_path / "no-data-here"), seed=0, cpus=1,
                       checkpoint=str(dense), shared_data=share_data(data))
    wb = workbench(ctx)
    assert wb.data.train_size == 64 and torch.equal(wb.data.test_x, data.test_x)
