"""Export of a search over `Study.custom` (the user's own model class and tensors): from the
trial checkpoint and the study's model object, through `autoprune.export(...)`.

The search is recorded as the orchestrator records it (Optuna study, trial checkpoint, MLflow
parent run), without running Ray: seconds, not minutes.
"""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from torch import nn

import autoprune
from autoprune.engine import evaluate
from autoprune.errors import UserError
from autoprune.export import CARD, load_exported
from autoprune.pipeline import Workbench
from autoprune.pruning.base import apply_masks, channel_masks
from autoprune.tracking import Tracker, default_tracking_uri


class UserNet(nn.Module):
    """A user's own convnet for 8x8 digits (not in the model zoo)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def searched(digits, tmp_path_factory):
    """A custom study whose trial 0 zeroed half the filters of conv1 and conv2."""
    torch.manual_seed(0)
    net = UserNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(2):  # a little training, so accuracies mean something
        for idx in torch.randperm(len(digits.train_y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(digits.train_x[idx]), digits.train_y[idx]).backward()
            opt.step()
    data = autoprune.data.from_tensors(train=(digits.train_x, digits.train_y),
                                       val=(digits.val_x, digits.val_y),
                                       test=(digits.test_x, digits.test_y))
    study = autoprune.Study.custom("user-net", model=net, data=data)
    out = tmp_path_factory.mktemp("runs")
    wb = Workbench.open(study, out, device="cpu")
    model = wb.fresh_model()
    graph, params = wb.accountant.graph, dict(model.named_parameters())
    with torch.no_grad():
        for layer, size in (("conv1", 8), ("conv2", 16)):
            keep = torch.arange(size) % 2 == 0
            apply_masks(model, channel_masks(graph, params, layer, keep))
    counts = wb.accountant.count(model)
    val = evaluate(model, wb.data.val_x, wb.data.val_y)
    test = evaluate(model, wb.data.test_x, wb.data.test_y)
    study_dir = out / study.name
    (study_dir / "checkpoints").mkdir(parents=True)
    ckpt = study_dir / "checkpoints" / "trial-0.pt"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, ckpt)
    ot = optuna.create_study(storage=f"sqlite:///{study_dir / 'optuna.db'}",
                             study_name=study.name, directions=["maximize", "minimize",
                                                                "minimize"])
    tracker = Tracker(default_tracking_uri(out), study.name)
    parent = tracker.start_search({"study": study.name}, "flops=0.9", wb.dense)
    ot.set_user_attr("mlflow_parent_run_id", parent)
    ot.add_trial(optuna.trial.create_trial(
        values=[val, counts.flops_frac, counts.params_frac], constraints={"budget": 0.0},
        user_attrs={"method": "manual-filters", "test_accuracy": test, "checkpoint": str(ckpt),
                    "hparams": "{}", "budget_violation": 0.0, "granularity": "filter"}))
    return study, out, test


def test_a_custom_study_exports_through_the_python_api(searched, digits, tmp_path):
    study, out, test = searched
    card = autoprune.export(out, study, tmp_path / "export")
    assert card["source"]["trial"] == 0 and card["model"] == "UserNet"
    assert card["exported"]["test_accuracy"] == test  # re-measured from the file
    assert card["exported"]["params"] < card["dense"]["params"]  # filters physically removed
    assert json.loads((tmp_path / "export" / CARD).read_text())["model"] == "UserNet"
    assert "autoprune.export(" in card["reproduce"]["export"] and "model=UserNet" in card["load"]
    loaded = load_exported(tmp_path / "export", model=UserNet())
    assert loaded.conv1.out_channels == 4 and loaded.conv2.out_channels == 8
    assert evaluate(loaded, digits.test_x, digits.test_y) == test
    with pytest.raises(UserError, match="export of your own model .*UserNet"):
        load_exported(tmp_path / "export")  # no code in the file: the class must be given


SCRIPT = '''
import torch
from torch import nn

import autoprune
from autoprune.data import load_dataset


class UserNet(nn.Module):
{body}

def study():
    net = UserNet()
    net.load_state_dict(torch.load({weights!r}, weights_only=True))
    d = load_dataset("digits", device="cpu")
    data = autoprune.data.from_tensors(train=(d.train_x, d.train_y), val=(d.val_x, d.val_y),
                                       test=(d.test_x, d.test_y))
    return autoprune.Study.custom("user-net", model=net, data=data)
'''


def test_a_custom_study_exports_through_the_cli(searched, tmp_path, capsys):
    """`autoprune export --study my_script.py:study`: the user's script builds the study."""
    import inspect

    from autoprune.cli import main

    study, out, test = searched
    weights = tmp_path / "dense.pt"
    torch.save(study.objects.module.state_dict(), weights)
    body = inspect.getsource(UserNet).split("\n", 2)[2]  # after the class line, docstring
    script = tmp_path / "my_study.py"
    script.write_text(SCRIPT.format(body=body, weights=str(weights)))
    rc = main(["export", "--out", str(out), "--study", f"{script}:study",
               "--to", str(tmp_path / "cli"), "--json"])
    card = json.loads(capsys.readouterr().out)
    assert rc == 0 and card["model"] == "UserNet"
    assert card["exported"]["test_accuracy"] == test
    assert main(["export", "--out", str(out), "--study", f"{script}:nothing",
                 "--to", str(tmp_path / "x")]) == 2
    assert "is not a Study" in capsys.readouterr().err
