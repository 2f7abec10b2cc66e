"""The exported checkpoint: compacted weights, stored sparsely where smaller, and the
record (architecture, removed channels) that `load_exported` rebuilds the module from."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import dataset_info
from ..errors import UserError
from ..graph import build_channel_graph
from ..models import build_model
from ..pruning.base import apply_masks, channel_masks
from ..study import Study

FORMAT = "autoprune-export"
FORMAT_VERSION = 1
CHECKPOINT = "model.pt"
ONNX = "model.onnx"
CARD = "model_card.json"
# A nonzero stored sparsely costs an index (4 bytes) and a value: below half density it is
# smaller than the dense tensor. Tiny tensors stay dense (the saving would not pay the record).
SPARSE_BELOW_DENSITY = 0.5
SPARSE_MIN_NUMEL = 64


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


def _architecture(study: Study, example: torch.Tensor,
                  model: nn.Module | None = None) -> dict[str, Any]:
    """How `load_exported` rebuilds the dense model: a zoo name and the data's sizes, or for a
    `Study.custom` the user's class (its code is theirs: they pass an instance when loading)."""
    shape = [int(s) for s in example.shape[1:]]
    if study.objects is not None:
        info = study.objects.data.info
        return {"model": study.model, "dataset": study.dataset, "num_classes": info.num_classes,
                "in_channels": shape[0] if shape else 0, "image_size": shape[-1] if shape else 0,
                "input_shape": shape, "custom_model_class": study.objects.model_class,
                "custom_architecture": study.objects.architecture}
    info = dataset_info(study.dataset)
    classes = info.num_classes
    if model is not None:  # a folder's classes (or an ImageNet stand-in's) are the model's
        was_training = model.training
        with torch.no_grad():
            classes = int(model.eval()(example).shape[-1])
        model.train(was_training)
    size = int((study.data_options or {}).get("image_size", info.image_size))
    return {"model": study.model, "dataset": study.dataset, "num_classes": classes,
            "in_channels": info.in_channels, "image_size": size, "input_shape": shape}


def dense_reference(study: Study, arch: dict[str, Any]) -> nn.Module:
    """A dense model of the study's architecture (weights do not matter: shapes only)."""
    if study.objects is not None:
        return study.objects.build()
    return build_model(study.model, arch["num_classes"], arch["in_channels"],
                       arch["image_size"])


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


def load_exported(path: str | os.PathLike, device: torch.device | str = "cpu",
                  model: nn.Module | None = None) -> nn.Module:
    """Rebuild an exported model (a folder holding model.pt, or the file) in eval mode.

    An export of a `Study.custom` model needs `model`: an instance of the user's dense class
    (any weights; it is not modified), since the file holds no code.

    The dense architecture is built from the model zoo by name, its parameters set to ones, the
    removed channels zeroed across their whole group (every producer slot, as graph.py defines a
    dead channel), and `compact` then removes exactly those: the shapes match the stored tensors,
    which load with strict=True. No code is unpickled.
    """
    from ..pruning.compaction import compact

    p = Path(path).expanduser()
    file = p / CHECKPOINT if p.is_dir() else p
    ckpt = _read_checkpoint(file)
    custom = ckpt.get("custom_model_class")
    if custom and model is None:
        raise UserError(f"{file} is an export of your own model {custom}: load it with "
                        f"load_exported(path, model={ckpt.get('model')}(...)), an instance of "
                        f"that class")
    try:
        if model is not None:
            import copy

            model = copy.deepcopy(model).cpu()
        else:
            model = build_model(ckpt["model"], int(ckpt["num_classes"]),
                                int(ckpt["in_channels"]), int(ckpt["image_size"]))
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
