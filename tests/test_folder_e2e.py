"""A user's image folder end to end: search, export, reload; ResNet-18's ImageNet study on a
tiny synthetic stand-in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK_SPACE
from test_imagefolder import FOLDER_STUDY, write_digits_folder


def test_search_then_export_reproduces_on_the_folder(ray_session, tmp_path, capsys):
    """`autoprune search` on `imagefolder:PATH` with torchvision's ResNet-18, then `export`:
    the reloaded export scores the recorded test accuracy on the folder's test split."""
    from autoprune.cli import main
    from autoprune.cli.export import main_for_tests
    from autoprune.engine import evaluate_split
    from autoprune.export import load_exported
    from autoprune.imagefolder import FolderData, FolderSpec

    folder = write_digits_folder(tmp_path / "digits", 25)
    study = tmp_path / "study.yaml"
    study.write_text(FOLDER_STUDY.format(model="torchvision:resnet18", path=folder, size=32,
                                         epochs=2))
    space = tmp_path / "space.yaml"
    space.write_text(QUICK_SPACE)
    out = tmp_path / "out"
    rc = main(["search", "--study", str(study), "--space", str(space), "--trials", "2",
               "--workers", "1", "--finalists", "0", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials_completed"] == 2 and summary["trials_failed"] == 0
    best = summary["best"]
    assert best["params_frac"] <= 0.5 + 1e-9  # the study's budget held

    rc = main_for_tests(["--out", str(out), "--study", str(study), "--to", str(tmp_path / "x"),
                         "--json"])
    assert rc == 0, capsys.readouterr().err
    card = json.loads(capsys.readouterr().out)
    assert card["num_classes"] == 10 and card["input_shape"] == [3, 32, 32]
    model = load_exported(tmp_path / "x")
    data = FolderData(FolderSpec(path=folder, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                                 val_fraction=0.15, num_workers=0))
    acc = evaluate_split(model, data, "test")
    assert acc == pytest.approx(card["exported"]["test_accuracy"], abs=1e-9)
    assert acc == pytest.approx(card["pruned"]["test_accuracy"], abs=1e-9)
    assert card["source"]["trial"] == best["trial"]


def test_resnet18_imagenet_study_runs_on_a_stand_in(tmp_path):
    """The built-in `resnet18-imagenet` study reads <data-root>/imagenet/<split>/<class>/* and
    prunes from a given dense checkpoint; the class count comes from the folder."""
    from autoprune.models import build_model

    root = tmp_path / "data"
    write_digits_folder(root / "imagenet", 3, ("train", "val", "test"))
    for split in ("train", "val", "test"):  # three classes keep it small
        for d in (root / "imagenet" / split).iterdir():
            if d.name not in ("digit0", "digit1", "digit2"):
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
    torch.manual_seed(0)
    dense = tmp_path / "dense.pt"
    torch.save(build_model("torchvision:resnet18", 3, 3, 224).state_dict(), dense)
    r = subprocess.run([sys.executable, "-m", "autoprune", "prune", "--study",
                        "resnet18-imagenet", "--data-root", str(root), "--method", "magnitude",
                        "--set", "gradual=false", "--set", "epochs=0", "--set",
                        "granularity=filter", "--finetune", "epochs=1",
                        "--dense-checkpoint", str(dense), "--budget", "flops=0.5", "--json",
                        "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["within_budget"] and m["flops_frac"] <= 0.5 + 1e-9
    assert 0.0 <= m["test_accuracy"] <= 1.0


def test_export_architecture_takes_the_class_count_from_the_model(tmp_path):
    """A folder's class count is not known from its name: the export reads it off the model."""
    from autoprune.export.checkpoint import _architecture
    from autoprune.models import build_model
    from autoprune.study import study_from_dict

    study = study_from_dict({"model": "torchvision:resnet18",
                             "dataset": f"imagefolder:{tmp_path}",
                             "data": {"image_size": 32}}, "s.yaml")
    model = build_model("torchvision:resnet18", 7, 3, 32)
    arch = _architecture(study, torch.zeros(1, 3, 32, 32), model)
    assert (arch["num_classes"], arch["image_size"]) == (7, 32)
    assert Path(tmp_path).exists()
