"""Complexity: how concentrated is an explanation? A map that puts its relevance on few features
is easier to read. Computed on ``|a|`` after reducing image channels with `reduce`
(``abs_sum`` by default, so CAM maps and per-channel maps are compared per pixel). For a model
with several inputs, score one input's attributions (e.g. ``exp.attributions["image"]``)."""

from __future__ import annotations

from typing import Any

import torch

from lumos.metrics.base import attribution_map, register_metric


def _magnitudes(attributions: Any, reduce: str) -> torch.Tensor:
    return attribution_map(attributions, reduce).abs().flatten(1).double()


@register_metric(
    "sparseness",
    family="complexity",
    direction="higher",
    paper="Chalasani et al. (2020), Concise Explanations of Neural Networks using Adversarial "
    "Training",
)
def sparseness(attributions: Any, *, reduce: str = "abs_sum") -> torch.Tensor:
    """Sparseness: the Gini index of the absolute attributions.

    With ``|a|`` sorted ascending, ``G = Σ_{i=1..F} (2i − F − 1) |a|_(i) / (F Σ_i |a|_i)`` — 0 for
    a uniform map, → 1 when one feature holds all relevance. Higher is better.
    """
    a = _magnitudes(attributions, reduce).sort(dim=1).values
    f = a.shape[1]
    i = torch.arange(1, f + 1, device=a.device, dtype=a.dtype)
    total = a.sum(1)
    gini = ((2 * i - f - 1) * a).sum(1) / (f * total.clamp_min(1e-300))
    return torch.where(total > 0, gini, 0.0).float()


@register_metric(
    "complexity",
    family="complexity",
    direction="lower",
    paper="Bhatt, Weller & Moura (2020), Evaluating and Aggregating Feature-based Model "
    "Explanations",
)
def complexity(attributions: Any, *, reduce: str = "abs_sum") -> torch.Tensor:
    """Complexity: the entropy of the relevance distribution.

    ``p_i = |a_i| / Σ_j |a_j|``, ``H = −Σ_i p_i ln p_i`` (nats; ln F for a uniform map, 0 for one
    feature). Lower is better.
    """
    a = _magnitudes(attributions, reduce)
    p = a / a.sum(1, keepdim=True).clamp_min(1e-300)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(1).float()


@register_metric(
    "effective_complexity",
    family="complexity",
    direction="lower",
    paper="Nguyen & Martínez (2020), On Quantitative Aspects of Model Interpretability",
)
def effective_complexity(
    attributions: Any, *, eps: float = 0.01, reduce: str = "abs_sum"
) -> torch.Tensor:
    """Effective complexity: the fraction of features whose relevance is not negligible.

    ``1/F · |{i : |a_i| > eps · max_j |a_j|}|`` — relative to each map's maximum, so the scale
    of a method does not matter (Nguyen & Martínez count features above an absolute eps).
    Lower is better.
    """
    a = _magnitudes(attributions, reduce)
    peak = a.amax(1, keepdim=True)
    return ((a > eps * peak) & (peak > 0)).double().mean(1).float()
