"""The zoo's architectures: a small residual CNN for images and an MLP for tables.

Each model standardizes its own inputs in its first layer, so callers feed raw values (images in
[0, 1], raw table features) and attributions are in the units of those raw inputs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Standardize(nn.Module):
    """`(x - mean) / std` with fixed buffers holding statistics of the training data."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ResidualBlock(nn.Module):
    """Two 3×3 conv-BN layers and an identity shortcut, added explicitly.

    `relu(x + bn2(conv2(relu(bn1(conv1(x))))))`, with functional ReLUs.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(x + y)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 conv, BatchNorm, ReLU, with the readable names `conv`, `bn`, `relu`."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        )
    )


class SmallCNN(nn.Module):
    """Standardize, conv-pool, conv-pool, residual block, conv, global average pooling, linear.

    `mean` and `std` are per-channel statistics of the training images.

    The last conv block, `features.block3` (also `features[-1]`), keeps a spatial map that global
    average pooling feeds to the classifier, so CAM applies exactly.
    """

    def __init__(
        self, mean: torch.Tensor, std: torch.Tensor, n_classes: int, widths: tuple[int, int, int]
    ) -> None:
        super().__init__()
        in_channels = len(mean)
        self.normalize = Standardize(mean[:, None, None], std[:, None, None])
        self.features = nn.Sequential(
            OrderedDict(
                block1=conv_block(in_channels, widths[0]),
                pool1=nn.MaxPool2d(2),
                block2=conv_block(widths[0], widths[1]),
                pool2=nn.MaxPool2d(2),
                residual=ResidualBlock(widths[1]),
                block3=conv_block(widths[1], widths[2]),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[2], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    """Standardize (per-feature `mean`, `std`), linear-ReLU layers of `widths`, a classifier."""

    def __init__(
        self, mean: torch.Tensor, std: torch.Tensor, n_classes: int, widths: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.normalize = Standardize(mean, std)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (n_in, n_out) in enumerate(zip((len(mean), *widths), widths), start=1):
            layers[f"fc{i}"] = nn.Linear(n_in, n_out)
            layers[f"relu{i}"] = nn.ReLU()
        self.hidden = nn.Sequential(layers)
        self.classifier = nn.Linear(widths[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.normalize(x)))
