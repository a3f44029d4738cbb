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


def conv_block(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv ('same' padding), BatchNorm, ReLU, with the readable names `conv`, `bn`, `relu`."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(
                in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
            ),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        )
    )


class SmallCNN(nn.Module):
    """Standardize, conv-pool, conv-pool, residual block, (3×3 average,) conv, global average
    pooling, linear.

    `mean` and `std` are per-channel statistics of the training images; `widths` are the output
    channels of the three conv blocks.

    The last conv block, `features.block3` (also `features[-1]`), keeps a spatial map (a quarter of
    the input's side) that global average pooling feeds to the classifier, so CAM applies exactly.
    Where that map peaks depends on the window of the last block: with a 3×3 kernel the cells over
    an object's most distinctive part (a corner, a triangle's apex) win, at times just outside the
    object; a 7×7 kernel gives flat tops that tie across the whole object. `smooth` adds a 3×3
    stride-1 average pooling, `features.smooth`, before the last block; with `last_kernel_size=5`
    the two cover a 7×7 window whose outer cells count less, and an object's evidence peaks at its
    middle.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        n_classes: int,
        widths: tuple[int, int, int],
        *,
        last_kernel_size: int = 3,
        smooth: bool = False,
    ) -> None:
        super().__init__()
        in_channels = len(mean)
        self.normalize = Standardize(mean[:, None, None], std[:, None, None])
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            block1=conv_block(in_channels, widths[0]),
            pool1=nn.MaxPool2d(2),
            block2=conv_block(widths[0], widths[1]),
            pool2=nn.MaxPool2d(2),
            residual=ResidualBlock(widths[1]),
        )
        if smooth:
            # Averages over the cells inside the image only, so objects at the border lose nothing.
            layers["smooth"] = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        layers["block3"] = conv_block(widths[1], widths[2], last_kernel_size)
        self.features = nn.Sequential(layers)
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
