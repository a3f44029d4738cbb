"""Randomness only through an explicit seed: an int, or a `torch.Generator` the caller owns."""

from __future__ import annotations

import torch

from lumos.core.errors import InputError

SeedLike = int | torch.Generator


def check_seed(seed: SeedLike) -> SeedLike:
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int or a torch.Generator, got {seed!r}.")
    return seed


def make_generator(seed: SeedLike) -> torch.Generator:
    """A CPU generator: a fresh one seeded with an int (same seed, same draws), or the caller's
    own generator, whose state then advances with every draw."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device="cpu").manual_seed(check_seed(seed))
