"""`Bundle`: a trained zoo model together with its data and what is known about it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lumos.core.errors import InputError
from lumos.zoo.datasets import Dataset


@dataclass
class Bundle:
    """A trained model (eval mode, float32, CPU) with its data, names and test accuracy.

    Images are float32 in [0, 1] and tables hold raw feature values: each model standardizes its
    own inputs. For `shapes`, every data accessor also returns boolean object masks (N, 1, H, W).
    """

    name: str
    model: nn.Module = field(repr=False)
    task: str  # "image" or "tabular"
    class_names: list[str]
    feature_names: list[str] | None = field(repr=False)
    input_shape: tuple[int, ...]
    accuracy: float
    default_layer: str | None  # dotted path of the last conv block, for CAM-style methods
    dataset: Dataset = field(repr=False, compare=False)

    def test_batch(self, n: int = 8, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """`n` test examples drawn without replacement: `(x, y)` or `(x, y, masks)`."""
        size = len(self.dataset.test)
        if not 1 <= n <= size:
            raise InputError(f"n must be between 1 and {size} (the test set size), got {n}.")
        generator = torch.Generator().manual_seed(seed)
        return self.dataset.test.tensors(torch.randperm(size, generator=generator)[:n])

    def test_set(self) -> tuple[torch.Tensor, ...]:
        """The whole test set: `(x, y)` or `(x, y, masks)`."""
        return self.dataset.test.tensors()

    def train_set(self) -> tuple[torch.Tensor, ...]:
        """The whole training set (e.g. background data for LIME or KernelSHAP)."""
        return self.dataset.train.tensors()
