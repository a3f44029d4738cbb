"""The zoo's entries: for each name, its data, architecture, training recipe and version.

Bump an entry's `version` whenever its data, architecture or recipe changes: the version is part of
the cache file name, so stale weights are never loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lumos.zoo import datasets
from lumos.zoo.datasets import Dataset
from lumos.zoo.models import MLP, SmallCNN
from lumos.zoo.training import Recipe


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to get its data, build its architecture and train it."""

    version: str
    task: str
    data: Callable[[], Dataset]
    build: Callable[[Dataset], nn.Module]
    recipe: Recipe
    default_layer: str | None


def _small_cnn(widths: tuple[int, int, int], **options: Any) -> Callable[[Dataset], nn.Module]:
    def build(dataset: Dataset) -> nn.Module:
        x = dataset.train.tensors()[0]
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
        return SmallCNN(mean, std, len(dataset.class_names), widths, **options)

    return build


def _mlp(dataset: Dataset) -> nn.Module:
    x = dataset.train.tensors()[0]
    return MLP(x.mean(dim=0), x.std(dim=0), len(dataset.class_names), widths=(32, 16))


ENTRIES: dict[str, Entry] = {
    "digits": Entry(
        version="v2",
        task="image",
        data=datasets.digits,
        build=_small_cnn((8, 16, 32)),
        recipe=Recipe(epochs=8, batch_size=32, lr=3e-3),
        default_layer="features.block3",
    ),
    # The smoothed 5×5 last block puts the maximum of Grad-CAM inside the object on 95% of 256
    # test images, against 85% with a plain 3×3 one (see `SmallCNN`).
    "shapes": Entry(
        version="v3",
        task="image",
        data=datasets.shapes,
        build=_small_cnn((16, 32, 64), last_kernel_size=5, smooth=True),
        recipe=Recipe(epochs=3, batch_size=32, lr=1e-2),
        default_layer="features.block3",
    ),
    "tabular": Entry(
        version="v2",
        task="tabular",
        data=datasets.breast_cancer,
        build=_mlp,
        recipe=Recipe(epochs=20, batch_size=32, lr=1e-2, weight_decay=1e-2),
        default_layer=None,
    ),
}
