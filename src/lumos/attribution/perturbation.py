"""Perturbation attribution: occlusion (sliding windows), feature ablation (players) and RISE
(random masks). Every perturbed copy of every example is built as a tensor and evaluated in
large batches on the model's device."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lumos.attribution.baselines import resolve_baselines
from lumos.attribution.blackbox import (
    BlackBoxMethod,
    PlayerMethod,
    make_players,
    references,
)
from lumos.core.batching import check_count
from lumos.core.errors import InputError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Attribution, Context
from lumos.core.registry import register
from lumos.core.targets import TargetLike

WindowLike = int | Sequence[int] | None


@register("occlusion", family="perturbation", needs={"black_box"})
class Occlusion(BlackBoxMethod):
    """Occlusion: the drop of the target when a sliding window of the input is covered.

    Zeiler & Fergus (2014), "Visualizing and Understanding Convolutional Networks".
    ``attr_j = mean over windows W ∋ j of (f(x) − f(x with W set to fill))``: the same as
    Captum's `Occlusion` with the same windows, strides and baseline. With disjoint windows
    (stride = window) each element carries its window's drop, and on a model linear in the
    input the drops add up to ``f(x) − f(fill)``.

    Options:
        window: window size. An int k covers (C, k, k) of an image and k positions of other
            inputs (all of their remaining dims); a tuple gives the spatial (H, W) of an image
            or every non-batch dim. Default: an eighth of the image side (1 for other inputs).
        stride: step between windows, int or tuple like `window`; default half the window.
        fill (call): what covered elements become — a number, ``mean`` (each example's
            per-channel mean colour), ``blur`` (a Gaussian blur), or a tensor.
    """

    def __init__(
        self,
        model: Callable,
        *,
        window: WindowLike = None,
        stride: WindowLike = None,
        progress: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, progress=progress, batch_size=batch_size)
        self.window, self.stride = window, stride

    def _config(self) -> dict[str, Any]:
        config = {**super()._config(), "window": self.window, "stride": self.stride}
        config.pop("seed")
        return config

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, fill: Any = 0.0
    ) -> Explanation:
        return self._run(inputs, target, fill=fill)

    def attribute(self, ctx: Context, fill: Any = 0.0) -> Attribution:
        fills = resolve_baselines(fill, ctx.inputs, ctx.structure)
        f_x = ctx.target_values()
        return Attribution(
            tuple(self.occlude(ctx, i, fill_x, f_x) for i, fill_x in enumerate(fills))
        )

    def occlude(
        self, ctx: Context, i: int, fill_x: torch.Tensor, f_x: torch.Tensor
    ) -> torch.Tensor:
        """Attributions of input `i`: windows slide over it while the other inputs stay."""
        x = ctx.inputs[i]
        window = _window(self.window, x, None)
        stride = _window(self.stride, x, tuple(max(1, w // 2) for w in window))
        masks = window_masks(x.shape[1:], window, stride, x.device)  # (P, *feature)
        n_pos = masks.shape[0]
        example = torch.arange(ctx.n, device=x.device).repeat_interleave(n_pos)

        def make_rows(s: slice) -> list[torch.Tensor]:
            e, p = example[s], torch.arange(s.start, s.stop, device=x.device) % n_pos
            row = torch.where(masks[p], fill_x[e], x[e])
            return [row if j == i else other[e] for j, other in enumerate(ctx.inputs)]

        values = self.evaluate(ctx, make_rows, example).view(ctx.n, n_pos)
        drops = (f_x[:, None] - values).to(torch.float64)
        flat = masks.reshape(n_pos, -1).to(torch.float64)
        counts = flat.sum(0).clamp(min=1)
        return ((drops @ flat) / counts).view(x.shape)


def _window(value: WindowLike, x: torch.Tensor, default: tuple[int, ...] | None) -> tuple:
    """A window or stride over all non-batch dims of `x`."""
    feature = tuple(int(d) for d in x.shape[1:])
    image = x.dim() == 4
    if value is None:
        if default is not None:
            return default
        value = max(1, min(feature[-2:]) // 8) if image else 1
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        raise InputError(f"window and stride must be ints or tuples of ints, got {value!r}.")
    if isinstance(value, int):
        value = (feature[0], value, value) if image else (value, *feature[1:])
    value = tuple(int(v) for v in value)
    if image and len(value) == 2:
        value = (feature[0], *value)
    if len(value) != len(feature) or any(v < 1 for v in value):
        raise InputError(
            f"window/stride {value} does not fit inputs with example shape {feature}: pass an "
            f"int or a tuple of {len(feature)} positive ints."
        )
    return tuple(min(v, d) for v, d in zip(value, feature))


def window_masks(
    shape: Sequence[int], window: Sequence[int], stride: Sequence[int], device: torch.device
) -> torch.Tensor:
    """(P, *shape) bool: the elements under each window position (positions as in Captum:
    ``ceil((size − window) / stride) + 1`` per dim, the last windows cut at the border, so
    every element is covered)."""
    k = len(shape)
    mask = torch.ones((1,) * (2 * k), dtype=torch.bool, device=device)
    for d, (size, w, st) in enumerate(zip(shape, window, stride)):
        starts = torch.arange(-(-(size - w) // st) + 1, device=device) * st
        idx = torch.arange(size, device=device)
        cover = (idx[None, :] >= starts[:, None]) & (idx[None, :] < starts[:, None] + w)
        view = [1] * (2 * k)
        view[d], view[k + d] = cover.shape
        mask = mask & cover.view(view)
    return mask.reshape(-1, *shape)


@register("feature_ablation", family="perturbation", needs={"black_box"})
class FeatureAblation(PlayerMethod):
    """Feature ablation: the drop of the target when one player is replaced by its reference.

    Leave-one-out attribution (e.g. Zeiler & Fergus 2014; Captum's `FeatureAblation`).
    ``attr_i = f(x) − E_k f(x with player i set to reference k)`` for every element of player
    i. No summation identity holds in general; on a model additive in the players the values
    sum to ``f(x) − f(reference)``.
    """

    def __init__(
        self, model: Callable, *, progress: bool = False, batch_size: int | None = None
    ) -> None:
        super().__init__(model, progress=progress, batch_size=batch_size)

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config.pop("seed")
        return config

    def attribute(self, ctx: Context, baselines: Any = None, feature_mask: Any = None):
        players = make_players(ctx.inputs, feature_mask)
        refs = references(baselines, ctx.inputs, ctx.structure)
        m = players.n_players
        values = self.coalition_values(ctx, players, refs, ~torch.eye(m, dtype=torch.bool))
        drops = ctx.target_values().double()[:, None] - values
        return Attribution(
            players.spread(drops, [x.shape for x in ctx.inputs]),
            extras={"n_players": m, "feature_mask": players.masks[0]},
        )


@register("rise", family="perturbation", needs={"black_box"})
class Rise(PlayerMethod):
    """RISE: the target's average over random masks, weighted by each mask.

    Petsiuk, Das & Saenko (2018), "RISE: Randomized Input Sampling for Explanation of
    Black-box Models". ``S(j) = 1/(N·p) Σ_i f(x ⊙ M_i + r ⊙ (1 − M_i)) · M_i(j)``: for images
    the masks are `cells × cells` grids of Bernoulli(p) cells, upsampled bilinearly and shifted
    by a random sub-cell offset; for other inputs Bernoulli(p) masks over the players
    (`feature_mask`). S estimates ``E[f(x ⊙ M) | M(j) = 1]`` (up to the 1/p scale).

    Options:
        n_masks: the number of random masks (model evaluations per example); the paper uses
            thousands on ImageNet, the default 500 keeps small images interactive.
        cells: grid resolution of the image masks.
        p: probability that a cell (player) is kept.
        baselines (call): what masked elements become (r; default zeros, as in the paper).
        feature_mask (call): players for non-image inputs.
    """

    def __init__(
        self,
        model: Callable,
        *,
        n_masks: int = 500,
        cells: int = 7,
        p: float = 0.5,
        seed: int = 0,
        progress: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, seed=seed, progress=progress, batch_size=batch_size)
        self.n_masks = check_count(n_masks, "n_masks")
        self.cells = check_count(cells, "cells")
        if not (isinstance(p, (int, float)) and 0 < p < 1):
            raise InputError(f"p must be a probability in (0, 1), got {p!r}.")
        self.p = float(p)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "n_masks": self.n_masks, "cells": self.cells, "p": self.p}

    def attribute(self, ctx: Context, baselines: Any = None, feature_mask: Any = None):
        if len(ctx.inputs) == 1 and ctx.inputs[0].dim() == 4 and feature_mask is None:
            return Attribution((self.image_saliency(ctx, baselines),))
        players = make_players(ctx.inputs, feature_mask)
        refs = references(baselines, ctx.inputs, ctx.structure, seed=self.seed)
        on = torch.rand(self.n_masks, players.n_players, generator=self.generator()) < self.p
        values = self.coalition_values(ctx, players, refs, on)
        saliency = values @ on.to(values.device, torch.float64) / (self.n_masks * self.p)
        return Attribution(players.spread(saliency, [x.shape for x in ctx.inputs]))

    def image_saliency(self, ctx: Context, baselines: Any) -> torch.Tensor:
        x = ctx.inputs[0]
        ref = resolve_baselines(baselines, ctx.inputs, ctx.structure, seed=self.seed)[0]
        h, w = x.shape[-2:]
        cells = min(self.cells, h, w)
        generator = self.generator()
        grids = (torch.rand(self.n_masks, 1, cells, cells, generator=generator) < self.p).float()
        cell_h, cell_w = math.ceil(h / cells), math.ceil(w / cells)
        shift_h = torch.randint(cell_h, (self.n_masks,), generator=generator)
        shift_w = torch.randint(cell_w, (self.n_masks,), generator=generator)
        grids, shift_h, shift_w = grids.to(x.device), shift_h.to(x.device), shift_w.to(x.device)

        def masks(index: torch.Tensor) -> torch.Tensor:
            up = F.interpolate(
                grids[index], size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear"
            )[:, 0]
            rows = shift_h[index, None] + torch.arange(h, device=x.device)
            cols = shift_w[index, None] + torch.arange(w, device=x.device)
            picked = up.gather(1, rows[:, :, None].expand(-1, -1, up.shape[2]))
            return picked.gather(2, cols[:, None, :].expand(-1, h, -1)).unsqueeze(1).to(x.dtype)

        n_masks = self.n_masks
        example = torch.arange(ctx.n, device=x.device).repeat_interleave(n_masks)

        def make_rows(s: slice) -> list[torch.Tensor]:
            e = example[s]
            m = masks(torch.arange(s.start, s.stop, device=x.device) % n_masks)
            return [x[e] * m + ref[e] * (1 - m)]

        values = self.evaluate(ctx, make_rows, example).view(ctx.n, n_masks).to(torch.float64)
        saliency = torch.zeros(ctx.n, h * w, dtype=torch.float64, device=x.device)
        step = max(1, 2**22 // (h * w))
        for start in range(0, n_masks, step):
            index = torch.arange(start, min(start + step, n_masks), device=x.device)
            saliency += values[:, index] @ masks(index).reshape(len(index), -1).double()
        saliency /= n_masks * self.p
        return saliency.view(ctx.n, 1, h, w).expand_as(x)
