"""Export a pruned model for deployment: compact checkpoint, ONNX, model card, registry entry.

A search leaves masked models: dense shapes full of zeros, as slow and as large as the dense
net. Export turns one of them into what a user ships:

- `model.pt`, readable with `torch.load(weights_only=True)` (tensors, numbers, strings, lists,
  dicts; never pickled code). Dead channels are physically removed (`compaction.compact`); the
  file records the dense architecture by name, the input shape and, per channel group, the
  removed channel indices, so `load_exported` rebuilds the same compacted module from the model
  zoo. Unstructured zeros left inside the kept tensors are stored sparsely (flat int32 indices
  plus values) wherever that is smaller, so the file shrinks with unstructured sparsity too.
- `model.onnx` of the compacted model, with a dynamic batch dimension.
- `model_card.json`: what was pruned how, accuracy and cost before and after, measured CPU
  latency, provenance and versions.

Export re-loads what it wrote and re-evaluates it on the test set: a card whose accuracy the
shipped file does not reproduce is refused (`UserError`), so a card can be trusted as written.
`export_best` picks a recorded search trial (by accuracy or FLOPs, under an optional budget),
exports it and registers it in the MLflow Model Registry under the study's name, alias `best`.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import TensorData, dataset_info, load_dataset
from .engine import evaluate
from .errors import UserError
from .flops import Accountant, count_dense
from .graph import build_channel_graph
from .models import build_model
from .pruning.base import apply_masks, channel_masks
from .study import Study, load_study

FORMAT = "autoprune-export"
FORMAT_VERSION = 1
CHECKPOINT = "model.pt"
ONNX = "model.onnx"
CARD = "model_card.json"
# A nonzero stored sparsely costs an index (4 bytes) and a value: below half density it is
# smaller than the dense tensor. Tiny tensors stay dense (the saving would not pay the record).
SPARSE_BELOW_DENSITY = 0.5
SPARSE_MIN_NUMEL = 64
# The recorded and the re-evaluated accuracy must agree to this (i.e. the same predictions):
# measured on CPU, masked and compacted models agree to ~1e-6 in the logits and make identical
# predictions. On CUDA `engine.evaluate` runs under bf16 autocast, where removing zero channels
# changes which kernel sums what, and a bf16 rounding can flip a near-tie: there a small
# fraction of the test set may differ (an estimate; not measured on a GPU yet).
ACCURACY_TOLERANCE = 1e-6
BF16_TOLERANCE = 0.002
LATENCY_THREADS = 2
PICKS = ("max-accuracy", "min-flops")
REGISTRY_ALIAS = "best"
ARTIFACT_DIR = "export"


# ---- the checkpoint --------------------------------------------------------------------------

def pack_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Split a state dict into dense tensors and sparse records {shape, indices, values}.

    Every tensor is copied to a compact CPU storage: `torch.save` writes a view's whole
    underlying storage, which would undo the saving.
    """
    dense: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict] = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point() and t.numel() >= SPARSE_MIN_NUMEL:
            flat = t.reshape(-1)
            idx = flat.nonzero().flatten()
            if idx.numel() < SPARSE_BELOW_DENSITY * flat.numel():
                itype = torch.int32 if flat.numel() < 2**31 else torch.int64
                sparse[name] = {"shape": list(t.shape), "indices": idx.to(itype),
                                "values": flat[idx].clone()}
                continue
        dense[name] = t.clone().contiguous()
    return dense, sparse


def unpack_state(dense: dict[str, torch.Tensor], sparse: dict[str, dict],
                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Inverse of `pack_state`: the full state dict, with zeros restored."""
    state = dict(dense)
    for name, rec in sparse.items():
        try:
            shape = [int(s) for s in rec["shape"]]
            idx, values = rec["indices"].long(), rec["values"]
            numel = 1
            for s in shape:
                numel *= s
            if idx.numel() != values.numel() or (idx.numel() and
                                                 (int(idx.min()) < 0 or int(idx.max()) >= numel)):
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"{source}: sparse tensor '{name}' is malformed") from None
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[idx] = values
        state[name] = flat.reshape(shape)
    return state


def removed_channels(model: nn.Module, example: torch.Tensor, graph=None) -> dict[str, list[int]]:
    """Per channel-group root, the dense indices of the dead channels that compaction removes."""
    graph = graph or build_channel_graph(model, example[:1])
    params = {n: p.detach() for n, p in model.named_parameters()}
    dead = graph.dead_channels(params)
    return {root: d.nonzero().flatten().tolist() for root, d in dead.items() if bool(d.any())}


def _architecture(study: Study, example: torch.Tensor) -> dict[str, Any]:
    info = dataset_info(study.dataset)
    return {"model": study.model, "dataset": study.dataset, "num_classes": info.num_classes,
            "in_channels": info.in_channels, "image_size": info.image_size,
            "input_shape": [int(s) for s in example.shape[1:]]}


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(compacted: nn.Module, arch: dict[str, Any], removed: dict[str, list[int]],
                    path: Path, extra: dict[str, Any] | None = None) -> None:
    dense, sparse = pack_state(compacted.state_dict())
    _atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, **arch,
                  "removed_channels": removed, "state": dense, "sparse": sparse,
                  **(extra or {})}, path)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"exported model not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the file is, it is not our checkpoint
        raise UserError(f"{path} is not a readable weights-only checkpoint "
                        f"({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path} is not an autoprune export (no '{FORMAT}' header)")
    if int(obj.get("format_version", -1)) > FORMAT_VERSION:
        raise UserError(f"{path} has export format {obj['format_version']}, newer than this "
                        f"autoprune reads ({FORMAT_VERSION})")
    return obj


def load_exported(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild an exported model (a folder holding model.pt, or the file) in eval mode.

    The dense architecture is built from the model zoo by name, its parameters set to ones, the
    removed channels zeroed across their whole group (every producer slot, as graph.py defines a
    dead channel), and `compact` then removes exactly those: the shapes match the stored tensors,
    which load with strict=True. No code is unpickled.
    """
    from .pruning.compaction import compact

    p = Path(path).expanduser()
    file = p / CHECKPOINT if p.is_dir() else p
    ckpt = _read_checkpoint(file)
    try:
        model = build_model(ckpt["model"], int(ckpt["num_classes"]), int(ckpt["in_channels"]),
                            int(ckpt["image_size"]))
        example = torch.zeros(1, *[int(s) for s in ckpt["input_shape"]])
        removed = {str(k): [int(i) for i in v] for k, v in ckpt["removed_channels"].items()}
        dense, sparse = ckpt["state"], ckpt["sparse"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{file}: incomplete export checkpoint ({exc})") from None
    model.eval()
    graph = build_channel_graph(model, example)
    with torch.no_grad():
        for prm in model.parameters():
            prm.fill_(1.0)  # every kept channel alive, whatever the initialisation did
        params = dict(model.named_parameters())
        for root, idxs in removed.items():
            group = graph.group_of.get(root)
            if group is None or (idxs and max(idxs) >= group.size):
                raise UserError(f"{file}: channel group '{root}' does not exist in "
                                f"{ckpt['model']}")
            keep = torch.ones(group.size, dtype=torch.bool)
            keep[idxs] = False
            apply_masks(model, channel_masks(graph, params, root, keep))
    model = compact(model, example, graph)
    state = unpack_state(dense, sparse, str(file))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise UserError(f"{file} does not fit the compacted {ckpt['model']}: "
                        f"{first[0].strip()}") from None
    return model.to(device).eval()


# ---- ONNX, latency ---------------------------------------------------------------------------

def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write `model` as ONNX with a dynamic batch dimension; returns the exporter used.

    The torch.export-based exporter (torch's default) first; the TorchScript one if it fails
    (some user models do not trace under torch.export). Weights go inside the one file unless
    the model is too large for protobuf's 2 GB limit.
    """
    import warnings

    model = copy.deepcopy(model).cpu().eval()
    x = example[:1].cpu()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), input_names=["input"],
                              output_names=["logits"], external_data=big, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        return "dynamo"
    except Exception:  # noqa: BLE001 - any failure of the new exporter: try the old one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), input_names=["input"],
                              output_names=["logits"], dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        return "torchscript"


def onnx_max_abs_diff(model: nn.Module, path: Path, x: torch.Tensor) -> float | None:
    """Largest |ONNX Runtime output - torch output| on `x`; None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = copy.deepcopy(model).cpu().eval()(x.cpu()).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: x.cpu().numpy()})[0]
    return float(abs(out - ref).max())


def measure_latency(model: nn.Module, input_shape: Sequence[int], batch: int, *,
                    threads: int = LATENCY_THREADS, repeats: int = 30,
                    max_seconds: float = 1.0) -> float:
    """Median CPU forward time (ms) of one batch, torch limited to `threads` threads.

    A few warm-up calls first (allocator, oneDNN primitive caches); then up to `repeats` timed
    calls, fewer when they exceed `max_seconds` (at least 5), so large models stay affordable.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m = copy.deepcopy(model).cpu().eval()
        x = torch.randn(batch, *input_shape)
        times: list[float] = []
        with torch.inference_mode():
            for _ in range(3):
                m(x)
            start = time.perf_counter()
            while len(times) < repeats and (len(times) < 5 or
                                            time.perf_counter() - start < max_seconds):
                t0 = time.perf_counter()
                m(x)
                times.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(old)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("autoprune", "torch", "torch-pruning", "onnx", "onnxruntime", "onnxscript",
                "mlflow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _checkpoint_bytes(state: dict[str, torch.Tensor]) -> int:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return buf.tell()


# ---- export ----------------------------------------------------------------------------------

def export_model(model: nn.Module, study: Study, example: torch.Tensor, to: str | os.PathLike, *,
                 metrics: dict[str, Any], dense: dict[str, Any], source: dict[str, Any],
                 data: TensorData | None = None, data_root: str | None = None,
                 latency: bool = True) -> dict[str, Any]:
    """Export a pruned (masked) `model` of `study` into folder `to`; return the model card.

    `metrics`: the pruned model's record (val_accuracy, test_accuracy, method, hparams or
    params_set, granularity); `dense`: the dense baseline's (val/test accuracy); `source`: where
    the model came from (trial, run ids, checkpoint), copied into the card. `data` supplies the
    test set for the re-evaluation (loaded from the study when omitted). Raises `UserError` when
    the reloaded export does not reproduce `metrics["test_accuracy"]`.
    """
    from .pruning.compaction import compact

    to = Path(to).expanduser()
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create export folder {to}: {exc.strerror}") from None
    device = next(model.parameters()).device
    example = example[:1].to(device)
    arch = _architecture(study, example)

    # Counts: mask-aware against the dense architecture, and of the compacted model as it is.
    reference = build_model(study.model, arch["num_classes"], arch["in_channels"],
                            arch["image_size"]).to(device)
    accountant = Accountant(reference, example)
    counts = accountant.count(model)
    compacted = compact(model, example, accountant.graph)
    c_macs, c_params = count_dense(compacted, example)
    removed = removed_channels(model, example, accountant.graph)

    ckpt_path = to / CHECKPOINT
    save_checkpoint(compacted, arch, removed, ckpt_path,
                    extra={"study": study.name, "method": str(metrics.get("method", ""))})
    exported = load_exported(ckpt_path)

    onnx_path = to / ONNX
    exporter = export_onnx(exported, example, onnx_path)
    probe = torch.randn(4, *arch["input_shape"], generator=torch.Generator().manual_seed(0))
    onnx_diff = onnx_max_abs_diff(exported, onnx_path, probe)

    if data is None:
        data = load_dataset(study.dataset, data_root, val_fraction=study.val_fraction,
                            device=device)
    exported = exported.to(data.device)
    test_acc = evaluate(exported, data.test_x, data.test_y)
    recorded = metrics.get("test_accuracy")
    tolerance = ACCURACY_TOLERANCE if data.device.type == "cpu" else max(
        BF16_TOLERANCE, 1.0 / max(len(data.test_y), 1))
    if recorded is not None and abs(test_acc - float(recorded)) > tolerance:
        raise UserError(f"exported model's test accuracy {test_acc:.6f} differs from the "
                        f"recorded {float(recorded):.6f} (export in {to} is not trustworthy)")

    lat: dict[str, Any] = {}
    if latency:
        shape = arch["input_shape"]
        lat = {"threads": LATENCY_THREADS, "statistic": "median",
               "dense_batch1_ms": measure_latency(model, shape, 1),
               "dense_batch32_ms": measure_latency(model, shape, 32),
               "exported_batch1_ms": measure_latency(exported, shape, 1),
               "exported_batch32_ms": measure_latency(exported, shape, 32)}
        lat["speedup_batch1"] = lat["dense_batch1_ms"] / lat["exported_batch1_ms"]
        lat["speedup_batch32"] = lat["dense_batch32_ms"] / lat["exported_batch32_ms"]

    hparams = metrics.get("hparams", metrics.get("params_set", {}))
    if isinstance(hparams, str):
        try:
            hparams = json.loads(hparams)
        except json.JSONDecodeError:
            pass
    files = {f.name: f.stat().st_size for f in sorted(to.iterdir())
             if f.is_file() and f.name != CARD}
    card = {
        "study": study.name, "model": study.model, "dataset": study.dataset,
        "input_shape": arch["input_shape"], "num_classes": arch["num_classes"],
        "method": metrics.get("method"), "granularity": metrics.get("granularity"),
        "hyperparameters": hparams,
        "dense": {"val_accuracy": dense.get("val_accuracy"),
                  "test_accuracy": dense.get("test_accuracy"),
                  "flops": accountant.dense_macs, "params": accountant.dense_params},
        "pruned": {"val_accuracy": metrics.get("val_accuracy"),
                   "test_accuracy": recorded,
                   "flops": counts.macs, "params": counts.params,
                   "flops_frac": counts.flops_frac, "params_frac": counts.params_frac,
                   "weight_compression": counts.weight_compression,
                   "layer_sparsity": counts.layer_sparsity()},
        "exported": {"test_accuracy": test_acc, "flops": c_macs, "params": c_params,
                     "flops_frac": c_macs / accountant.dense_macs,
                     "params_frac": c_params / accountant.dense_params,
                     "nonzero_params": int(sum(int((p != 0).sum())
                                               for p in exported.parameters())),
                     "removed_channels": {k: len(v) for k, v in removed.items()},
                     "accuracy_check": {"device": str(data.device), "tolerance": tolerance,
                                        "test_examples": len(data.test_y)},
                     "onnx_exporter": exporter, "onnx_max_abs_diff": onnx_diff},
        "flops_unit": "multiply-accumulates of conv and linear layers",
        "latency_cpu": lat,
        "source": source,
        "files": files,  # bytes
        "dense_checkpoint_bytes": _checkpoint_bytes(model.state_dict()),
        "load": "from autoprune.export import load_exported; model = load_exported(DIR)",
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (to / CARD).write_text(json.dumps(card, indent=2, default=float) + "\n")
    return card


# ---- the best recorded trial -----------------------------------------------------------------

def _pick(points: list[dict], pick: str) -> dict:
    if pick == "max-accuracy":
        return min(points, key=lambda p: (-p["val_accuracy"], p["flops_frac"], p["trial"]))
    if pick == "min-flops":
        return min(points, key=lambda p: (p["flops_frac"], -p["val_accuracy"], p["trial"]))
    raise UserError(f"unknown --pick '{pick}'; choose {' or '.join(PICKS)}")


def select_point(points: list[dict], budget: str | None, pick: str) -> dict:
    """The feasible point to export: within `budget` if given, best by `pick`."""
    if pick not in PICKS:
        raise UserError(f"unknown --pick '{pick}'; choose {' or '.join(PICKS)}")
    feasible = [p for p in points if p.get("feasible", True)]
    if not feasible:
        raise UserError("the search recorded no completed trial within its budget: nothing to "
                        "export")
    if budget:
        from .budget import Budget

        b = Budget.parse(budget)
        feasible = [p for p in feasible
                    if b.satisfied({"flops": p["flops_frac"], "params": p["params_frac"]})]
        if not feasible:
            raise UserError(f"no recorded point meets budget {budget} (search with that budget, "
                            f"or export under a looser one)")
    return _pick(feasible, pick)


def _open_search(study_dir: Path, name: str, storage: str | None):
    import optuna

    if storage is None:
        db = study_dir / "optuna.db"
        if not db.exists():
            raise UserError(f"no search of study '{name}' in {study_dir.parent} (no {db}); "
                            f"run `autoprune search --study {name} --out {study_dir.parent}`")
        storage = f"sqlite:///{db}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"{storage} holds no search named '{name}'") from None


def _trial_run(client, experiment_id: str, trial: int, run_id: str | None,
               parent_id: str | None) -> str | None:
    """The MLflow run of `trial`: the recorded id if it exists, else found by its tag."""
    from mlflow.exceptions import MlflowException

    from .names import TAG_PARENT, TAG_TRIAL

    if run_id:
        try:
            return client.get_run(run_id).info.run_id
        except MlflowException:
            pass
    filters = [f"tags.`{TAG_TRIAL}` = '{trial}'"]
    if parent_id:
        filters.insert(0, f"{filters[0]} and tags.`{TAG_PARENT}` = '{parent_id}'")
    for f in filters:
        runs = client.search_runs([experiment_id], f, order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if runs:
            return runs[0].info.run_id
    return None


def register_export(tracking_uri: str, study: str, export_dir: Path, point: dict,
                    parent_id: str | None) -> dict[str, Any]:
    """Log the export folder to the trial's MLflow run and register it as `<study>@best`."""
    from mlflow.exceptions import MlflowException

    from .names import TAG_STUDY, TAG_TRIAL
    from .tracking import Tracker

    tracker = Tracker(tracking_uri, study)
    client = tracker.client
    exp_id = tracker.experiment_id
    run_id = _trial_run(client, exp_id, int(point["trial"]), point.get("run_id"), parent_id)
    created = run_id is None
    if created:
        run_id = client.create_run(exp_id, run_name=f"export-trial-{point['trial']}",
                                   tags={TAG_TRIAL: str(point["trial"]),
                                         TAG_STUDY: study}).info.run_id
    client.log_artifacts(run_id, str(export_dir), ARTIFACT_DIR)
    if created:
        client.set_terminated(run_id)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    try:
        client.get_registered_model(study)
    except MlflowException:
        client.create_registered_model(
            study, description=f"pruned {study} models exported by autoprune")
    version = client.create_model_version(name=study, source=source, run_id=run_id,
                                          tags={TAG_TRIAL: str(point["trial"])})
    client.set_registered_model_alias(study, REGISTRY_ALIAS, version.version)
    return {"registered_model": study, "version": int(version.version),
            "model_uri": f"models:/{study}@{REGISTRY_ALIAS}", "run_id": run_id,
            "artifact_uri": source, "tracking_uri": tracking_uri}


def export_best(out: str | os.PathLike, study: str, to: str | os.PathLike,
                budget: str | None = None, pick: str = "max-accuracy",
                tracking_uri: str | None = None, data_root: str | None = None, seed: int = 0,
                *, optuna_storage: str | None = None,
                log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Export the best recorded trial of the search in `<out>/<study>` and register it.

    Returns the model card plus `registered_model`, `version`, `model_uri`, `run_id`.
    """
    from .dense import load_state
    from .pipeline import Workbench
    from .tracking import default_tracking_uri

    st = load_study(study)
    out_dir = Path(out).expanduser().resolve()
    study_dir = out_dir / st.name
    ot_study = _open_search(study_dir, st.name, optuna_storage)
    from .orchestration.orchestrator import PARENT_ATTR, trial_points  # after the cheap checks
    point = select_point(trial_points(ot_study), budget, pick)
    log(f"exporting trial {point['trial']} ({point['method']}): val {point['val_accuracy']:.4f}, "
        f"flops {point['flops_frac']:.4f}, params {point['params_frac']:.4f}")
    ckpt = point.get("checkpoint") or str(study_dir / "checkpoints" / f"trial-{point['trial']}.pt")
    if not Path(ckpt).exists():
        raise UserError(f"checkpoint of trial {point['trial']} not found: {ckpt}")

    wb = Workbench.open(st, out_dir, data_root=data_root, seed=seed, log=log)
    model = wb.fresh_model()
    model.load_state_dict(load_state(ckpt, model))
    parent_id = ot_study.user_attrs.get(PARENT_ATTR)
    metrics = {"method": point.get("method"), "hparams": point.get("hparams") or {},
               "granularity": ot_study.trials[point["trial"]].user_attrs.get("granularity"),
               "val_accuracy": point["val_accuracy"], "test_accuracy": point["test_accuracy"]}
    source = {"out": str(out_dir), "optuna_study": st.name, "trial": point["trial"],
              "checkpoint": str(ckpt), "mlflow_parent_run_id": parent_id, "pick": pick,
              "budget": budget}
    card = export_model(model, st, wb.data.example(), to, metrics=metrics, dense=wb.dense,
                        source=source, data=wb.data)
    reg = register_export(tracking_uri or default_tracking_uri(out_dir), st.name,
                          Path(to).expanduser(), point, parent_id)
    card["source"]["mlflow_run_id"] = reg["run_id"]
    Path(to, CARD).write_text(json.dumps(card, indent=2, default=float) + "\n")
    return {**card, **reg}


# ---- command line ----------------------------------------------------------------------------

def add_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `export` to the `autoprune` sub-commands."""
    p = sub.add_parser("export", help="export the best pruned model of a search: compact "
                       "checkpoint, ONNX, model card, MLflow registry (models:/STUDY@best)")
    p.add_argument("--out", default="autoprune-runs", help="output folder of the search "
                   "(default: %(default)s)")
    p.add_argument("--study", default="digits-lenet", help="study name or YAML path "
                   "(default: %(default)s)")
    p.add_argument("--budget", default=None, help="only points within this budget, "
                   "e.g. flops=0.3")
    p.add_argument("--pick", choices=PICKS, default="max-accuracy",
                   help="highest validation accuracy, or fewest FLOPs (default: %(default)s)")
    p.add_argument("--to", required=True, help="folder to write the export into")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    p.add_argument("--data-root", default=None, help="dataset root (default: $AUTOPRUNE_DATA "
                   "or ~/.cache/autoprune/data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (default: 0)")
    p.add_argument("--json", action="store_true", help="print the model card as JSON")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    card = export_best(args.out, args.study, args.to, budget=args.budget, pick=args.pick,
                       tracking_uri=args.tracking_uri, data_root=args.data_root,
                       seed=args.seed, log=log)
    if args.json:
        print(json.dumps(card, indent=2, default=float))
        return 0
    d, pr, ex, lat = card["dense"], card["pruned"], card["exported"], card["latency_cpu"]
    print(f"exported          trial {card['source']['trial']} ({card['method']}) of "
          f"{card['study']} -> {args.to}")
    print(f"test accuracy     {ex['test_accuracy']:.4f}  (dense {d['test_accuracy']:.4f})")
    print(f"FLOPs (MACs)      {ex['flops']:,} compacted, {pr['flops']:,.0f} mask-aware, "
          f"{d['flops']:,} dense")
    print(f"params            {ex['params']:,} compacted ({ex['nonzero_params']:,} nonzero), "
          f"{d['params']:,} dense")
    if lat:
        print(f"CPU latency       batch 1: {lat['exported_batch1_ms']:.3f} ms "
              f"(dense {lat['dense_batch1_ms']:.3f}), batch 32: "
              f"{lat['exported_batch32_ms']:.3f} ms (dense {lat['dense_batch32_ms']:.3f})")
    print("files             " + ", ".join(f"{k} {v:,} B" for k, v in card["files"].items())
          + f" (a dense checkpoint: {card['dense_checkpoint_bytes']:,} B)")
    print(f"registered        {card['model_uri']} (version {card['version']})")
    return 0


def main_for_tests(argv: Sequence[str]) -> int:
    """Run `export` as the CLI would (exit code 2 and a one-line message on UserError)."""
    parser = argparse.ArgumentParser(prog="autoprune")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"autoprune: error: {exc}", file=sys.stderr)
        return 2
