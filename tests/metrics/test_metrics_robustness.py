"""Robustness metrics: closed forms on a linear model, seeding, chunking."""

from __future__ import annotations

import pytest
import torch
from models import linear_model, tiny_cnn

import lumos
import lumos.metrics as M
from lumos.core.errors import InputError

ROBUSTNESS = (M.max_sensitivity, M.avg_sensitivity, M.local_lipschitz)


@pytest.mark.parametrize("metric", ROBUSTNESS)
def test_a_constant_gradient_is_perfectly_robust(metric):
    model = linear_model(n_features=6, n_classes=3)
    x = torch.rand(4, 6)
    scores = metric(model, x, "saliency", target=1, method_options={"abs": False})
    torch.testing.assert_close(scores, torch.zeros(4))


def test_input_x_gradient_sensitivity_is_bounded_by_the_ball():
    model = linear_model(n_features=6, n_classes=3)
    x = torch.rand(4, 6) + 1
    radius = 0.05
    worst = M.max_sensitivity(model, x, "input_x_gradient", target=1, radius=radius)
    mean = M.avg_sensitivity(model, x, "input_x_gradient", target=1, radius=radius)
    w = model.weight[1].detach()
    # ‖δ ⊙ w‖ / ‖x ⊙ w‖ ≤ r‖w‖ / ‖x ⊙ w‖
    bound = radius * w.norm() / (x * w).norm(dim=1)
    assert (worst > 0).all() and (worst <= bound + 1e-6).all() and (mean <= worst).all()


@pytest.mark.parametrize("metric", ROBUSTNESS)
def test_robustness_is_seeded_and_independent_of_chunking(metric):
    model = tiny_cnn()
    x = torch.rand(3, 3, 8, 8)
    first = metric(model, x, "saliency", target=0, n_samples=4, seed=3)
    again = metric(model, x, "saliency", target=0, n_samples=4, seed=3, batch_size=5)
    torch.testing.assert_close(first, again, atol=1e-6, rtol=1e-5)
    other = metric(model, x, "saliency", target=0, n_samples=4, seed=4)
    assert not torch.equal(first, other)


def test_a_callable_explainer_and_given_attributions_are_used():
    model = linear_model(n_features=6, n_classes=3)
    x = torch.rand(2, 6)
    calls = []

    def explainer(model, inputs, target):
        calls.append(len(inputs))
        return lumos.explain(model, inputs, method="input_x_gradient", target=target).attributions

    base = explainer(model, x, torch.tensor([0, 1]))
    calls.clear()
    M.avg_sensitivity(model, x, explainer, target=[0, 1], attributions=base, n_samples=3)
    assert calls == [6]  # all perturbed rows in one call, no call for the unperturbed ones


def test_bad_options_say_why():
    model = linear_model(n_features=6, n_classes=3)
    with pytest.raises(InputError, match="n_samples"):
        M.max_sensitivity(model, torch.rand(2, 6), "saliency", n_samples=0)
    with pytest.raises(InputError, match="explainer"):
        M.max_sensitivity(model, torch.rand(2, 6), 3)
