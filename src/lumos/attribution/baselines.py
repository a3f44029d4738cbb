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
    per_input = _per_input(baselines, xs, structure, "baselines")
    resolved = tuple(_one(b, x, i, structure, seed) for i, (b, x) in enumerate(zip(per_input, xs)))
    for i, b in enumerate(resolved):
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise BaselineError(f"baselines for input {i} contain NaN or inf values.")
    return resolved


def _per_input(value: Any, xs: Sequence[torch.Tensor], structure: Structure, what: str) -> list:
    """One entry per input tensor: shared numbers/names, or the user's tuple/dict entries."""
    if value is None or isinstance(value, (int, float, str)):
        return [value] * len(xs)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if structure.kind != "tensor":
            raise BaselineError(
                f"The inputs are a {structure.kind} of {len(xs)} tensors, so {what} must be one "
                f"per input in the same structure (a {structure.kind}), not a single tensor."
            )
        return [value]
    return list(structure.flatten(value, what))


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
    out = x
    for dim in (-2, -1):  # reflect padding needs pad < size, so shrink the kernel on small images
        pad = min(radius, x.shape[dim] - 1)
        if pad == 0:
            continue
        k = kernel[radius - pad : radius + pad + 1]
        shape = (1, 1, -1, 1) if dim == -2 else (1, 1, 1, -1)
        padding = (0, 0, pad, pad) if dim == -2 else (pad, pad, 0, 0)
        weight = (k / k.sum()).view(shape).repeat(channels, 1, 1, 1)
        out = F.conv2d(F.pad(out, padding, mode="reflect"), weight, groups=channels)
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
    per_input = _per_input(baselines, xs, structure, "baselines")
    result = []
    for i, (b, x) in enumerate(zip(per_input, xs)):
        if not isinstance(b, (torch.Tensor, np.ndarray)):
            raise BaselineError(f"The background set for input {i} must be a tensor of rows.")
        b = torch.as_tensor(b).to(device=x.device, dtype=x.dtype)
        if not torch.isfinite(b).all():
            raise BaselineError(f"The background set for input {i} contains NaN or inf values.")
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
