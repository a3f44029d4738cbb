"""The features a perturbation metric removes — ranked jointly over every input tensor — what
replaces them, and the noise that robustness and infidelity add to the inputs."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lumos.attribution.baselines import resolve_baselines
from lumos.core.errors import BaselineError, InputError, unknown_name
from lumos.core.inputs import Structure
from lumos.metrics.base import ModelRunner, Tensors, attribution_map, input_name, joined

_TENSOR = Structure("tensor", ("input",))


def fill_values(xs: Tensors, structure: Structure, baseline: Any, seed: int = 0) -> Tensors:
    """What removed features are replaced by, one tensor per input: a number, a tensor, or a
    name (``zeros``, ``uniform`` (seeded noise in each example's range), ``blur``, ``mean``) as
    for baselines — one value for every input, or a tuple/dict of values in the inputs'
    structure. Integer inputs (token ids) take an int (a token id)."""
    if structure.kind == "tensor":
        per_input: Sequence[Any] = (baseline,)
    elif isinstance(baseline, (Mapping, tuple, list)):
        per_input = structure.flatten(baseline, "baseline")
    elif isinstance(baseline, (torch.Tensor, np.ndarray)):
        raise BaselineError(
            f"The inputs are a {structure.kind} of {len(xs)} tensors, so a tensor baseline must "
            f"be one per input in the same structure (a {structure.kind}), or pass one number "
            "or name for all of them."
        )
    else:
        per_input = (baseline,) * len(xs)
    return tuple(
        _fill(x, b, seed, "" if structure.kind == "tensor" else f"{input_name(structure, i)}: ")
        for i, (x, b) in enumerate(zip(xs, per_input))
    )


def _fill(x: torch.Tensor, baseline: Any, seed: int, where: str) -> torch.Tensor:
    if not x.is_floating_point():
        if isinstance(baseline, int) and not isinstance(baseline, bool):
            return torch.full_like(x, baseline)
        several = " (one for all inputs, or one per input in their structure)" if where else ""
        raise InputError(
            f"{where}Integer inputs (token ids) are perturbed by replacing them with a token: "
            f"pass baseline=<int token id>, e.g. the padding or [MASK] id{several}."
        )
    try:
        return resolve_baselines(baseline, (x,), _TENSOR, seed=seed)[0]
    except BaselineError as exc:
        if not where:
            raise
        raise BaselineError(f"{where}{exc}") from None


class Features:
    """The features a perturbation metric removes, ranked jointly over every input tensor:
    pixels (or `patch_size` × `patch_size` patches) of image inputs — ``(B, C, H, W)`` with
    attributions ``(B, C, H, W)`` or maps ``(B, 1, H, W)`` at their resolution — and every
    element of other inputs. `scores` ``(B, F)`` has one attribution score per feature, the
    features of the inputs side by side in input order."""

    def __init__(
        self, runner: ModelRunner, attributions: Any, patch_size: int = 1, reduce: str = "sum"
    ) -> None:
        #: the attributions in the inputs' structure, one tensor per input on the model's device
        self.attributions = runner.attributions(attributions)
        self.parts = [
            _InputFeatures(x, a, patch_size, reduce, input_name(runner.structure, i))
            for i, (x, a) in enumerate(zip(runner.xs, self.attributions))
        ]
        self.scores = joined([p.scores for p in self.parts])
        self.count = int(self.scores.shape[1])
        self.bounds = [0, *itertools.accumulate(p.count for p in self.parts)]

    def expand(self, selected: torch.Tensor) -> Tensors:
        """A ``(R, F)`` bool feature selection as one mask per input, broadcastable to rows."""
        return tuple(
            part.expand(selected[:, lo:hi])
            for part, lo, hi in zip(self.parts, self.bounds, self.bounds[1:])
        )

    def order(self, order: str, seed: int = 0) -> torch.Tensor:
        """Each feature's position in the removal order (0 = removed first), ``(B, F)``.

        ``morf``: most relevant first; ``lerf``: least relevant first; ``random``: seeded.
        """
        if order == "random":
            generator = torch.Generator(device="cpu").manual_seed(seed)
            keys = torch.rand(self.scores.shape, generator=generator).to(self.scores.device)
        elif order in ("morf", "lerf"):
            keys = -self.scores if order == "morf" else self.scores
        else:
            raise unknown_name("removal order", order, ("morf", "lerf", "random"))
        idx = keys.argsort(dim=1, stable=True)
        position = torch.empty_like(idx)
        position.scatter_(1, idx, torch.arange(self.count, device=idx.device).expand_as(idx))
        return position


class _InputFeatures:
    """The features of one input tensor: image pixels or patches, else its elements."""

    def __init__(
        self, x: torch.Tensor, a: torch.Tensor, patch_size: int, reduce: str, name: str
    ) -> None:
        self.image = x.dim() == 4 and a.dim() == 4 and a.shape[-2:] == x.shape[-2:]
        self.shape = x.shape
        self.patch = int(patch_size)
        if self.image:
            m = attribution_map(a, reduce).unsqueeze(1)
            if self.patch > 1:
                m = F.avg_pool2d(m, self.patch, ceil_mode=True) * self.patch**2
            self.grid = m.shape[-2:]
            self.scores = m.flatten(1)
        elif a.shape == x.shape:
            self.scores = a.detach().float().flatten(1)
        else:
            raise InputError(
                f"attributions of shape {tuple(a.shape)} do not match the {name} "
                f"{tuple(x.shape)}: pass attributions with the inputs' shape, or (B, 1, H, W) "
                "maps at the images' resolution."
            )
        self.count = int(self.scores.shape[1])

    def expand(self, selected: torch.Tensor) -> torch.Tensor:
        if not self.image:
            return selected.reshape(-1, *self.shape[1:])
        m = selected.reshape(-1, 1, *self.grid)
        if self.patch > 1:
            m = m.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
            m = m[..., : self.shape[-2], : self.shape[-1]]
        return m


class Perturbation:
    """Noise added to the floating-point inputs: one ``(R, F)`` draw over the elements of all of
    them side by side (so the draws do not depend on how the features are split into inputs),
    split back into one tensor per input. Integer inputs (token ids) are left unperturbed."""

    def __init__(self, xs: Tensors, metric: str) -> None:
        self.xs = xs
        self.floats = [i for i, x in enumerate(xs) if x.is_floating_point()]
        if not self.floats:
            raise InputError(
                f"{metric}: noise is added to floating-point inputs only (integer inputs such "
                "as token ids are left unperturbed), but every input holds integers. Pass "
                "float inputs, e.g. embeddings."
            )
        self.sizes = [xs[i][0].numel() for i in self.floats]
        self.width = sum(self.sizes)
        self.dtype = functools.reduce(torch.promote_types, (xs[i].dtype for i in self.floats))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor | None]:
        """Per input: its share of `flat` ``(R, F)`` in its shape, dtype and device (None for
        integer inputs)."""
        parts: list[torch.Tensor | None] = [None] * len(self.xs)
        for i, chunk in zip(self.floats, flat.split(self.sizes, dim=1)):
            x = self.xs[i]
            parts[i] = chunk.reshape(-1, *x.shape[1:]).to(x.device, x.dtype)
        return parts

    def add(
        self, rows: Tensors, noise: Sequence[torch.Tensor | None], sign: float = 1.0
    ) -> Tensors:
        """`rows` plus (or, with ``sign=-1``, minus) the noise of each perturbed input."""
        return tuple(r if d is None else r + sign * d for r, d in zip(rows, noise))


def mix(masks: Tensors, chosen: Tensors, others: Tensors, example: torch.Tensor) -> Tensors:
    """Rows of every input: ``chosen[example]`` where its mask is set, ``others[example]`` else."""
    return tuple(torch.where(m, a[example], b[example]) for m, a, b in zip(masks, chosen, others))
