"""Localisation: does the explanation point at the object a ground-truth mask marks?

Every metric takes attributions ``(B, C, H, W)`` (reduced over channels by `reduce`, see
`attribution_map`), CAM maps ``(B, 1, H, W)``, or any per-feature map with the masks' shape, and
boolean masks ``(B, H, W)`` or ``(B, 1, H, W)``; all examples are scored in one tensor pass.
For a model with several inputs, pass one input's attributions, e.g.
``exp.attributions["image"]``, with masks at its resolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lumos.core.errors import InputError
from lumos.metrics.base import as_masks, attribution_map, ranks, register_metric


def _maps(attributions: Any, masks: Any, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = attribution_map(attributions, reduce).double()
    m = as_masks(masks, a)
    return a.flatten(1), m.flatten(1)


def _in_top(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, F)``: the `k[b]` highest features of each row (ties broken by position)."""
    order = (-a).argsort(dim=1, stable=True)
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(a.shape[1], device=a.device).expand_as(order))
    return position < k.unsqueeze(1)


@register_metric(
    "pointing_game",
    family="localisation",
    direction="higher",
    needs={"masks"},
    paper="Zhang et al. (2018), Top-down Neural Attention by Excitation Backprop",
)
def pointing_game(
    attributions: Any, masks: Any, *, tolerance: int = 0, reduce: str = "sum"
) -> torch.Tensor:
    """Pointing game: 1 if the map's maximum lies inside the mask, else 0.

    ``hit = max_{i∈mask⊕tolerance} a_i == max_i a_i`` — a tie at the maximum counts as a hit when
    one of the tied points is inside; `tolerance` grows the mask by that many pixels (Zhang et
    al. used 15 px). Higher is better.
    """
    a = attribution_map(attributions, reduce).double()
    m = as_masks(masks, a)
    if tolerance:
        if m.dim() != 3:
            raise InputError("tolerance grows 2-D masks; these masks are not images.")
        grown = F.max_pool2d(m.unsqueeze(1).double(), 2 * tolerance + 1, 1, tolerance)
        m = grown[:, 0] > 0
    a, m = a.flatten(1), m.flatten(1)
    inside = a.masked_fill(~m, float("-inf")).amax(1)
    return (inside >= a.amax(1)).float()


@register_metric(
    "energy_pointing_game",
    family="localisation",
    direction="higher",
    needs={"masks"},
    paper="Wang et al. (2020), Score-CAM: Score-Weighted Visual Explanations for CNNs",
)
def energy_pointing_game(attributions: Any, masks: Any, *, reduce: str = "sum") -> torch.Tensor:
    """Energy-based pointing game: the share of the min–max normalised map inside the mask.

    ``ã = (a − min a)/(max a − min a)``, ``score = Σ_{i∈mask} ã_i / Σ_i ã_i`` (0 for a constant
    map). Higher is better.
    """
    a, m = _maps(attributions, masks, reduce)
    low, high = a.amin(1, keepdim=True), a.amax(1, keepdim=True)
    energy = (a - low) / (high - low).clamp_min(1e-300)
    total = energy.sum(1)
    return torch.where(total > 0, (energy * m).sum(1) / total.clamp_min(1e-300), 0.0).float()


@register_metric(
    "relevance_mass_accuracy",
    family="localisation",
    direction="higher",
    needs={"masks"},
    paper="Arras, Osman & Samek (2022), CLEVR-XAI: A benchmark dataset for the ground truth "
    "evaluation of neural network explanations",
)
def relevance_mass_accuracy(attributions: Any, masks: Any, *, reduce: str = "sum") -> torch.Tensor:
    """Relevance mass accuracy: the share of positive relevance that falls inside the mask.

    ``R_in / R_total = Σ_{i∈mask} max(a_i, 0) / Σ_i max(a_i, 0)`` (0 when no relevance is
    positive). Higher is better.
    """
    a, m = _maps(attributions, masks, reduce)
    positive = a.clamp_min(0)
    total = positive.sum(1)
    return torch.where(total > 0, (positive * m).sum(1) / total.clamp_min(1e-300), 0.0).float()


@register_metric(
    "relevance_rank_accuracy",
    family="localisation",
    direction="higher",
    needs={"masks"},
    paper="Arras, Osman & Samek (2022), CLEVR-XAI: A benchmark dataset for the ground truth "
    "evaluation of neural network explanations",
)
def relevance_rank_accuracy(attributions: Any, masks: Any, *, reduce: str = "sum") -> torch.Tensor:
    """Relevance rank accuracy: the share of the K most relevant features inside the mask.

    ``|top_K(a) ∩ mask| / K`` with ``K = |mask|`` per example. Higher is better.
    """
    a, m = _maps(attributions, masks, reduce)
    k = m.sum(1)
    return ((_in_top(a, k) & m).sum(1).double() / k).float()


@register_metric(
    "top_k_intersection",
    family="localisation",
    direction="higher",
    needs={"masks"},
    paper="Theiner, Müller-Budack & Ewerth (2022), Interpretable Semantic Photo Geolocation",
)
def top_k_intersection(
    attributions: Any, masks: Any, *, k: int | float = 0.1, reduce: str = "sum"
) -> torch.Tensor:
    """Top-k intersection: the share of the k most relevant features that lie inside the mask.

    ``|top_k(a) ∩ mask| / k`` (ties broken by position); `k` is a count, or a fraction of the
    features when below 1 (default 10 %). Higher is better.
    """
    a, m = _maps(attributions, masks, reduce)
    count = a.shape[1]
    if isinstance(k, float) and 0 < k < 1:
        k = max(1, round(k * count))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= count:
        raise InputError(
            f"k must be a count in 1..{count} (the features per map) or a fraction in (0, 1), "
            f"got {k!r}."
        )
    in_top = _in_top(a, torch.full((a.shape[0],), k, device=a.device))
    return ((in_top & m).sum(1).double() / k).float()


@register_metric(
    "attribution_auc",
    family="localisation",
    direction="higher",
    needs={"masks"},
    paper="Fawcett (2006), An introduction to ROC analysis",
)
def attribution_auc(attributions: Any, masks: Any, *, reduce: str = "sum") -> torch.Tensor:
    """Attribution AUC: the ROC AUC of the map as a detector of the mask's pixels.

    ``AUC = P(a_i > a_j) + ½ P(a_i = a_j)`` for i inside and j outside the mask, computed with
    average ranks (Mann–Whitney U). 0.5 is chance; higher is better. Needs pixels outside the mask.
    """
    a, m = _maps(attributions, masks, reduce)
    n_pos = m.sum(1).double()
    n_neg = m.shape[1] - n_pos
    if (n_neg == 0).any():
        raise InputError("attribution_auc needs masks that leave some pixels outside.")
    rank_sum = (ranks(a) * m).sum(1)
    return ((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()
