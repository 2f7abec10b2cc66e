"""The Python API on the user's own objects: `Study.custom` with an `nn.Module` class defined in
this file and scikit-learn's digits as plain tensors, through `autoprune.search` (real Ray
workers, Optuna, MLflow) and `autoprune.prune`.

This module is not importable by Ray's workers (pytest puts tests/ on the driver's path only),
so the search also proves that a user's model class travels to the workers by value.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

import autoprune
from autoprune.budget import Budget
from autoprune.data import TensorData, from_tensors
from autoprune.dense import config_hash
from autoprune.errors import UserError
from autoprune.study import Study

ADAM = {"optimizer": "adam", "lr": 0.01, "batch_size": 64, "weight_decay": 0.0}
RECIPES = {"dense": {**ADAM, "epochs": 3},
           "prune": {**ADAM, "lr": 0.002, "schedule": "constant"},
           "finetune": {**ADAM, "lr": 0.002, "epochs": 1}}


class TinyNet(nn.Module):
    """A small convnet for 8x8 digits, defined here as a user would in their own script."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyNetAvg(TinyNet):
    """The same layers and shapes as TinyNet, another forward: must not share its baseline."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.avg_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum()) / len(y)


@pytest.fixture(scope="module")
def tensors():
    """Digits as a user would bring them: (train, test) pairs, standardised by the user."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


@pytest.fixture(scope="module")
def trained_net(tensors) -> TinyNet:
    """A model the user trained themselves, with a plain PyTorch loop."""
    (x, y), _ = tensors
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small trains fastest on one thread (on a busy host
    try:  # several threads cost 100x more)
        for _ in range(4):
            for idx in torch.randperm(len(y)).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net


def test_autoprune_search_stays_the_function_after_the_orchestration_is_imported():
    """The function `autoprune.search` and the subpackage (`autoprune.orchestration`) have two
    names: importing the subpackage never replaces the function (it once did, so a second
    `autoprune.search(...)` failed)."""
    importlib.import_module("autoprune.orchestration.orchestrator")
    assert callable(autoprune.search) and autoprune.search.__module__ == "autoprune"
    assert not (Path(autoprune.__file__).parent / "search").exists()  # no module of that name


def test_search_on_a_user_model_class_and_tensors(ray_session, tmp_path, tensors, tiny_space):
    data = autoprune.data.from_tensors(train=tensors[0], test=tensors[1], val_fraction=0.1,
                                       seed=0)
    study = autoprune.Study.custom("tiny-search", model=TinyNet, data=data, **RECIPES)
    summary = autoprune.search(study, budget="flops=0.5", trials=4, workers=2,
                               space=tiny_space, out=str(tmp_path), finalists=0)

    assert summary["errors"] == [] and summary["trials_completed"] == 4, summary["errors"]
    assert summary["dense"]["test_accuracy"] > 0.8  # the factory's model was dense-trained
    assert summary["best"]["rerun"] is None  # no command line can name a study made in Python
    assert len(list((tmp_path / "dense").glob("tiny-search-*.pt"))) == 1  # and cached once
    budget = Budget.parse("flops=0.5")
    ot = optuna.load_study(study_name="tiny-search",
                           storage=f"sqlite:///{tmp_path / 'tiny-search' / 'optuna.db'}")
    complete = [t for t in ot.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    for t in complete:
        fracs = {k: t.user_attrs[f"{k}_frac"] for k in ("flops", "params")}
        assert budget.satisfied(fracs)

    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name("tiny-search")
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(summary["parent_run_id"])
    params = parent.data.params
    assert params["model"] == "TinyNet"
    assert params["model_class"] == f"{TinyNet.__module__}.TinyNet"
    assert params["dataset"] == "custom"
    assert (params["data_train"], params["data_val"], params["data_test"]) == (
        str(len(data.train_y)), str(len(data.val_y)), str(len(data.test_y)))
    assert params["data_input_shape"] == "1x8x8"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)


def test_prune_uses_a_trained_module_as_its_dense_baseline(tmp_path, tensors, trained_net):
    (x, y), (xt, yt) = tensors
    before = {k: v.clone() for k, v in trained_net.state_dict().items()}
    study = autoprune.Study.custom("tiny-given", model=trained_net,
                                   data={"train": (x, y), "test": (xt, yt)}, **RECIPES)
    expected = accuracy(trained_net, xt, yt)
    wanted = {"conv1": 0.25, "conv2": 0.5, "fc1": 0.75}
    m = autoprune.prune(study, "magnitude", "params=0.5", out=tmp_path,
                        layer_sparsity=",".join(f"{k}={v}" for k, v in wanted.items()),
                        params={"epochs": 0})

    assert m["dense_test_accuracy"] == expected > 0.8
    assert not list(tmp_path.rglob("*.pt"))  # no dense training, nothing cached
    assert m["layer_sparsity"] == {**wanted, "fc2": 0.0}
    assert m["test_accuracy"] > 0.5
    after = trained_net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's module untouched


def test_train_dense_trains_a_given_module_from_its_weights_once(tmp_path, tensors):
    torch.manual_seed(3)
    net = TinyNet()
    untrained = accuracy(net, tensors[1][0], tensors[1][1])
    study = Study.custom("tiny-train", model=net, data=tensors, train_dense=True, **RECIPES)
    first = autoprune.prune(study, "magnitude", "sparse_flops=0.6", out=tmp_path,
                            params={"epochs": 0})
    cached = list((tmp_path / "dense").glob("*.pt"))
    assert len(cached) == 1 and first["dense_test_accuracy"] > max(0.8, untrained)
    stamp = cached[0].stat().st_mtime_ns
    second = autoprune.prune(study, "magnitude", "sparse_flops=0.6", out=tmp_path,
                             params={"epochs": 0})
    assert second["dense_test_accuracy"] == first["dense_test_accuracy"]
    assert cached[0].stat().st_mtime_ns == stamp  # read back, not retrained


def test_dense_cache_key_tells_user_models_and_data_apart(tensors):
    data = from_tensors(*tensors)

    def key(model, d: TensorData = data, **kw) -> str:
        return config_hash(Study.custom("k", model=model, data=d, **kw).key_config())

    torch.manual_seed(0)
    net_a, net_b = TinyNet(), TinyNet()
    changed = from_tensors(*tensors)
    changed.train_x[0, 0, 0, 0] += 1.0
    keys = [key(TinyNet), key(lambda: TinyNet(width=16)), key(TinyNetAvg), key(net_a),
            key(net_b), key(net_a, train_dense=True), key(TinyNet, changed),
            key(TinyNet, dense={"epochs": 5})]
    assert len(set(keys)) == len(keys)
    assert key(TinyNet) == key(lambda: TinyNet()) and key(net_a) == key(net_a)
    assert Study.custom("s", TinyNet, data).fingerprint() != \
        Study.custom("s", TinyNetAvg, data).fingerprint()


class NoPrunable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def _bad_factory() -> nn.Module:
    raise RuntimeError("no weights here")


# id -> (the arguments that differ from a good call, given (x, y, x_test, y_test); words)
CASES = {
    "model-type": (lambda x, y, xt, yt: {"model": 42}, "must be a torch nn.Module"),
    "factory-returns": (lambda x, y, xt, yt: {"model": lambda: "a net"},
                        "returned str, not a torch nn.Module"),
    "factory-raises": (lambda x, y, xt, yt: {"model": _bad_factory},
                       "raised RuntimeError: no weights here"),
    "factory-untrained": (lambda x, y, xt, yt: {"model": TinyNet, "train_dense": False},
                          "always trained"),
    "no-prunable": (lambda x, y, xt, yt: {"model": NoPrunable()}, "no Conv or Linear"),
    "wrong-input": (lambda x, y, xt, yt: {"model": nn.Linear(100, 10)},
                    "cannot run on inputs of shape"),
    "too-few-classes": (lambda x, y, xt, yt: {"model": TinyNet(classes=5)},
                        "outputs 5 classes"),
    "lengths": (lambda x, y, xt, yt: {"data": {"train": (x, y[:-1]), "test": (xt, yt)}},
                "inputs but"),
    "float-labels": (lambda x, y, xt, yt: {"data": {"train": (x, y.float()), "test": (xt, yt)}},
                     "integer class ids"),
    "one-hot": (lambda x, y, xt, yt: {"data": {"train": (x, nn.functional.one_hot(y)),
                                               "test": (xt, yt)}}, "1-D tensor"),
    "negative-labels": (lambda x, y, xt, yt: {"data": {"train": (x, y - 1), "test": (xt, yt)}},
                        ">= 0"),
    "uint8-inputs": (lambda x, y, xt, yt: {"data": {"train": ((x * 10).to(torch.uint8), y),
                                                    "test": (xt, yt)}},
                     "floating point and already normalised"),
    "nan-inputs": (lambda x, y, xt, yt: {"data": {"train": (torch.full_like(x, float("nan")), y),
                                                  "test": (xt, yt)}}, "NaN"),
    "shapes": (lambda x, y, xt, yt: {"data": {"train": (x, y), "test": (xt[:, :, :4], yt)}},
               "per example"),
    "list-inputs": (lambda x, y, xt, yt: {"data": {"train": (x.tolist(), y), "test": (xt, yt)}},
                    "torch tensor or a NumPy array"),
    "data-type": (lambda x, y, xt, yt: {"data": "digits"}, "data must be a TensorData"),
    "data-keys": (lambda x, y, xt, yt: {"data": {"train": (x, y)}},
                  "needs keys 'train' and 'test'"),
    "val-fraction": (lambda x, y, xt, yt: {"val_fraction": 1.5}, "val_fraction"),
    "name": (lambda x, y, xt, yt: {"name": "my study/1"}, "study name"),
    "recipe": (lambda x, y, xt, yt: {"finetune": {"epochz": 1}},
               "'finetune': unknown recipe key(s): epochz"),
    "budget": (lambda x, y, xt, yt: {"budget": "flops=2"}, "must be a fraction"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_objects_are_one_line_user_errors(case, tensors):
    (x, y), (xt, yt) = tensors
    make, words = CASES[case]
    args = {"name": "bad", "model": TinyNet, "data": tensors, **make(x, y, xt, yt)}
    with pytest.raises(UserError) as err:
        Study.custom(args.pop("name"), args.pop("model"), args.pop("data"), **args)
    message = str(err.value)
    assert words in message and "\n" not in message
