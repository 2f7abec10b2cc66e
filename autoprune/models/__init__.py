"""The model zoo: built-in nets by name, any torchvision classifier, or a user's `module:function`.

User code is imported only when it is named explicitly (on the command line or in a study file).
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .lenet import LeNet5, LeNet300, LeNetDigits
from .resnet_cifar import CifarResNet
from .vgg_cifar import VGGCifar

_BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "lenet300": lambda num_classes, in_channels, image_size: LeNet300(
        num_classes, in_channels * image_size * image_size),
    "lenet5": lambda num_classes, in_channels, image_size: LeNet5(num_classes, in_channels),
    "lenet-digits": lambda num_classes, in_channels, image_size: LeNetDigits(
        num_classes, in_channels),
    "resnet20": lambda num_classes, in_channels, image_size: CifarResNet(20, num_classes,
                                                                         in_channels),
    "resnet32": lambda num_classes, in_channels, image_size: CifarResNet(32, num_classes,
                                                                         in_channels),
    "resnet56": lambda num_classes, in_channels, image_size: CifarResNet(56, num_classes,
                                                                         in_channels),
    "resnet110": lambda num_classes, in_channels, image_size: CifarResNet(110, num_classes,
                                                                          in_channels),
    "vgg16": lambda num_classes, in_channels, image_size: VGGCifar(num_classes, in_channels),
}

TORCHVISION_PREFIX = "torchvision:"


def available_models() -> list[str]:
    return sorted(_BUILTIN) + [TORCHVISION_PREFIX + "<name>", "package.module:function"]


def build_model(name: str, num_classes: int = 10, in_channels: int = 1,
                image_size: int = 28) -> nn.Module:
    """Build a freshly initialised model.

    `name` is a built-in (`lenet5`, `resnet56`, ...), `torchvision:<name>` for any torchvision
    classification model (built without downloaded weights), or `package.module:function` for a
    user's factory, called as `function(num_classes=...)`.
    """
    if name in _BUILTIN:
        return _BUILTIN[name](num_classes, in_channels, image_size)
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        tv_name = name[len(TORCHVISION_PREFIX):]
        try:
            return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
        except ValueError:
            raise UserError(f"unknown torchvision model '{tv_name}'") from None
    if ":" in name:
        module_name, _, fn_name = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"cannot import user model '{name}': {exc}") from None
        model = fn(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise UserError(f"user model '{name}' returned {type(model).__name__}, not a Module")
        return model
    raise UserError(f"unknown model '{name}'; choose one of {', '.join(available_models())}")


def _code_digest(h: hashlib._Hash, code: types.CodeType) -> None:
    """Feed a function's bytecode, names and constants (nested code included) to `h`."""
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_digest(h, const)
        elif isinstance(const, frozenset):  # its repr's order changes with the hash seed
            h.update(repr(sorted(map(repr, const))).encode())
        else:
            h.update(repr(const).encode())


def architecture_hash(model: nn.Module) -> str:
    """What makes two models the same architecture, as a hash (the dense-cache key of a model
    given as a Python object, which has no name to key on).

    Covers the module tree's repr (layer types and their settings), every parameter's and
    buffer's name, shape and dtype, and the code of user-defined module classes (so editing a
    `forward` invalidates the cached dense baseline). Weights are not covered: see
    `weights_hash`.
    """
    h = hashlib.sha256(repr(model).encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    classes = {type(m) for m in model.modules()}
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        h.update(f"{cls.__module__}.{cls.__qualname__};".encode())
        if cls.__module__.split(".")[0] == "torch":
            continue  # torch's own layers are covered by the repr and the torch version
        for attr, value in sorted(vars(cls).items()):
            code = getattr(value, "__code__", None)
            if isinstance(code, types.CodeType):
                h.update(attr.encode())
                _code_digest(h, code)
    return h.hexdigest()


def weights_hash(model: nn.Module) -> str:
    """A content hash of a model's parameters and buffers (a given module's identity)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ships_by_value(module_name: str) -> bool:
    """Whether Ray workers may fail to import `module_name`, so its code must travel with the
    pickled study: a script's folder, a test folder or a notebook helper is on the driver's
    `sys.path` only. Installed packages and the standard library are importable everywhere;
    `__main__` is pickled by value by cloudpickle already.
    """
    if module_name == "__main__" or module_name.split(".")[0] in ("torch", "autoprune"):
        return False
    module = sys.modules.get(module_name)
    origin = getattr(module, "__file__", None)
    if not origin:
        return False  # built in, or not imported here: nothing to ship
    path = Path(origin).resolve()
    if {"site-packages", "dist-packages"} & set(path.parts):
        return False
    return not path.is_relative_to(Path(sysconfig.get_paths()["stdlib"]).resolve())
