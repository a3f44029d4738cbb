"""Robustness: does the explanation stay put when the input barely moves?

These metrics re-explain perturbed inputs, so they take the method (`explainer`: a registered
method name with `method_options`, or a callable ``(model, inputs, target) -> attributions``)
rather than fixed attributions. The `n_samples` perturbations of all examples are explained in
calls of at most `batch_size` rows, each on its example's original target class.

Several inputs (a tuple or dict of tensors, as the model takes them): every floating-point
input is perturbed — δ is one draw over the elements of all of them, and ‖δ‖ runs over all of
them — while integer inputs (token ids) are left unperturbed. The explainer gets the inputs in
their structure and returns attributions in it; ‖Φ‖ runs over the attributions of all inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lumos.core.batching import check_count
from lumos.core.targets import TargetLike
from lumos.metrics.base import (
    ModelRunner,
    Tensors,
    attribution_parts,
    explain_rows,
    explainer_for,
    joined,
    register_metric,
    same_shapes,
)
from lumos.metrics.faithfulness import seeded_rows
from lumos.metrics.features import Perturbation

BATCH_SIZE = 256


def _perturbed_changes(
    model: Callable,
    inputs: Any,
    explainer: Any,
    target: TargetLike,
    *,
    attributions: Any,
    n_samples: int,
    draw: Callable[[int, int, torch.Generator], torch.Tensor],
    batch_size: int | None,
    seed: int,
    method_options: dict | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, n_samples)`` relative explanation changes ‖Φ(x+δ) − Φ(x)‖ / ‖Φ(x)‖ and ‖δ‖."""
    check_count(n_samples, "n_samples")
    runner = ModelRunner(model, inputs, target)
    n, device = runner.n, runner.device
    perturbation = Perturbation(runner.xs, "robustness metrics")
    explain = explainer_for(explainer, method_options)
    if attributions is None:
        attributions = explain(model, runner.inputs, runner.target_argument())
    parts, structure = attribution_parts(attributions, n)
    base = joined([a.to(device) for a in parts]).double()
    base_norm = base.norm(dim=1).clamp_min(1e-30)
    example = torch.arange(n * n_samples, device=device) % n
    deltas = torch.empty(n * n_samples, dtype=torch.float64, device=device)
    changes = torch.empty(n * n_samples, dtype=torch.float64, device=device)

    def make_rows(s: slice) -> Tensors:
        flat = seeded_rows(s, n, seed, lambda g: draw(n, perturbation.width, g))
        delta = perturbation.split(flat)
        deltas[s] = joined([d for d in delta if d is not None]).double().norm(dim=1)
        return perturbation.add(runner.rows(example[s]), delta)

    rows = explain_rows(explain, runner, make_rows, n * n_samples, structure, example, batch_size)
    for s, a in rows:
        same_shapes(parts, a, "the attributions of perturbed inputs")
        changes[s] = (joined(a).double() - base[example[s]]).norm(dim=1)
    changes = changes / base_norm[example]
    return changes.view(n_samples, n).T, deltas.view(n_samples, n).T


def _uniform(radius: float) -> Callable[[int, int, torch.Generator], torch.Tensor]:
    def draw(n: int, width: int, g: torch.Generator) -> torch.Tensor:
        return (torch.rand(n, width, generator=g, dtype=torch.float64) * 2 - 1) * radius

    return draw


@register_metric(
    "max_sensitivity",
    family="robustness",
    direction="lower",
    needs={"model", "explainer"},
    paper="Yeh et al. (2019), On the (In)fidelity and Sensitivity of Explanations",
)
def max_sensitivity(
    model: Callable,
    inputs: Any,
    explainer: Any,
    target: TargetLike = "predicted",
    *,
    attributions: Any = None,
    n_samples: int = 10,
    radius: float = 0.02,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
    method_options: dict | None = None,
) -> torch.Tensor:
    """Max-sensitivity: the largest relative change of the explanation in a small ball.

    ``SENS_max = max_{‖δ‖∞ ≤ r} ‖Φ(x + δ) − Φ(x)‖₂ / ‖Φ(x)‖₂``, estimated with `n_samples`
    seeded uniform draws of δ in the L∞ ball of `radius` (in input units). Dividing by ‖Φ(x)‖
    (as Quantus does) makes methods of different scales comparable. Lower is better.
    `attributions` (of the unperturbed inputs) saves one explanation call.
    """
    changes, _ = _perturbed_changes(
        model,
        inputs,
        explainer,
        target,
        attributions=attributions,
        n_samples=n_samples,
        draw=_uniform(radius),
        batch_size=batch_size,
        seed=seed,
        method_options=method_options,
    )
    return changes.amax(1).float()


@register_metric(
    "avg_sensitivity",
    family="robustness",
    direction="lower",
    needs={"model", "explainer"},
    paper="Yeh et al. (2019), On the (In)fidelity and Sensitivity of Explanations",
)
def avg_sensitivity(
    model: Callable,
    inputs: Any,
    explainer: Any,
    target: TargetLike = "predicted",
    *,
    attributions: Any = None,
    n_samples: int = 10,
    radius: float = 0.02,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
    method_options: dict | None = None,
) -> torch.Tensor:
    """Avg-sensitivity: the mean relative change of the explanation in a small ball.

    ``SENS_avg = E_{‖δ‖∞ ≤ r} ‖Φ(x + δ) − Φ(x)‖₂ / ‖Φ(x)‖₂`` over `n_samples` seeded uniform
    draws (see `max_sensitivity`). Lower is better.
    """
    changes, _ = _perturbed_changes(
        model,
        inputs,
        explainer,
        target,
        attributions=attributions,
        n_samples=n_samples,
        draw=_uniform(radius),
        batch_size=batch_size,
        seed=seed,
        method_options=method_options,
    )
    return changes.mean(1).float()


@register_metric(
    "local_lipschitz",
    family="robustness",
    direction="lower",
    needs={"model", "explainer"},
    paper="Alvarez-Melis & Jaakkola (2018), On the Robustness of Interpretability Methods",
)
def local_lipschitz(
    model: Callable,
    inputs: Any,
    explainer: Any,
    target: TargetLike = "predicted",
    *,
    attributions: Any = None,
    n_samples: int = 10,
    noise_std: float = 0.01,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
    method_options: dict | None = None,
) -> torch.Tensor:
    """Local Lipschitz estimate: the steepest relative change of the explanation near x.

    ``L = max_{x'} (‖Φ(x) − Φ(x')‖₂ / ‖Φ(x)‖₂) / ‖x − x'‖₂`` over `n_samples` seeded Gaussian
    neighbours ``x' = x + N(0, noise_std²)``; Φ is measured relative to ‖Φ(x)‖ so that the
    estimate does not depend on a method's scale. Lower is better.
    """

    def draw(n: int, width: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, width, generator=g, dtype=torch.float64) * noise_std

    changes, deltas = _perturbed_changes(
        model,
        inputs,
        explainer,
        target,
        attributions=attributions,
        n_samples=n_samples,
        draw=draw,
        batch_size=batch_size,
        seed=seed,
        method_options=method_options,
    )
    return (changes / deltas.clamp_min(1e-30)).amax(1).float()
