"""Axiomatic properties: completeness, non-sensitivity and input invariance."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lumos.core.errors import InputError, UnsupportedModelError
from lumos.core.targets import TargetLike
from lumos.metrics.base import (
    Features,
    ModelRunner,
    as_batch,
    batched_rows,
    explainer_for,
    fill_values,
    register_metric,
)

BATCH_SIZE = 256


@register_metric(
    "completeness",
    family="axiomatic",
    direction="lower",
    needs={"model"},
    paper="Sundararajan, Taly & Yan (2017), Axiomatic Attribution for Deep Networks",
)
def completeness(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    baseline: Any = 0.0,
    relative: bool = False,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
) -> torch.Tensor:
    """Completeness error: how far the attributions are from summing to the output difference.

    ``|Σ_i a_i − (f_c(x) − f_c(x'))|`` with x' = `baseline` — the identity integrated gradients,
    DeepLIFT and LRP-0 satisfy (0 up to their numerical error, as in `Explanation.delta`); with
    `relative`, divided by ``|f_c(x) − f_c(x')|``. Needs attributions with the inputs' shape.
    Lower is better.
    """
    runner = ModelRunner(model, inputs, target, batch_size=batch_size)
    a = as_batch(attributions, "attributions").to(runner.device)
    if a.shape != runner.x.shape:
        raise InputError(
            f"completeness needs attributions with the inputs' shape {tuple(runner.x.shape)}, "
            f"got {tuple(a.shape)} (maps such as CAM's do not sum to the output)."
        )
    fill = fill_values(runner.x, baseline, seed)
    f_base = runner.score(lambda s: fill[s], runner.n, runner.index)
    difference = runner.values.double() - f_base
    error = (a.double().flatten(1).sum(1) - difference).abs()
    return (error / difference.abs().clamp_min(1e-12) if relative else error).float()


@register_metric(
    "non_sensitivity",
    family="axiomatic",
    direction="lower",
    needs={"model"},
    paper="Nguyen & Martínez (2020), On Quantitative Aspects of Model Interpretability",
)
def non_sensitivity(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    patch_size: int = 4,
    baseline: Any = 0.0,
    eps: float = 1e-5,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
) -> torch.Tensor:
    """Non-sensitivity: the share of features whose attribution and effect disagree on being zero.

    Each feature (an image's `patch_size` × `patch_size` patch, else an element) is set to
    `baseline` on its own; it violates the axiom when ``|f_c(x) − f_c(x_{i←baseline})| ≤ eps``
    but ``|a_i| > eps · max|a|``, or the other way round. Score = violations / features; all
    single-feature removals run in batched forwards. Lower is better.
    """
    runner = ModelRunner(model, inputs, target, batch_size=batch_size)
    features = Features(runner.x, attributions, patch_size, reduce="abs_sum")
    fill = fill_values(runner.x, baseline, seed)
    n, count, device = runner.n, features.count, runner.device
    example, feature = batched_rows(n, count, device)

    def make_rows(s: slice) -> torch.Tensor:
        chosen = torch.zeros(s.stop - s.start, count, dtype=torch.bool, device=device)
        chosen[torch.arange(len(chosen), device=device), feature[s]] = True
        e = example[s]
        return torch.where(features.expand(chosen), fill[e], runner.x[e])

    effect = (runner.values.double()[example] - runner.score(make_rows, n * count, example)).abs()
    sensitive = effect.view(n, count) > eps
    relevance = features.scores.abs().double()
    relevant = relevance > eps * relevance.amax(1, keepdim=True)
    return (sensitive != relevant).double().mean(1).float()


@register_metric(
    "input_invariance",
    family="axiomatic",
    direction="lower",
    needs={"model", "explainer"},
    paper="Kindermans et al. (2019), The (Un)reliability of Saliency Methods",
)
def input_invariance(
    model: nn.Module,
    inputs: Any,
    explainer: Any,
    target: TargetLike = "predicted",
    *,
    attributions: Any = None,
    shift: float = -1.0,
    method_options: dict | None = None,
) -> torch.Tensor:
    """Input invariance: does the explanation change under a shift the model cancels?

    A copy of the model undoes a constant shift of its input first (Kindermans et al. fold it
    into the first layer's bias), so ``f'(x + shift) = f(x)`` exactly. Score
    ``‖Φ(f', x + shift) − Φ(f, x)‖₁ / ‖Φ(f, x)‖₁`` — 0 for an input-invariant method such as
    saliency, large for input × gradient or IG with a zero baseline. Lower is better.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError("input_invariance shifts a copy of a torch.nn.Module.")
    runner = ModelRunner(model, inputs, target)
    explain = explainer_for(explainer, method_options)
    targets = runner.target_argument()
    if attributions is None:
        attributions = explain(model, runner.x, targets)
    shifted = copy.deepcopy(model)
    shifted.register_forward_pre_hook(
        lambda module, args: (args[0] - shift, *args[1:]) if args else None
    )
    after = explain(shifted, runner.x + shift, targets)
    before = as_batch(attributions, "attributions").to(runner.device).double().flatten(1)
    change = (after.to(runner.device).double().flatten(1) - before).abs().sum(1)
    return (change / before.abs().sum(1).clamp_min(1e-30)).float()
