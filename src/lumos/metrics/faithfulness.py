"""Faithfulness: does removing what the explanation calls relevant change the model's output?

All perturbed rows of all examples (every step of a curve, every random subset) are built on the
model's device and scored in forwards of at most `batch_size` rows; there is no loop over
examples or steps in Python. Removed features are replaced by `baseline`: a number, a tensor, or
``zeros`` / ``uniform`` (seeded noise in each example's range) / ``blur`` / ``mean``. Image
features are pixels (or `patch_size` × `patch_size` patches) across all channels; other inputs
have one feature per element (token ids: pass an int `baseline`, e.g. the padding id).

Several inputs (a tuple or dict of tensors, as the model takes them, with attributions in the
same structure): the features of all inputs are ranked jointly — image inputs contribute
pixels or patches, the others their elements — so "the top 10 %" may take features from any
input. `baseline` is one value for every input or a tuple/dict with one per input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lumos.core.batching import check_count
from lumos.core.errors import InputError
from lumos.core.inputs import flatten_inputs
from lumos.core.targets import TargetLike
from lumos.metrics.base import (
    ModelRunner,
    Tensors,
    batched_rows,
    joined,
    pearson,
    register_metric,
)
from lumos.metrics.features import Features, Perturbation, fill_values, mix

BATCH_SIZE = 256


@dataclass
class Curve:
    """Per-example scores with the curve they summarise: ``y[i]`` against ``x``."""

    scores: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    x_label: str = "fraction of features removed"
    y_label: str = "target score"


def perturbation_curve(
    runner: ModelRunner,
    features: Features,
    fill: Tensors | None,
    fractions: torch.Tensor,
    *,
    order: str = "morf",
    insert: bool = False,
    seed: int = 0,
    impute: Callable[[Tensors, Tensors, torch.Tensor], Tensors] | None = None,
) -> torch.Tensor:
    """Target scores ``(B, K)`` after removing (or, with `insert`, inserting) the first
    ``fractions[k]`` of the features in `order`, for every example and step in batched forwards.

    `impute(rows, removed, example)` replaces removed features instead of `fill` (ROAD).
    """
    n, device = runner.n, runner.device
    position = features.order(order, seed)
    counts = torch.round(fractions.to(device, torch.float64) * features.count).long()
    steps = len(counts)
    example, step = batched_rows(n, steps, device)

    def make_rows(s: slice) -> Tensors:
        e = example[s]
        chosen = features.expand(position[e] < counts[step[s]].unsqueeze(1))
        if impute is not None:
            return impute(runner.rows(e), chosen, e)
        if insert:
            return mix(chosen, runner.xs, fill, e)
        return mix(chosen, fill, runner.xs, e)

    return runner.score(make_rows, n * steps, example).view(n, steps)


def _auc(fractions: torch.Tensor, curves: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under each curve over `fractions`, normalised by their span."""
    x = fractions.to(curves.device, curves.dtype)
    area = ((curves[:, 1:] + curves[:, :-1]) / 2 * (x[1:] - x[:-1])).sum(1)
    return area / (x[-1] - x[0])


def _steps(n_steps: int) -> torch.Tensor:
    check_count(n_steps, "n_steps")
    return torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)


def _curve_metric(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike,
    *,
    n_steps: int,
    baseline: Any,
    patch_size: int,
    order: str,
    insert: bool,
    probability: bool,
    batch_size: int | None,
    seed: int,
    label: str,
) -> Curve:
    runner = ModelRunner(model, inputs, target, batch_size=batch_size, probability=probability)
    features = Features(runner, attributions, patch_size)
    fractions = _steps(n_steps)
    fill = fill_values(runner.xs, runner.structure, baseline, seed)
    curves = perturbation_curve(
        runner, features, fill, fractions, order=order, insert=insert, seed=seed
    )
    y_label = "target probability" if probability else "target score"
    return Curve(_auc(fractions, curves).float(), fractions.float(), curves.float(), label, y_label)


@register_metric(
    "deletion",
    family="faithfulness",
    direction="lower",
    needs={"model"},
    curve=True,
    paper="Petsiuk, Das & Saenko (2018), RISE: Randomized Input Sampling for Explanation",
)
def deletion(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    n_steps: int = 32,
    baseline: Any = 0.0,
    patch_size: int = 1,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
    return_curve: bool = False,
) -> torch.Tensor | Curve:
    """Deletion: area under the target probability as the most relevant features are removed.

    ``AUC = ∫₀¹ p_c(x with the top-ranked fraction t of features set to baseline) dt``, with
    `n_steps` equal steps (trapezoid rule). A faithful map makes the probability drop at once:
    lower is better. `return_curve` returns a `Curve` (scores, fractions, probabilities).
    """
    curve = _curve_metric(
        model,
        inputs,
        attributions,
        target,
        n_steps=n_steps,
        baseline=baseline,
        patch_size=patch_size,
        order="morf",
        insert=False,
        probability=True,
        batch_size=batch_size,
        seed=seed,
        label="fraction of features deleted",
    )
    return curve if return_curve else curve.scores


@register_metric(
    "insertion",
    family="faithfulness",
    direction="higher",
    needs={"model"},
    curve=True,
    paper="Petsiuk, Das & Saenko (2018), RISE: Randomized Input Sampling for Explanation",
)
def insertion(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    n_steps: int = 32,
    baseline: Any = None,
    patch_size: int = 1,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
    return_curve: bool = False,
) -> torch.Tensor | Curve:
    """Insertion: area under the target probability as the most relevant features are restored.

    Starting from `baseline` (None: a blurred image for image inputs, zeros for the others),
    ``AUC = ∫₀¹ p_c(baseline with the top-ranked fraction t of features of x) dt``. A faithful
    map makes the probability rise at once: higher is better.
    """
    if baseline is None:
        tensors, structure = flatten_inputs(inputs)
        baseline = structure.restore(["blur" if x.dim() == 4 else 0.0 for x in tensors])
    curve = _curve_metric(
        model,
        inputs,
        attributions,
        target,
        n_steps=n_steps,
        baseline=baseline,
        patch_size=patch_size,
        order="morf",
        insert=True,
        probability=True,
        batch_size=batch_size,
        seed=seed,
        label="fraction of features inserted",
    )
    return curve if return_curve else curve.scores


@register_metric(
    "pixel_flipping",
    family="faithfulness",
    direction="lower",
    needs={"model"},
    curve=True,
    paper="Bach et al. (2015), On Pixel-Wise Explanations by Layer-Wise Relevance Propagation",
)
def pixel_flipping(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    n_steps: int = 32,
    baseline: Any = 0.0,
    order: str = "morf",
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
    return_curve: bool = False,
) -> torch.Tensor | Curve:
    """Pixel flipping: area under the target logit as pixels are flipped to `baseline`.

    ``AUC = ∫₀¹ f_c(x with the first fraction t of pixels flipped) dt`` in `n_steps` steps.
    ``order="morf"`` (most relevant first, the default) — lower is better; ``"lerf"`` (least
    relevant first) reverses the reading — higher is better.
    """
    curve = _curve_metric(
        model,
        inputs,
        attributions,
        target,
        n_steps=n_steps,
        baseline=baseline,
        patch_size=1,
        order=order,
        insert=False,
        probability=False,
        batch_size=batch_size,
        seed=seed,
        label=f"fraction of pixels flipped ({order.upper()})",
    )
    return curve if return_curve else curve.scores


@register_metric(
    "region_perturbation",
    family="faithfulness",
    direction="higher",
    needs={"model"},
    curve=True,
    paper="Samek et al. (2017), Evaluating the Visualization of What a Deep Neural Network "
    "Has Learned",
)
def region_perturbation(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    patch_size: int = 8,
    n_steps: int = 16,
    baseline: Any = "uniform",
    order: str = "morf",
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
    return_curve: bool = False,
) -> torch.Tensor | Curve:
    """Region perturbation: AOPC as `patch_size` regions are replaced by noise, most relevant first.

    ``AOPC = 1/(K+1) Σ_{k=0..K} [f_c(x) − f_c(x with the k most relevant regions perturbed)]``
    over ``K = n_steps`` steps of equal size, regions ranked by their summed relevance and
    replaced by `baseline` (seeded uniform noise by default). Regions are patches of image
    inputs; every element of a non-image input is a region of its own. MoRF (the default):
    higher is better; ``order="lerf"``: lower is better.
    """
    runner = ModelRunner(model, inputs, target, batch_size=batch_size)
    features = Features(runner, attributions, patch_size)
    fractions = _steps(n_steps)
    fill = fill_values(runner.xs, runner.structure, baseline, seed)
    curves = perturbation_curve(runner, features, fill, fractions, order=order, seed=seed)
    aopc = (runner.values.double().unsqueeze(1) - curves).mean(1).float()
    if return_curve:
        label = f"fraction of regions perturbed ({order.upper()})"
        return Curve(aopc, fractions.float(), curves.float(), label, "target score")
    return aopc


def noisy_linear_imputation(
    x: torch.Tensor, removed: torch.Tensor, noise: torch.Tensor, n_iterations: int
) -> torch.Tensor:
    """Fill `removed` pixels of images `x` with the weighted mean of their 8 neighbours.

    The weights (1/6 edge, 1/12 diagonal) are ROAD's; the linear system "every removed pixel
    equals the weighted mean of its neighbours" is solved by `n_iterations` Jacobi sweeps (all
    rows at once) started from the mean of the kept pixels, then `noise` is added.
    """
    kept = (~removed).to(x.dtype)
    start = (x * kept).sum((2, 3), keepdim=True) / kept.sum((2, 3), keepdim=True).clamp_min(1)
    values = torch.where(removed, start, x)
    norm = _neighbour_sum(torch.ones_like(x[:1, :1]))
    for _ in range(n_iterations):
        values = torch.where(removed, _neighbour_sum(values) / norm, x)
    return torch.where(removed, values + noise, x)


def _neighbour_sum(images: torch.Tensor) -> torch.Tensor:
    """ROAD's weighted sum of the 8 neighbours (1/6 edge, 1/12 diagonal), zero outside."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1))
    total = torch.zeros_like(images)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                weight = 1 / 12 if dy and dx else 1 / 6
                total += weight * padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return total


@register_metric(
    "road",
    family="faithfulness",
    direction="lower",
    needs={"model"},
    curve=True,
    paper="Rong et al. (2022), A Consistent and Efficient Evaluation Strategy for Attribution "
    "Methods (ROAD)",
)
def road(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    order: str = "morf",
    noise: float = 0.01,
    n_iterations: int = 50,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
    return_curve: bool = False,
) -> torch.Tensor | Curve:
    """ROAD: mean target probability after removing pixels by noisy linear imputation.

    ``ROAD = 1/K Σ_k p_c(impute(x, top fraction_k of pixels))``: removed pixels take the
    weighted mean of their neighbours plus Gaussian noise of std `noise` (seeded), so the
    removal leaks no information about the mask's shape. MoRF (default): lower is better;
    ``order="lerf"``: higher is better. Images only (with several inputs, all images, their
    pixels ranked jointly and each imputed within its own image).
    """
    runner = ModelRunner(model, inputs, target, batch_size=batch_size, probability=True)
    if any(x.dim() != 4 for x in runner.xs):
        raise InputError(
            "road imputes pixels from their neighbours: it needs (B, C, H, W) images "
            "(with several inputs, every input must be an image)."
        )
    features = Features(runner, attributions)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    fields = [
        (torch.randn(x.shape, generator=generator, dtype=x.dtype) * noise).to(runner.device)
        for x in runner.xs
    ]
    steps = torch.tensor(list(fractions), dtype=torch.float64)

    def impute(rows: Tensors, removed: Tensors, example: torch.Tensor) -> Tensors:
        return tuple(
            noisy_linear_imputation(r, m, field[example], n_iterations)
            for r, m, field in zip(rows, removed, fields)
        )

    curves = perturbation_curve(runner, features, None, steps, order=order, impute=impute)
    scores = curves.mean(1).float()
    if return_curve:
        label = f"fraction of pixels imputed ({order.upper()})"
        return Curve(scores, steps.float(), curves.float(), label, "target probability")
    return scores


def seeded_rows(
    s: slice, n: int, seed: int, draw: Callable[[torch.Generator], torch.Tensor]
) -> torch.Tensor:
    """Random draws for rows `s` of a repeat-major layout (row = k·n + example): repeat k uses
    its own generator seeded from (`seed`, k), so the draws do not depend on the chunking."""
    parts = []
    for k in range(s.start // n, (s.stop - 1) // n + 1):
        block = draw(torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + k))
        parts.append(block[max(s.start - k * n, 0) : min(s.stop - k * n, n)])
    return torch.cat(parts)


@register_metric(
    "faithfulness_correlation",
    family="faithfulness",
    direction="higher",
    needs={"model"},
    paper="Bhatt, Weller & Moura (2020), Evaluating and Aggregating Feature-based Model "
    "Explanations",
)
def faithfulness_correlation(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    n_samples: int = 64,
    subset_size: float = 0.05,
    baseline: Any = 0.0,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
) -> torch.Tensor:
    """Faithfulness correlation: Pearson correlation of removed relevance with the output drop.

    ``corr_S( Σ_{i∈S} a_i , f_c(x) − f_c(x_{S←baseline}) )`` over `n_samples` random subsets S
    of `subset_size` of the features (a fraction, or a count when ≥ 1; with several inputs,
    drawn from the features of all of them), seeded. Higher is better.
    """
    runner = ModelRunner(model, inputs, target, batch_size=batch_size)
    features = Features(runner, attributions)
    n, count = runner.n, features.count
    size = int(subset_size) if subset_size >= 1 else max(1, round(subset_size * count))
    fill = fill_values(runner.xs, runner.structure, baseline, seed)
    rows = torch.arange(n * n_samples, device=runner.device)
    example = rows % n
    removed_relevance = torch.empty(n * n_samples, dtype=torch.float64, device=runner.device)

    def make_rows(s: slice) -> Tensors:
        keys = seeded_rows(s, n, seed, lambda g: torch.rand(n, count, generator=g))
        subset = keys.to(runner.device).topk(size, dim=1).indices
        chosen = torch.zeros(len(keys), count, dtype=torch.bool, device=runner.device)
        chosen.scatter_(1, subset, True)
        e = example[s]
        removed_relevance[s] = (features.scores[e] * chosen).sum(1).double()
        return mix(features.expand(chosen), fill, runner.xs, e)

    drops = runner.values.double()[example] - runner.score(make_rows, n * n_samples, example)
    by_example = (n_samples, n)
    return pearson(removed_relevance.view(by_example).T, drops.view(by_example).T).float()


@register_metric(
    "infidelity",
    family="faithfulness",
    direction="lower",
    needs={"model"},
    paper="Yeh et al. (2019), On the (In)fidelity and Sensitivity of Explanations",
)
def infidelity(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    n_samples: int = 32,
    noise_std: float = 0.1,
    normalize: bool = True,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
) -> torch.Tensor:
    """Infidelity: expected squared error of the attribution's prediction of output changes.

    ``INFD = E_{I∼N(0, σ²)} [(β·Iᵀa − (f_c(x) − f_c(x − I)))²]`` over `n_samples` seeded
    perturbations (σ = `noise_std`). With `normalize` (the default) β is the least-squares scale
    of Iᵀa to the output changes, so maps of any scale compare fairly (Yeh et al.'s
    scale-invariant variant); ``normalize=False`` uses β = 1. A (B, 1, H, W) map is broadcast over
    the channels. With several inputs, I perturbs every floating-point input (one draw over
    all their elements) and Iᵀa sums over all of them; integer inputs (token ids) are left
    unperturbed. Lower is better.
    """
    runner = ModelRunner(model, inputs, target, batch_size=batch_size)
    n = runner.n
    features = Features(runner, attributions)  # validates the shapes
    weights = [
        _as_input_weights(a, x) if part.image else part.scores.view_as(x)
        for part, a, x in zip(features.parts, features.attributions, runner.xs)
    ]
    perturbation = Perturbation(runner.xs, "infidelity")
    example = torch.arange(n * n_samples, device=runner.device) % n
    dots = torch.empty(n * n_samples, dtype=torch.float64, device=runner.device)

    def normal(g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, perturbation.width, generator=g, dtype=perturbation.dtype)

    def make_rows(s: slice) -> Tensors:
        draws = perturbation.split(seeded_rows(s, n, seed, normal))
        noise = [None if d is None else d * noise_std for d in draws]
        e = example[s]
        products = [d * w[e] for d, w in zip(noise, weights) if d is not None]
        dots[s] = joined(products).sum(1).double()
        return perturbation.add(runner.rows(e), noise, sign=-1.0)

    drops = runner.values.double()[example] - runner.score(make_rows, n * n_samples, example)
    dots_, drops_ = dots.view(n_samples, n).T, drops.view(n_samples, n).T
    beta = torch.ones(n, dtype=torch.float64, device=runner.device)
    if normalize:
        beta = (dots_ * drops_).mean(1) / (dots_**2).mean(1).clamp_min(1e-30)
    return ((beta.unsqueeze(1) * dots_ - drops_) ** 2).mean(1).float()


def _as_input_weights(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a = a.to(x.device, x.dtype)
    return a.expand_as(x) if a.shape[1] == 1 else a


def _top_fraction_scores(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike,
    fractions: Sequence[float],
    baseline: Any,
    keep: bool,
    batch_size: int | None,
    seed: int,
) -> torch.Tensor:
    runner = ModelRunner(model, inputs, target, batch_size=batch_size, probability=True)
    features = Features(runner, attributions)
    fill = fill_values(runner.xs, runner.structure, baseline, seed)
    steps = torch.tensor(list(fractions), dtype=torch.float64)
    # keeping only the top k is inserting them into the baseline
    curves = perturbation_curve(runner, features, fill, steps, insert=keep)
    return (runner.values.double().unsqueeze(1) - curves).mean(1).float()


ERASER_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)


@register_metric(
    "comprehensiveness",
    family="faithfulness",
    direction="higher",
    needs={"model"},
    paper="DeYoung et al. (2020), ERASER: A Benchmark to Evaluate Rationalized NLP Models",
)
def comprehensiveness(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    baseline: Any = 0.0,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
) -> torch.Tensor:
    """Comprehensiveness: how much the target probability drops without the top features.

    ``1/|K| Σ_k [p_c(x) − p_c(x with its top-k% features replaced by baseline)]`` over the
    `fractions` (ERASER's 1, 5, 10, 20, 50 %). Made for tokens (pass the padding id as
    `baseline`) and tables; works on images too. Higher is better.
    """
    return _top_fraction_scores(
        model, inputs, attributions, target, fractions, baseline, False, batch_size, seed
    )


@register_metric(
    "sufficiency",
    family="faithfulness",
    direction="lower",
    needs={"model"},
    paper="DeYoung et al. (2020), ERASER: A Benchmark to Evaluate Rationalized NLP Models",
)
def sufficiency(
    model: Callable,
    inputs: Any,
    attributions: Any,
    target: TargetLike = "predicted",
    *,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    baseline: Any = 0.0,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
) -> torch.Tensor:
    """Sufficiency: how much the target probability drops when only the top features are kept.

    ``1/|K| Σ_k [p_c(x) − p_c(only the top-k% features of x, the rest baseline)]`` over the
    `fractions` (ERASER's 1, 5, 10, 20, 50 %). Lower is better.
    """
    return _top_fraction_scores(
        model, inputs, attributions, target, fractions, baseline, True, batch_size, seed
    )
