"""VGG-16 with BatchNorm for 32x32 inputs.

The CIFAR variant used by filter-pruning papers (Li et al. 2017, SFP, DepGraph): 13 conv + BN
layers and a single 512 -> classes linear head: 14.7 M parameters and 313 M MACs.
"""

from __future__ import annotations

import torch
from torch import nn

CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGGCifar(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg: list = CFG16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
