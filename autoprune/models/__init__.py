"""The model zoo: built-in nets by name, any torchvision classifier, or a user's `module:function`.

User code is imported only when it is named explicitly (on the command line or in a study file).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

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
