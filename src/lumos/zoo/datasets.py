"""The zoo's data: synthetic shapes with ground-truth masks, and two datasets shipped with sklearn.

The data are fixed (the `seed` of `lumos.zoo.load` only drives training), so models trained with
different seeds are evaluated on the same test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

DATA_SEED = 0
SHAPE_CLASSES = ["circle", "square", "triangle", "cross"]
SHAPES_SIZE = 64
SHAPES_TRAIN, SHAPES_TEST = 4000, 1000
OBJECT_SIZES = (10, 20)  # side of the bounding box, in pixels
RIPPLE_WAVELENGTHS = (16, 48)  # pixels
RIPPLE_AMPLITUDE = 0.08
DIGITS_SIZE = 32


@dataclass(frozen=True)
class Split:
    """Inputs `x`, labels `y` and, for images with a known object, boolean `masks` (N, 1, H, W)."""

    x: torch.Tensor
    y: torch.Tensor
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)

    def tensors(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """`(x, y)` or `(x, y, masks)` as fresh tensors, optionally only the examples at `index`.

        Inputs are float32; 8-bit images are scaled to [0, 1].
        """
        parts = (self.x, self.y) if self.masks is None else (self.x, self.y, self.masks)
        parts = tuple(part.clone() if index is None else part[index] for part in parts)
        if parts[0].dtype == torch.uint8:
            return (parts[0].float() / 255, *parts[1:])
        return parts


@dataclass(frozen=True)
class Dataset:
    """A train/test split with the names of its classes (and features, for tabular data)."""

    train: Split
    test: Split
    class_names: list[str]
    feature_names: list[str] | None = None


def _shape_mask(kind: int, size: float, cy: float, cx: float) -> np.ndarray:
    """The (H, W) boolean mask of shape `kind` in a box of side `size` centred at (cy, cx)."""
    pixels = np.arange(SHAPES_SIZE) + 0.5
    dy = pixels[:, None] - cy
    dx = pixels[None, :] - cx
    half = size / 2
    name = SHAPE_CLASSES[kind]
    if name == "circle":
        return dx**2 + dy**2 <= half**2
    if name == "square":
        return (np.abs(dx) <= 0.8 * half) & (np.abs(dy) <= 0.8 * half)
    if name == "triangle":  # apex up, base at the bottom of the box
        return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    bar = half / 3  # cross: a horizontal and a vertical bar of a third of the box's width
    return ((np.abs(dx) <= bar) | (np.abs(dy) <= bar)) & (np.abs(dx) <= half) & (np.abs(dy) <= half)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A (3, H, W) gradient between two random colours, with two faint coloured ripples.

    Everything here is smooth: pixel noise, even faint, slows the training down severalfold.
    """
    start, end = rng.uniform(0, 1, size=(2, 3, 1, 1))
    pixels = np.arange(SHAPES_SIZE)
    background = start + _ramp(rng.uniform(0, 2 * np.pi), pixels) * (end - start)
    for _ in range(2):
        wavelength = rng.uniform(*RIPPLE_WAVELENGTHS)
        phase = 2 * np.pi * (_ramp(rng.uniform(0, 2 * np.pi), pixels) * SHAPES_SIZE / wavelength)
        amplitude = rng.uniform(-RIPPLE_AMPLITUDE, RIPPLE_AMPLITUDE, size=(3, 1, 1))
        background += amplitude * np.sin(phase + rng.uniform(0, 2 * np.pi))
    return background


def _ramp(angle: float, pixels: np.ndarray) -> np.ndarray:
    """Position along the direction `angle`, scaled to [0, 1] over the image, as an (H, W) map."""
    centred = (pixels - pixels.mean()) / (len(pixels) - 1)
    along = np.cos(angle) * centred[None, :] + np.sin(angle) * centred[:, None]
    return along / np.sqrt(2) + 0.5


def _shapes_split(n: int, rng: np.random.Generator) -> Split:
    """`n` images of one random shape each, on a background that carries no class signal."""
    # Stored as 8-bit images, like real photos: a quarter of the memory of float32.
    images = np.empty((n, 3, SHAPES_SIZE, SHAPES_SIZE), dtype=np.uint8)
    masks = np.empty((n, 1, SHAPES_SIZE, SHAPES_SIZE), dtype=bool)
    labels = rng.integers(len(SHAPE_CLASSES), size=n)
    for i, kind in enumerate(labels):
        image = _background(rng)
        size = rng.uniform(*OBJECT_SIZES)
        cy, cx = rng.uniform(size / 2 + 1, SHAPES_SIZE - size / 2 - 1, size=2)
        mask = _shape_mask(kind, size, cy, cx)
        local = image[:, mask].mean(axis=1)
        colour = rng.uniform(0, 1, size=3)
        while np.linalg.norm(colour - local) < 0.5:  # keep the object visible
            colour = rng.uniform(0, 1, size=3)
        image[:, mask] = colour[:, None]
        images[i] = np.round(np.clip(image, 0, 1) * 255)
        masks[i, 0] = mask
    return Split(torch.from_numpy(images), torch.from_numpy(labels).long(), torch.from_numpy(masks))


def shapes() -> Dataset:
    """Synthetic 64×64 RGB images in [0, 1]; the class is the shape of the single object."""
    train_rng, test_rng = (np.random.default_rng([DATA_SEED, part]) for part in range(2))
    return Dataset(
        _shapes_split(SHAPES_TRAIN, train_rng),
        _shapes_split(SHAPES_TEST, test_rng),
        list(SHAPE_CLASSES),
    )


def _stratified(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=DATA_SEED)


def digits() -> Dataset:
    """sklearn's 8×8 handwritten digits, bilinearly upsampled to 1×32×32 with values in [0, 1]."""
    data = load_digits()
    images = torch.from_numpy(data.images / 16.0).float()[:, None]
    images = F.interpolate(images, size=DIGITS_SIZE, mode="bilinear", align_corners=False)
    x_train, x_test, y_train, y_test = _stratified(images.numpy(), data.target)
    return Dataset(
        Split(torch.from_numpy(x_train), torch.from_numpy(y_train).long()),
        Split(torch.from_numpy(x_test), torch.from_numpy(y_test).long()),
        [str(digit) for digit in data.target_names],
    )


def breast_cancer() -> Dataset:
    """sklearn's Wisconsin breast cancer table: 30 raw (unscaled) features, malignant/benign."""
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = _stratified(data.data.astype(np.float32), data.target)
    return Dataset(
        Split(torch.from_numpy(x_train), torch.from_numpy(y_train).long()),
        Split(torch.from_numpy(x_test), torch.from_numpy(y_test).long()),
        [str(name) for name in data.target_names],
        [str(name) for name in data.feature_names],
    )
