"""Image folders streamed from disk: splits, errors, and training through the same engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.errors import UserError
from autoprune.imagefolder import FolderData, FolderSpec


def write_digits_folder(root: Path, per_class: int = 30, splits=("train",)) -> Path:
    """scikit-learn's 8x8 digits written as 16x16 PNGs under root/<split>/<class>/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    counts: dict[tuple[str, int], int] = {}
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        split = splits[i % len(splits)]
        if counts.get((split, label), 0) >= per_class:
            continue
        counts[(split, label)] = counts.get((split, label), 0) + 1
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(arr).resize((16, 16)).save(folder / f"{i}.png")
    return root


def spec(path: Path, **kw) -> FolderSpec:
    return FolderSpec(path=path, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
                      num_workers=kw.pop("num_workers", 0), **kw)


def test_missing_splits_are_carved_from_train_disjointly(tmp_path):
    data = FolderData(spec(write_digits_folder(tmp_path), val_fraction=0.2))
    assert data.info.num_classes == 10 and data.info.input_shape == (3, 16, 16)
    assert (data.train_size, len(data.val_set), len(data.test_set)) == (180, 60, 60)
    idx = [set(s.indices) for s in (data.train_set, data.val_set, data.test_set)]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    again = FolderData(spec(tmp_path, val_fraction=0.2))
    assert set(again.val_set.indices) == idx[1]  # seeded: every trial sees the same split


def test_given_splits_are_used_and_batches_stream(tmp_path):
    data = FolderData(spec(write_digits_folder(tmp_path, 10, ("train", "val", "test")),
                           num_workers=2))
    assert (data.train_size, len(data.val_set), len(data.test_set)) == (100, 100, 100)
    xs = list(data.batches(32, torch.Generator().manual_seed(0)))
    assert sum(x.shape[0] for x, _ in xs) == 100 and xs[0][0].shape == (32, 3, 16, 16)
    ev = list(data.eval_batches("test", 64))
    assert [x.shape[0] for x, _ in ev] == [64, 36]
    assert data.example().shape == (1, 3, 16, 16)


@pytest.mark.parametrize("make,needle", [
    (lambda r: r / "nope", "does not exist"),
    (lambda r: (r / "train").mkdir(parents=True) or r, "no class folders"),
    (lambda r: (r / "train" / "a").mkdir(parents=True) or r, "train"),
])
def test_bad_folders_are_one_line_errors(tmp_path, make, needle):
    with pytest.raises(UserError) as e:
        FolderData(spec(make(tmp_path)))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_split_with_other_classes_is_refused(tmp_path):
    write_digits_folder(tmp_path, 5, ("train", "val"))
    (tmp_path / "val" / "digit3").rename(tmp_path / "val" / "three")
    with pytest.raises(UserError, match="same class folders"):
        FolderData(spec(tmp_path))


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_names_the_file(tmp_path, workers):
    write_digits_folder(tmp_path, 5)
    bad = tmp_path / "train" / "digit0" / "broken.png"
    bad.write_bytes(b"not a png")
    data = FolderData(spec(tmp_path, val_fraction=0.01, num_workers=workers))
    data.val_set = data.test_set = data.train_set  # make every image pass through a loader
    with pytest.raises(UserError) as e:
        list(data.eval_batches("val", 8))
    assert "broken.png" in str(e.value) and "\n" not in str(e.value)


def test_engine_trains_on_streamed_data_like_in_memory(tmp_path):
    """The same loop trains either path; a tiny net learns the digits from PNGs."""
    from autoprune.engine import Recipe, evaluate_split, train

    data = FolderData(spec(write_digits_folder(tmp_path, 30), val_fraction=0.15))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    before = evaluate_split(model, data, "test")
    hist = train(model, data, Recipe(epochs=6, optimizer="adam", lr=0.01, batch_size=32,
                                     weight_decay=0.0), seed=0)
    assert len(hist) == 6 and hist[-1]["loss"] < hist[0]["loss"]
    assert evaluate_split(model, data, "test") > max(0.5, before + 0.3)


def test_in_memory_copy_holds_the_same_splits(tmp_path):
    data = FolderData(spec(write_digits_folder(tmp_path, 10), val_fraction=0.2))
    mem = data.in_memory()
    assert (mem.train_size, mem.val_x.shape[0], mem.test_x.shape[0]) == (60, 20, 20)
    x, y = next(data.eval_batches("test", 100))
    assert torch.equal(x, mem.test_x) and torch.equal(y, mem.test_y)


FOLDER_STUDY = """
name: folder-digits
model: {model}
dataset: imagefolder:{path}
data: {{val_fraction: 0.15, image_size: {size}, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25],
       num_workers: 1}}
dense: {{epochs: {epochs}, optimizer: adam, lr: 0.003, batch_size: 32, weight_decay: 0.0}}
prune: {{optimizer: adam, lr: 0.001, batch_size: 32, weight_decay: 0.0, schedule: constant}}
finetune: {{epochs: 1, optimizer: adam, lr: 0.001, batch_size: 32, weight_decay: 0.0}}
budget: params=0.5
trials: 2
"""


def folder_study(tmp_path: Path, model: str = "lenet-digits", size: int = 8,
                 epochs: int = 8) -> Path:
    folder = write_digits_folder(tmp_path / "digits", 30)
    path = tmp_path / "study.yaml"
    path.write_text(FOLDER_STUDY.format(model=model, path=folder, size=size, epochs=epochs))
    return path


def test_prune_runs_on_a_folder_study(tmp_path):
    """`dataset: imagefolder:PATH` works through `autoprune prune` like any built-in dataset."""
    import json
    import subprocess
    import sys

    study = folder_study(tmp_path)
    r = subprocess.run([sys.executable, "-m", "autoprune", "prune", "--study", str(study),
                        "--method", "magnitude", "--budget", "params=0.5", "--json",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["within_budget"] and m["params_frac"] <= 0.5 + 1e-9
    assert m["dense_test_accuracy"] > 0.5  # the dense model learned from the PNGs
    assert m["test_accuracy"] > 0.3


@pytest.mark.parametrize("data,fragment", [
    ({"image_size": 0}, "image_size"), ({"mean": [0.5]}, "mean"),
    ({"std": [1, 1, 0]}, "std"), ({"num_workers": -1}, "num_workers"),
])
def test_bad_folder_options_are_refused(data, fragment):
    from autoprune.study import study_from_dict

    d = {"model": "lenet-digits", "dataset": "imagefolder:/x", "data": data}
    with pytest.raises(UserError, match=fragment):
        study_from_dict(d, "s.yaml")


def test_a_batch_augmentation_on_a_folder_is_refused_at_load():
    """A folder trains with its own random-resized crops: a recipe's `augment` (whole-batch
    tensor transforms) is refused when the study loads, not in the middle of a search."""
    from autoprune.study import study_from_dict

    d = {"model": "lenet-digits", "dataset": "imagefolder:/x", "finetune": {"augment": "shift"}}
    with pytest.raises(UserError, match="finetune.augment"):
        study_from_dict(d, "s.yaml")
    with pytest.raises(UserError, match="in-memory"):
        next(iter(FolderData.__new__(FolderData).batches(8, torch.Generator(), augment="shift")))


def _rank_labels(rank: int, world: int, root: str, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        data = FolderData(spec(Path(root), val_fraction=0.2))
        ys = [y for _, y in data.batches(16, torch.Generator().manual_seed(3))]
        torch.save(ys, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_read_their_slice_of_each_global_batch(tmp_path):
    """In a data-parallel trial each rank decodes only its half of every batch that one worker
    would draw with the same seed (the engine slices in-memory batches the same way)."""
    import torch.multiprocessing as mp

    root = write_digits_folder(tmp_path / "d", 5)
    full = [y for _, y in FolderData(spec(root, val_fraction=0.2)).batches(
        16, torch.Generator().manual_seed(3))]
    mp.spawn(_rank_labels, args=(2, str(root), f"file://{tmp_path}/pg", str(tmp_path)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(full)
    for k, y in enumerate(full):
        assert torch.equal(ranks[0][k], y[0::2]) and torch.equal(ranks[1][k], y[1::2])
