"""A small, seeded training loop: AdamW with a one-cycle schedule over shuffled mini-batches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lumos.zoo.datasets import Split


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is trained."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one thread, then restore the caller's setting.

    Reductions split over a different number of threads add up in a different order, so a fixed
    count gives the same weights on every machine; models this small gain little from more.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit(model: nn.Module, train: Split, recipe: Recipe, *, seed: int) -> None:
    """Train `model` in place; the shuffling is drawn from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    steps_per_epoch = -(-len(train) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch
    )
    model.train()
    with _one_thread():
        for _ in range(recipe.epochs):
            for index in torch.randperm(len(train), generator=generator).split(recipe.batch_size):
                x, y = train.tensors(index)[:2]
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 500) -> float:
    """The fraction of `split` that `model` classifies correctly."""
    correct = 0
    for index in torch.arange(len(split)).split(batch_size):
        x, y = split.tensors(index)[:2]
        correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / len(split)
