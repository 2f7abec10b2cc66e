"""Export: compact weights-only checkpoint, ONNX, model card, reload check, MLflow registry.

Everything runs for real on the digits study (dense baseline trained once per module, about 3 s),
with a real Optuna SQLite study and a real MLflow SQLite store in a temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import pytest
import torch
from torch import nn

from autoprune.cli.export import main_for_tests
from autoprune.engine import evaluate
from autoprune.errors import UserError
from autoprune.export import (
    CARD,
    CHECKPOINT,
    ONNX,
    export_best,
    export_model,
    load_exported,
    pack_state,
    removed_channels,
    save_checkpoint,
    unpack_state,
)
from autoprune.flops import count_dense
from autoprune.graph import build_channel_graph
from autoprune.models import build_model
from autoprune.names import TAG_TRIAL
from autoprune.pipeline import Workbench, run_pruning
from autoprune.pruning.base import apply_masks, channel_masks
from autoprune.pruning.compaction import compact
from autoprune.study import load_study
from autoprune.tracking import Tracker, default_tracking_uri

STUDY = "digits-lenet"
# Filters zeroed per free layer in the structured case (of 16, 32, 64).
STRUCTURED_REMOVED = {"conv1": 10, "conv2": 19, "fc1": 38}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def wb(out) -> Workbench:
    return Workbench.open(load_study(STUDY), out)


@pytest.fixture(scope="module")
def dense_bytes(wb, tmp_path_factory) -> int:
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    torch.save(wb.dense_state, path)
    return path.stat().st_size


@pytest.fixture(scope="module")
def unstructured(wb):
    """Magnitude pruning to 80 % of every layer's weights, fine-tuned with masks."""
    return run_pruning(wb, "magnitude", {}, {layer: 0.8 for layer in wb.layers})


def _zero_filters(wb: Workbench, removed: dict[str, int], seed: int = 0) -> nn.Module:
    model = wb.fresh_model()
    graph = wb.accountant.graph
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, n in removed.items():
            size = graph.group_of[layer].size
            keep = torch.ones(size, dtype=torch.bool)
            keep[torch.randperm(size, generator=gen)[:n]] = False
            apply_masks(model, channel_masks(graph, params, layer, keep))
    return model


@pytest.fixture(scope="module")
def structured(wb):
    """Whole filters zeroed in every free layer (their biases with them): a filter-pruned model."""
    model = _zero_filters(wb, STRUCTURED_REMOVED)
    counts = wb.accountant.count(model)
    metrics = {"method": "manual-filters", "granularity": "filter",
               "val_accuracy": evaluate(model, wb.data.val_x, wb.data.val_y),
               "test_accuracy": evaluate(model, wb.data.test_x, wb.data.test_y),
               "flops_frac": counts.flops_frac, "params_frac": counts.params_frac}
    return model, metrics


def _export(wb, model, metrics, to: Path) -> dict:
    return export_model(model, wb.study, wb.data.example(), to, metrics=metrics, dense=wb.dense,
                        source={"test": True}, data=wb.data)


@pytest.fixture(scope="module")
def unstructured_export(wb, unstructured, tmp_path_factory):
    to = tmp_path_factory.mktemp("unstructured")
    return to, _export(wb, *unstructured, to)


@pytest.fixture(scope="module")
def structured_export(wb, structured, tmp_path_factory):
    to = tmp_path_factory.mktemp("structured")
    return to, _export(wb, *structured, to)


# ---- checkpoint format -----------------------------------------------------------------------

def test_pack_state_is_sparse_below_half_density_and_exact():
    gen = torch.Generator().manual_seed(0)
    sparse_t = torch.randn(40, 30, generator=gen) * (torch.rand(40, 30, generator=gen) > 0.7)
    dense_t = torch.randn(40, 30, generator=gen) * (torch.rand(40, 30, generator=gen) > 0.3)
    state = {"a": sparse_t, "b": dense_t, "n": torch.tensor(7), "tiny": torch.zeros(3)}
    dense, sparse = pack_state(state)
    assert set(sparse) == {"a"} and set(dense) == {"b", "n", "tiny"}
    assert sparse["a"]["indices"].dtype == torch.int32
    assert sparse["a"]["values"].numel() == int((sparse_t != 0).sum())
    back = unpack_state(dense, sparse)
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v)
    sparse["a"]["indices"][0] = 40 * 30  # out of range
    with pytest.raises(UserError, match="malformed"):
        unpack_state(dense, sparse)


def test_resnet_roundtrip_with_coupled_groups_and_an_emptied_layer(tmp_path):
    """Residual-coupled channels, BatchNorm statistics, and a layer whose filters are all dead
    (compaction keeps one zero channel there): the reloaded model equals the compacted one."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 16).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 16, 16)
    graph = build_channel_graph(model, x[:1])
    coupled = next(g for g in graph.groups if g.coupled and g.removable)
    free = graph.free_layers()
    params = dict(model.named_parameters())
    plan = {coupled.layers[0]: 5, free[0]: 7, free[1]: graph.group_of[free[1]].size}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer, n in plan.items():
            size = graph.group_of[layer].size
            keep = torch.ones(size, dtype=torch.bool)
            keep[torch.randperm(size, generator=gen)[:n]] = False
            apply_masks(model, channel_masks(graph, params, layer, keep))
    compacted = compact(model, x[:1], graph)
    removed = removed_channels(model, x[:1], graph)
    assert {graph.group_of[k].root: v for k, v in plan.items()} == \
        {k: len(v) for k, v in removed.items()}
    arch = {"model": "resnet20", "dataset": "cifar10", "num_classes": 10, "in_channels": 3,
            "image_size": 16, "input_shape": [3, 16, 16]}
    save_checkpoint(compacted, arch, removed, tmp_path / CHECKPOINT)
    loaded = load_exported(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(x), compacted.eval()(x), atol=0, rtol=0)
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert count_dense(loaded, x) == count_dense(compacted, x)
    emptied = loaded.get_submodule(free[1])
    assert emptied.out_channels == 1 and not bool(emptied.weight.any())
    kept = loaded.get_submodule(free[0])
    assert kept.out_channels == graph.group_of[free[0]].size - 7


def test_checkpoint_is_weights_only_and_sparse(unstructured_export):
    to, _ = unstructured_export
    obj = torch.load(to / CHECKPOINT, weights_only=True)
    assert obj["format"] == "autoprune-export" and obj["model"] == "lenet-digits"
    assert obj["input_shape"] == [1, 8, 8]
    # 80 % zeros: every prunable weight large enough is stored as indices + values
    assert {"conv2.weight", "fc1.weight", "fc2.weight", "conv1.weight"} <= set(obj["sparse"])


def test_load_exported_rejects_what_is_not_an_export(tmp_path, wb):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="not a readable weights-only checkpoint"):
        load_exported(junk)
    plain = tmp_path / "plain.pt"
    torch.save(wb.dense_state, plain)
    with pytest.raises(UserError, match="not an autoprune export"):
        load_exported(plain)
    with pytest.raises(UserError, match="not found"):
        load_exported(tmp_path / "missing")


# ---- exports of pruned digits models ---------------------------------------------------------

def test_unstructured_export_reproduces_the_model(wb, unstructured, unstructured_export,
                                                  dense_bytes):
    model, metrics = unstructured
    to, card = unstructured_export
    loaded = load_exported(to)
    assert evaluate(loaded, wb.data.test_x, wb.data.test_y) == metrics["test_accuracy"]
    assert card["exported"]["test_accuracy"] == metrics["test_accuracy"]
    with torch.no_grad():
        assert torch.allclose(loaded(wb.data.test_x), model.eval()(wb.data.test_x), atol=1e-5)
    # zeros survive the sparse storage: the same nonzero weights as the masked model
    nz = {n: int((p != 0).sum()) for n, p in model.named_parameters()}
    assert {n: int((p != 0).sum()) for n, p in loaded.named_parameters()} == nz
    size = (to / CHECKPOINT).stat().st_size
    assert size < 0.6 * dense_bytes, (size, dense_bytes)
    assert card["files"][CHECKPOINT] == size
    assert card["dense_checkpoint_bytes"] == pytest.approx(dense_bytes, rel=0.02)


def test_structured_export_is_physically_smaller(wb, structured, structured_export,
                                                 dense_bytes):
    model, metrics = structured
    to, card = structured_export
    loaded = load_exported(to)
    assert evaluate(loaded, wb.data.test_x, wb.data.test_y) == metrics["test_accuracy"]
    assert loaded.conv1.out_channels == 16 - STRUCTURED_REMOVED["conv1"]
    assert loaded.conv2.weight.shape == (32 - STRUCTURED_REMOVED["conv2"],
                                         16 - STRUCTURED_REMOVED["conv1"], 3, 3)
    assert loaded.fc1.out_features == 64 - STRUCTURED_REMOVED["fc1"]
    assert loaded.fc1.in_features == 4 * (32 - STRUCTURED_REMOVED["conv2"])
    macs, params = count_dense(loaded, wb.data.example())
    assert (macs, params) == count_dense(compact(model, wb.data.example()), wb.data.example())
    assert (card["exported"]["flops"], card["exported"]["params"]) == (macs, params)
    # only whole channels were zeroed: mask-aware counts equal the compacted model's
    counts = wb.accountant.count(model)
    assert params == counts.params and macs == pytest.approx(counts.macs)
    assert card["exported"]["removed_channels"] == STRUCTURED_REMOVED
    assert (to / CHECKPOINT).stat().st_size < 0.5 * dense_bytes


@pytest.mark.parametrize("which", ["unstructured_export", "structured_export"])
def test_onnx_matches_torch_with_a_dynamic_batch(wb, which, request):
    to, _ = request.getfixturevalue(which)
    loaded = load_exported(to)
    sess = ort.InferenceSession(str(to / ONNX), providers=["CPUExecutionProvider"])
    for n in (1, 37):
        x = wb.data.test_x[:n]
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, loaded(x).numpy(), atol=1e-4)


def test_model_card(structured_export, structured):
    to, card = structured_export
    assert json.loads((to / CARD).read_text()) == json.loads(json.dumps(card, default=float))
    assert card["study"] == STUDY and card["model"] == "lenet-digits"
    assert card["method"] == "manual-filters"
    # dense LeNet-digits MACs by hand: conv1 8*8*16*9, conv2 4*4*32*16*9, fc1 128*64, fc2 64*10
    assert card["dense"]["flops"] == 9216 + 73728 + 8192 + 640
    assert card["dense"]["params"] == sum(p.numel() for p in structured[0].parameters())
    assert card["pruned"]["test_accuracy"] == structured[1]["test_accuracy"]
    # re-measured from the exported file: the recorded accuracies, val and test
    assert card["exported"]["test_accuracy"] == structured[1]["test_accuracy"]
    assert card["exported"]["val_accuracy"] == structured[1]["val_accuracy"]
    assert set(card["fractions"]) == {"flops", "sparse_flops", "params", "weights"}
    assert card["fractions"]["flops"] < 1 and card["fractions"]["weights"] < 1
    md = (to / "model_card.md").read_text()
    assert "manual-filters" in md and "| test |" in md and "conv1" in md
    assert f"{structured[1]['test_accuracy']:.4f}" in md
    lat = card["latency_cpu"]
    assert lat["threads"] == 2
    assert all(lat[k] > 0 for k in ("dense_batch1_ms", "dense_batch32_ms",
                                    "exported_batch1_ms", "exported_batch32_ms"))
    assert card["files"][ONNX] == (to / ONNX).stat().st_size
    assert card["exported"]["onnx_max_abs_diff"] < 1e-4
    assert card["exported"]["accuracy_check"]["tolerance"] == 1e-6  # CPU: same predictions
    assert "torch" in card["versions"] and "autoprune" in card["versions"]


def test_accuracy_mismatch_is_refused(wb, structured, tmp_path):
    model, metrics = structured
    wrong = {**metrics, "test_accuracy": metrics["test_accuracy"] + 1 / len(wb.data.test_y)}
    with pytest.raises(UserError, match="exported model's test accuracy .* differs from the "
                                        "recorded"):
        export_model(model, wb.study, wb.data.example(), tmp_path, metrics=wrong,
                     dense=wb.dense, source={}, data=wb.data, latency=False)


# ---- export_best: a recorded search, the registry --------------------------------------------

@pytest.fixture(scope="module")
def search(out, wb, unstructured, structured):
    """A search as the orchestrator records it: Optuna study, trial checkpoints, MLflow runs.

    Trial 0: unstructured (higher accuracy); trial 1: structured (fewer FLOPs, no MLflow run);
    trial 2: the most accurate of all but over budget (infeasible), with no checkpoint.
    """
    study_dir = out / STUDY
    ckpts = study_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    ot = optuna.create_study(storage=f"sqlite:///{study_dir / 'optuna.db'}", study_name=STUDY,
                             directions=["maximize", "minimize", "minimize"])
    uri = default_tracking_uri(out)
    tracker = Tracker(uri, STUDY)
    parent = tracker.start_search({"study": STUDY}, "flops=0.4", wb.dense)
    ot.set_user_attr("mlflow_parent_run_id", parent)
    runs = {}
    for n, (model, m) in enumerate((unstructured, structured)):
        ckpt = ckpts / f"trial-{n}.pt"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, ckpt)
        ot.add_trial(optuna.trial.create_trial(
            values=[m["val_accuracy"], m["flops_frac"], m["params_frac"]],
            constraints={"budget": 0.0},
            user_attrs={"method": m["method"], "test_accuracy": m["test_accuracy"],
                        "checkpoint": str(ckpt), "hparams": "{}", "budget_violation": 0.0,
                        "granularity": m.get("granularity")}))
        if n == 0:
            runs[n] = tracker.log_trial(parent, n, m["method"], {}, {
                k: m[k] for k in ("val_accuracy", "test_accuracy", "flops_frac",
                                  "params_frac")})
    ot.add_trial(optuna.trial.create_trial(
        values=[0.999, 0.5, 0.5], constraints={"budget": 0.1},
        user_attrs={"method": "magnitude", "test_accuracy": 0.999, "budget_violation": 0.1,
                    "checkpoint": str(ckpts / "trial-2.pt"), "hparams": "{}"}))
    assert structured[1]["flops_frac"] < unstructured[1]["flops_frac"]
    assert structured[1]["val_accuracy"] < unstructured[1]["val_accuracy"]
    return {"uri": uri, "runs": runs, "parent": parent}


def test_export_best_registers_the_most_accurate_point(out, wb, unstructured, search, tmp_path,
                                                       monkeypatch):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    card = export_best(out, STUDY, tmp_path / "best", pick="max-accuracy")
    assert card["source"]["trial"] == 0 and card["run_id"] == search["runs"][0]
    assert card["exported"]["test_accuracy"] == unstructured[1]["test_accuracy"]
    client = MlflowClient(search["uri"], registry_uri=search["uri"])
    mv = client.get_model_version_by_alias(STUDY, "best")
    assert (int(mv.version), mv.run_id) == (card["version"], search["runs"][0])
    assert card["model_uri"] == f"models:/{STUDY}@best"
    # models:/ URIs resolve through the registry of the environment, as a user's would
    monkeypatch.setenv("MLFLOW_TRACKING_URI", search["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", search["uri"])
    local = download_artifacts(artifact_uri=f"models:/{STUDY}@best",
                               dst_path=str(tmp_path / "dl"))
    assert sorted(p.name for p in Path(local).iterdir()) == sorted(
        [CARD, CHECKPOINT, ONNX, "model_card.md"])
    loaded = load_exported(local)
    assert evaluate(loaded, wb.data.test_x, wb.data.test_y) == unstructured[1]["test_accuracy"]


def test_export_best_min_flops_via_cli_makes_a_run_and_moves_the_alias(out, search, structured,
                                                                       tmp_path, capsys):
    from mlflow import MlflowClient

    rc = main_for_tests(["--out", str(out), "--study", STUDY, "--to", str(tmp_path / "small"),
                         "--pick", "min-flops", "--json"])
    assert rc == 0
    card = json.loads(capsys.readouterr().out)
    assert card["source"]["trial"] == 1 and card["method"] == "manual-filters"
    client = MlflowClient(search["uri"], registry_uri=search["uri"])
    mv = client.get_model_version_by_alias(STUDY, "best")
    assert int(mv.version) == card["version"] >= 2
    # trial 1 had no MLflow run: one tagged with its number was made for the export
    run = client.get_run(mv.run_id)
    assert run.data.tags[TAG_TRIAL] == "1" and mv.run_id not in search["runs"].values()
    assert card["exported"]["params"] < card["dense"]["params"]


def test_export_best_budget_selects_and_refuses(out, search, tmp_path, capsys):
    with pytest.raises(UserError, match="no recorded point meets budget flops=0.05"):
        export_best(out, STUDY, tmp_path / "x", budget="flops=0.05")
    rc = main_for_tests(["--out", str(out), "--study", STUDY, "--to", str(tmp_path / "x"),
                         "--budget", "flops=0.05"])
    assert rc == 2 and "no recorded point meets budget" in capsys.readouterr().err


def test_export_best_without_a_search(tmp_path):
    with pytest.raises(UserError, match="no search of study 'digits-lenet'"):
        export_best(tmp_path, STUDY, tmp_path / "x")
