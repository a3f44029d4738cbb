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
    ModelRunner,
    Tensors,
    as_attributions,
    attribution_parts,
    batched_rows,
    explainer_for,
    input_name,
    joined,
    register_metric,
    same_shapes,
)
from lumos.metrics.features import Features, fill_values, mix

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
    With several inputs, Σ_i runs over the attributions of all of them and x' sets every input
    to its baseline (one value for all, or a tuple/dict with one per input). Lower is better.
    """
    runner = ModelRunner(model, inputs, target, batch_size=batch_size)
    parts = runner.attributions(attributions)
    for i, (a, x) in enumerate(zip(parts, runner.xs)):
        if a.shape != x.shape:
            where = "" if len(parts) == 1 else f" of {input_name(runner.structure, i)}"
            raise InputError(
                f"completeness needs attributions with the inputs' shape{where} "
                f"{tuple(x.shape)}, got {tuple(a.shape)} (maps such as CAM's do not sum to "
                "the output)."
            )
    fill = fill_values(runner.xs, runner.structure, baseline, seed)
    f_base = runner.score(lambda s: tuple(f[s] for f in fill), runner.n, runner.index)
    difference = runner.values.double() - f_base
    error = (joined(parts).double().sum(1) - difference).abs()
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

    Each feature (an image input's `patch_size` × `patch_size` patch, else an element; with
    several inputs, the features of all of them) is set to `baseline` on its own; it violates
    the axiom when ``|f_c(x) − f_c(x_{i←baseline})| ≤ eps`` but ``|a_i| > eps · max|a|``, or
    the other way round. Score = violations / features; all single-feature removals run in
    batched forwards. Lower is better.
    """
    runner = ModelRunner(model, inputs, target, batch_size=batch_size)
    features = Features(runner, attributions, patch_size, reduce="abs_sum")
    fill = fill_values(runner.xs, runner.structure, baseline, seed)
    n, count, device = runner.n, features.count, runner.device
    example, feature = batched_rows(n, count, device)

    def make_rows(s: slice) -> Tensors:
        chosen = torch.zeros(s.stop - s.start, count, dtype=torch.bool, device=device)
        chosen[torch.arange(len(chosen), device=device), feature[s]] = True
        return mix(features.expand(chosen), fill, runner.xs, example[s])

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
    saliency, large for input × gradient or IG with a zero baseline. With several inputs every
    floating-point input is shifted (and unshifted by the copy) and the norms run over the
    attributions of all of them; integer inputs (token ids) are left as they are. Lower is
    better.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError("input_invariance shifts a copy of a torch.nn.Module.")
    runner = ModelRunner(model, inputs, target)
    if not any(x.is_floating_point() for x in runner.xs):
        raise InputError(
            "input_invariance shifts floating-point inputs, but every input holds integers "
            "(token ids)."
        )
    explain = explainer_for(explainer, method_options)
    targets = runner.target_argument()
    if attributions is None:
        attributions = explain(model, runner.inputs, targets)
    before, structure = attribution_parts(attributions, runner.n)

    def unshift(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value - shift
        return value

    shifted = copy.deepcopy(model)
    shifted.register_forward_pre_hook(
        lambda module, args, kwargs: (
            tuple(unshift(a) for a in args),
            {k: unshift(v) for k, v in kwargs.items()},
        ),
        with_kwargs=True,
    )
    moved = tuple(x + shift if x.is_floating_point() else x for x in runner.xs)
    after = explain(shifted, runner.structure.restore(moved), targets)
    after = as_attributions(after, structure, runner.n, "the explainer's attributions")
    same_shapes(before, after, "the shifted model's attributions")
    reference = joined([a.to(runner.device) for a in before]).double()
    change = (joined([a.to(runner.device) for a in after]).double() - reference).abs().sum(1)
    return (change / reference.abs().sum(1).clamp_min(1e-30)).float()
