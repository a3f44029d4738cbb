"""Turning attributions into displayable maps: channel reduction, percentile clipping, scaling.

Normalization is a display choice made here, never baked into a method's numbers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lumos.core.errors import InputError

REDUCTIONS = ("sum", "abs_sum", "max_abs", "norm", "mean")


def reduce_channels(attr: torch.Tensor, how: str = "sum") -> torch.Tensor:
    """(B, C, H, W) → (B, H, W): ``sum`` keeps the sign; the others measure magnitude."""
    if attr.dim() != 4:
        raise InputError(f"reduce_channels needs (B, C, H, W) maps, got {tuple(attr.shape)}.")
    if how == "sum":
        return attr.sum(1)
    if how == "mean":
        return attr.mean(1)
    if how == "abs_sum":
        return attr.abs().sum(1)
    if how == "max_abs":
        return attr.abs().amax(1)
    if how == "norm":
        return attr.norm(dim=1)
    raise InputError(f"Unknown channel reduction {how!r}; use one of {REDUCTIONS}.")


def signed_scale(maps: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Scale each map to [-1, 1] by its `percentile` of |values| (outliers clip at ±1)."""
    flat = np.abs(maps.reshape(maps.shape[0], -1))
    bound = np.percentile(flat, percentile, axis=1).reshape((-1,) + (1,) * (maps.ndim - 1))
    bound = np.where(bound > 0, bound, 1.0)
    return np.clip(maps / bound, -1.0, 1.0)


def absolute_scale(maps: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Scale each map of magnitudes to [0, 1] by its `percentile` (outliers clip at 1)."""
    return np.abs(signed_scale(np.abs(maps), percentile))


def image_maps(attr: torch.Tensor, size: tuple[int, int] | None, how: str) -> np.ndarray:
    """(B, H, W) NumPy maps from (B, C, H, W) or (B, 1, h, w) attributions at display `size`."""
    attr = attr.detach().float().cpu()
    maps = reduce_channels(attr, how) if attr.shape[1] > 1 else attr[:, 0]
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps.numpy()


def display_images(x: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) images in [0, 1] for display from (B, C, H, W) inputs of any range."""
    x = x.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    low = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    high = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    in_unit = bool(((low >= 0) & (high <= 1)).all())
    x = x if in_unit else (x - low) / (high - low).clamp_min(1e-12)
    return x.permute(0, 2, 3, 1).numpy()


def is_image(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_floating_point()
