"""Baselines (reference inputs): one per input tensor, broadcast to the batch.

A baseline may be None (zeros), a number, a tensor shaped like one example or like the whole
batch, or a name: ``zeros``; ``uniform`` (uniform noise between each example's min and max,
seeded); ``blur`` (a Gaussian blur of the image, sigma a tenth of its size); ``mean`` (for images
each example's per-channel mean colour, otherwise the batch mean of every feature).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lumos.core.errors import BaselineError, InputError
from lumos.core.inputs import Structure

NAMED = ("zeros", "uniform", "blur", "mean")


def resolve_baselines(
    baselines: Any,
    xs: Sequence[torch.Tensor],
    structure: Structure,
    *,
    seed: int | None = 0,
) -> tuple[torch.Tensor, ...]:
    """One baseline per input tensor, each of the input's full (batch) shape and dtype."""
    if baselines is None or (isinstance(baselines, (int, float, str)) and len(xs) > 1):
        per_input = [baselines] * len(xs)
    elif isinstance(baselines, (int, float, str, torch.Tensor, np.ndarray)):
        per_input = [baselines]
    else:
        per_input = list(structure.flatten(baselines, "baselines"))
    return tuple(_one(b, x, i, structure, seed) for i, (b, x) in enumerate(zip(per_input, xs)))


def _one(b: Any, x: torch.Tensor, i: int, structure: Structure, seed: int | None) -> torch.Tensor:
    where = "baselines" if structure.kind == "tensor" else f"baselines for input {i}"
    if b is None:
        return torch.zeros_like(x)
    if isinstance(b, bool):
        raise BaselineError(f"{where}: got a bool; pass a number, a tensor or a name {NAMED}.")
    if isinstance(b, (int, float)):
        return torch.full_like(x, float(b))
    if isinstance(b, str):
        return _named(b, x, where, seed)
    if isinstance(b, np.ndarray):
        b = torch.from_numpy(b)
    if not isinstance(b, torch.Tensor):
        raise BaselineError(
            f"{where}: expected None, a number, a tensor or one of {NAMED}, got {type(b).__name__}."
        )
    b = b.to(device=x.device, dtype=x.dtype)
    if b.shape == x.shape:
        return b
    if b.shape == x.shape[1:] or (
        b.dim() == x.dim() and b.shape[0] == 1 and b.shape[1:] == x.shape[1:]
    ):
        return b.reshape(x.shape[1:]).expand_as(x)
    raise BaselineError(
        f"{where} has shape {tuple(b.shape)}, but the inputs have shape {tuple(x.shape)}: pass "
        f"one baseline of shape {tuple(x.shape[1:])}, one per example {tuple(x.shape)}, or a "
        f"number or name {NAMED}."
    )


def _named(name: str, x: torch.Tensor, where: str, seed: int | None) -> torch.Tensor:
    if name == "zeros":
        return torch.zeros_like(x)
    if name == "uniform":
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0 if seed is None else seed)
        flat = x.detach().flatten(1)
        low, high = flat.min(1).values, flat.max(1).values
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return low.view(shape) + noise * (high - low).view(shape)
    if name == "mean":
        if x.dim() >= 3:
            return x.detach().mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x)
        return x.detach().mean(dim=0, keepdim=True).expand_as(x)
    if name == "blur":
        if x.dim() != 4:
            raise BaselineError(f"{where}: 'blur' needs images (batch, channels, H, W).")
        return gaussian_blur(x.detach(), sigma=max(x.shape[-2:]) / 10)
    raise BaselineError(f"{where}: unknown baseline name {name!r}; use one of {NAMED}.")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of (B, C, H, W) images with reflect padding."""
    if sigma <= 0:
        return x
    radius = max(int(3 * sigma), 1)
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    pad_h, pad_w = min(radius, x.shape[-2] - 1), min(radius, x.shape[-1] - 1)
    out = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect") if pad_h and pad_w else x
    kh = kernel[radius - pad_h : radius + pad_h + 1]
    kw = kernel[radius - pad_w : radius + pad_w + 1]
    out = F.conv2d(
        out, (kh / kh.sum()).view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels
    )
    out = F.conv2d(
        out, (kw / kw.sum()).view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels
    )
    return out


def background_set(
    baselines: Any, xs: Sequence[torch.Tensor], structure: Structure, method: str
) -> tuple[torch.Tensor, ...]:
    """A background set of K reference rows per input tensor (K may differ from the batch)."""
    if baselines is None:
        raise InputError(
            f"{method} needs a background set: pass baselines=<tensor of K reference examples>, "
            "e.g. a few hundred training inputs."
        )
    if isinstance(baselines, (torch.Tensor, np.ndarray)):
        per_input = [baselines]
    else:
        per_input = list(structure.flatten(baselines, "baselines"))
    result = []
    for i, (b, x) in enumerate(zip(per_input, xs)):
        b = torch.as_tensor(b).to(device=x.device, dtype=x.dtype)
        if b.shape == x.shape[1:]:
            b = b.unsqueeze(0)
        if b.shape[1:] != x.shape[1:]:
            raise BaselineError(
                f"The background set for input {i} has shape {tuple(b.shape)}; each reference "
                f"must have the shape of one example {tuple(x.shape[1:])}: pass (K, "
                f"{', '.join(map(str, x.shape[1:]))})."
            )
        result.append(b)
    if len({int(b.shape[0]) for b in result}) > 1:
        raise BaselineError("Every input's background set must hold the same number of rows.")
    return tuple(result)
