"""Excitation backprop: the marginal winning probability in closed form on a small MLP, its
conservation, and the contrastive variant."""

from __future__ import annotations

import torch
from models import tiny_cnn
from torch import nn

import lumos


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    with torch.no_grad():  # O(1) excitations, so the 1e-6 stabilizer is negligible
        for layer in (model[0], model[2]):
            layer.weight.mul_(4)
    return model


def winning_probability(model: nn.Sequential, x: torch.Tensor, top_weights: torch.Tensor):
    """P(input) for one example: P(a_j) = Σ_i a_j w⁺_ji / Σ_j' a_j' w⁺_j'i · P(i), from P = 1."""
    first = model[0]
    hidden = torch.relu(first(x)).detach()
    top = hidden * top_weights.clamp(min=0)
    p_hidden = top / top.sum()
    excite = x[None, :] * first.weight.detach().clamp(min=0)  # (hidden, inputs)
    return (excite / excite.sum(1, keepdim=True) * p_hidden[:, None]).sum(0)


def test_excitation_backprop_is_the_marginal_winning_probability():
    model = mlp()
    x = torch.rand(3, 6, dtype=torch.float64)
    exp = lumos.explain(model, x, method="excitation_backprop", target=1)
    w = model[2].weight[1].detach()
    expected = torch.stack([winning_probability(model, row, w) for row in x])
    assert torch.allclose(exp.attributions, expected, rtol=1e-5, atol=1e-9)
    assert exp.delta.abs().max() < 1e-5  # probability is conserved (up to the stabilizer)


def test_contrastive_excitation_backprop_subtracts_the_dual_unit():
    model = mlp()
    x = torch.rand(2, 6, dtype=torch.float64)
    exp = lumos.explain(model, x, method="excitation_backprop", target=0, contrastive=True)
    w = model[2].weight[0].detach()
    expected = torch.stack(
        [
            (winning_probability(model, row, w) - winning_probability(model, row, -w)).clamp(min=0)
            for row in x
        ]
    )
    assert torch.allclose(exp.attributions, expected, rtol=1e-5, atol=1e-9)
    assert exp.delta is None


def test_excitation_backprop_runs_on_tiny_cnn_with_nonnegative_maps():
    exp = lumos.explain(
        tiny_cnn(), torch.rand(2, 3, 16, 16), method="excitation_backprop", target=3
    )
    assert torch.isfinite(exp.attributions).all()
