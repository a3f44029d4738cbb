"""Neuron attribution: agreement with Captum, completeness, and how neurons are addressed."""

from __future__ import annotations

import pytest
import torch
from models import tiny_cnn
from torch import nn

import lumos
from lumos.core.errors import InputError


def test_neuron_gradient_and_integrated_gradients_equal_captum():
    captum = pytest.importorskip("captum.attr")
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    neuron = (3, 2, 5)
    ours = lumos.explain(model, x, method="neuron_gradient", layer="conv2", neuron=neuron)
    theirs = captum.NeuronGradient(model, model.conv2).attribute(x, neuron_selector=neuron)
    torch.testing.assert_close(ours.attributions, theirs.detach())
    ours = lumos.explain(
        model, x, method="neuron_integrated_gradients", layer="conv2", neuron=neuron, n_steps=16
    )
    theirs = captum.NeuronIntegratedGradients(model, model.conv2).attribute(
        x, neuron_selector=neuron, n_steps=16
    )
    torch.testing.assert_close(ours.attributions, theirs.detach(), rtol=1e-4, atol=1e-6)
    assert ours.delta.abs().max() < 1e-2


def test_neuron_conductance_equals_captum():
    captum = pytest.importorskip("captum.attr")
    model, x, target = tiny_cnn(), torch.rand(2, 3, 16, 16), torch.tensor([1, 2])
    neuron = (5, 4, 4)
    ours = lumos.explain(
        model,
        x,
        method="neuron_conductance",
        target=target,
        layer="conv2",
        neuron=neuron,
        n_steps=8,
        batch_size=3,
    )
    theirs = captum.NeuronConductance(model, model.conv2).attribute(
        x, neuron_selector=neuron, target=target, n_steps=8
    )
    torch.testing.assert_close(ours.attributions, theirs.detach(), rtol=1e-4, atol=1e-6)


def test_channel_neurons_are_explained_through_their_spatial_mean():
    model, x = tiny_cnn(), torch.rand(2, 3, 4, 4)  # conv2 is 2 × 2
    ours = lumos.explain(model, x, method="neuron_gradient", layer="conv2", neuron=(4,))
    by_name = lumos.explain(
        model, x, method="neuron_gradient", layer="conv2", neuron=lambda a: a[:, 4].mean((1, 2))
    )
    torch.testing.assert_close(ours.attributions, by_name.attributions)
    conductance = lumos.explain(
        model, x, method="neuron_conductance", target=0, layer="conv2", neuron=(4,), n_steps=4
    )
    units = sum(
        lumos.explain(
            model,
            x,
            method="neuron_conductance",
            target=0,
            layer="conv2",
            neuron=(4, h, w),
            n_steps=4,
        ).attributions
        for h in range(2)
        for w in range(2)
    )
    torch.testing.assert_close(conductance.attributions, units, rtol=1e-4, atol=1e-6)


def test_flat_indices_address_units_of_a_linear_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    x = torch.rand(3, 5)
    exp = lumos.explain(model, x, method="neuron_gradient", layer="1", neuron=2)
    pre = model[0](x)
    expected = (1 - torch.tanh(pre[:, 2:3]) ** 2) * model[0].weight[2]
    torch.testing.assert_close(exp.attributions, expected.detach())
    with pytest.raises(InputError, match="out of range"):
        lumos.explain(model, x, method="neuron_gradient", layer="1", neuron=4)
    with pytest.raises(InputError, match="does not address"):
        lumos.explain(model, x, method="neuron_gradient", layer="1", neuron=(0, 1))
    with pytest.raises(InputError, match="neuron="):
        lumos.explain(model, x, method="neuron_gradient", layer="1")
