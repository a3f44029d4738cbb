"""Natural photos shipped inside scikit-image (no download), as float32 (3, H, W) tensors."""

from __future__ import annotations

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F

from lumos.core.errors import InputError, unknown_name

# Only the photos that scikit-image ships in its wheel; others would need a download.
_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
)


def images() -> list[str]:
    """The names `image` accepts."""
    return list(_PHOTOS)


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else size
    if not (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(side, int) and side > 0 for side in pair)
    ):
        raise InputError(f"size must be a positive int or a (height, width) pair, got {size!r}.")
    return pair[0], pair[1]


def image(name: str, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """The photo `name` as float32 (3, H, W) in [0, 1]; gray photos are repeated over 3 channels.

    `size` (an int for a square, or `(height, width)`) resizes with antialiased bilinear
    interpolation.
    """
    if name not in _PHOTOS:
        raise unknown_name("image", name, _PHOTOS)
    pixels = np.asarray(getattr(skimage.data, name)())
    picture = torch.from_numpy(pixels).float().div(255)
    picture = picture.expand(3, -1, -1) if picture.ndim == 2 else picture.permute(2, 0, 1)
    if size is not None:
        picture = F.interpolate(
            picture[None], size=_as_hw(size), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return picture.contiguous()
