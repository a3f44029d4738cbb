"""Contextual importance and utility: closed forms on a linear model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lumos
from lumos.core.errors import InputError


def linear(weights: list[float]) -> nn.Module:
    model = nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights]))
    return model


def test_ciu_of_a_linear_model_has_closed_forms():
    model = linear([2.0, -1.0, 0.5, 0.0])
    x = torch.tensor([[0.25, 0.25, 1.0, 0.5]])
    exp = lumos.explain(
        model, x, method="ciu", target=None, ranges=(0.0, 1.0), output_range=(-1.0, 2.5)
    )
    ci, cu = exp.extras["ci"][0], exp.extras["cu"][0]
    torch.testing.assert_close(ci.float(), torch.tensor([2.0, 1.0, 0.5, 0.0]) / 3.5)
    torch.testing.assert_close(cu.float(), torch.tensor([0.25, 0.75, 1.0, 0.5]))
    torch.testing.assert_close(exp.attributions, (ci * (cu - 0.5)).float()[None])


def test_ciu_ranges_from_a_background_set_and_observed_output_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    background = torch.rand(20, 3)
    exp = lumos.explain(model, torch.rand(2, 3), method="ciu", target=1, baselines=background)
    assert (exp.extras["ci"] >= 0).all() and (exp.extras["ci"] <= 1 + 1e-9).all()
    assert (exp.extras["cu"] >= 0).all() and (exp.extras["cu"] <= 1 + 1e-9).all()


def test_ciu_groups_pixels_and_checks_its_options():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    x = torch.rand(1, 3, 4, 4)
    mask = torch.tensor([[0, 0, 1, 1]] * 4)
    exp = lumos.explain(model, x, method="ciu", target=0, feature_mask=mask, n_samples=5)
    assert exp.extras["ci"].shape == (1, 2)
    with pytest.raises(InputError, match="ranges"):
        lumos.explain(model, x, method="ciu", target=0, ranges=(0.0,))
    with pytest.raises(InputError, match="output_range"):
        lumos.explain(model, x, method="ciu", target=0, output_range=(1.0, 0.0))
