"""Hand-built models shared by the tests: known weights give closed forms; the CNNs carry the
constructs that break other libraries (BatchNorm, residual adds, functional and in-place ReLUs,
reused modules, max pooling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear_model(n_features: int = 5, n_classes: int = 3, bias: bool = False, seed: int = 0):
    """A linear model with known weights W (classes × features)."""
    torch.manual_seed(seed)
    model = nn.Linear(n_features, n_classes, bias=bias)
    return model.eval()


class TinyCNN(nn.Module):
    """A non-linear CNN with BatchNorm, a residual add, functional/in-place/reused ReLUs, max
    pooling and global average pooling; every layer has a readable dotted path."""

    def __init__(self, in_channels: int = 3, n_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()  # reused twice
        self.block = ResidualBlock(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = self.block(x)
        x = self.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(width, width, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn_a(self.conv_a(x)), inplace=True)
        y = self.bn_b(self.conv_b(y))
        return torch.relu(x + y)


def tiny_cnn(seed: int = 0, in_channels: int = 3, n_classes: int = 4) -> TinyCNN:
    """A TinyCNN with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = TinyCNN(in_channels, n_classes)
    for bn in (model.bn1, model.bn2, model.block.bn_a, model.block.bn_b):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


class PlainReLUCNN(nn.Module):
    """Only nn modules, each used once (what hook-based peers handle correctly)."""

    def __init__(self, in_channels: int = 3, n_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def plain_cnn(seed: int = 0) -> PlainReLUCNN:
    torch.manual_seed(seed)
    return PlainReLUCNN().eval()


class TwoInputModel(nn.Module):
    """f(a, b) = w_a·a + w_b·b per class: tuple and dict inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3, bias=False)
        self.b = nn.Linear(2, 3, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + torch.tanh(self.b(b))
