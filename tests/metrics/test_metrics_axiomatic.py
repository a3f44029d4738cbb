"""Axiomatic metrics: completeness, non-sensitivity and input invariance with known answers."""

from __future__ import annotations

import torch
from models import linear_model, tiny_cnn

import lumos
import lumos.metrics as M


def test_integrated_gradients_is_complete_and_saliency_is_not():
    model = tiny_cnn()
    x = torch.rand(3, 3, 8, 8)
    ig = lumos.explain(model, x, method="integrated_gradients", target=2, n_steps=32)
    saliency = lumos.explain(model, x, method="saliency", target=2)
    ig_error = M.completeness(model, x, ig.attributions, target=2)
    torch.testing.assert_close(ig_error, ig.delta.abs(), atol=1e-6, rtol=1e-3)
    assert (M.completeness(model, x, saliency.attributions, target=2) > 10 * ig_error).all()


def test_non_sensitivity_counts_relevance_on_dead_features():
    model = linear_model(n_features=8, n_classes=2)
    with torch.no_grad():
        model.weight[:, 4:] = 0.0  # the model ignores features 4..7
    x = torch.rand(3, 8) + 0.5
    exact = x * model.weight[0].detach()
    torch.testing.assert_close(M.non_sensitivity(model, x, exact, target=0), torch.zeros(3))
    torch.testing.assert_close(M.non_sensitivity(model, x, x, target=0), torch.full((3,), 0.5))


def test_input_invariance_separates_gradients_from_input_times_gradient():
    model = tiny_cnn()
    x = torch.rand(2, 3, 8, 8)
    saliency = M.input_invariance(model, x, "saliency", target=1)
    times_input = M.input_invariance(model, x, "input_x_gradient", target=1)
    assert saliency.max() < 1e-4
    assert times_input.min() > 0.1
    assert not model._forward_pre_hooks  # the shift lives on a copy
