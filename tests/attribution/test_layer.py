"""Layer attribution: completeness at the layer, embeddings with token ids, and agreement with
Captum's layer methods."""

from __future__ import annotations

import pytest
import torch
from models import tiny_cnn
from torch import nn

import lumos
from lumos.core.errors import InputError, UnsupportedModelError


class TinyText(nn.Module):
    """Token ids → embedding → mean over tokens → tanh → linear."""

    def __init__(self, vocab: int = 50, dim: int = 6, n_classes: int = 3) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.embedding(ids).mean(1))))


def test_layer_integrated_gradients_is_complete_at_the_layer():
    model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
    for baselines in (None, 0.5):
        exp = lumos.explain(
            model,
            x,
            method="layer_integrated_gradients",
            target=2,
            layer="conv2",
            n_steps=32,
            baselines=baselines,
        )
        assert exp.attributions.shape == (3, 16, 8, 8)
        change = exp.attributions.flatten(1).sum(1) - exp.delta
        assert (exp.delta.abs() <= 0.01 * change.abs()).all()


def test_layer_integrated_gradients_with_zero_baseline_input_equals_captum():
    captum = pytest.importorskip("captum.attr")
    model, x, target = tiny_cnn(), torch.rand(2, 3, 16, 16), torch.tensor([1, 3])
    ours = lumos.explain(
        model,
        x,
        method="layer_integrated_gradients",
        target=target,
        layer="block",
        n_steps=16,
        baselines=0.0,
    )
    theirs = captum.LayerIntegratedGradients(model, model.block).attribute(
        x, baselines=torch.zeros_like(x), target=target, n_steps=16
    )
    torch.testing.assert_close(ours.attributions, theirs.detach(), rtol=1e-4, atol=1e-5)


def test_embedding_layer_explains_long_token_ids():
    torch.manual_seed(0)
    model = TinyText().eval()
    ids = torch.randint(1, 50, (4, 7), dtype=torch.long)
    exp = lumos.explain(
        model, ids, method="layer_integrated_gradients", target=0, layer="embedding", n_steps=16
    )
    assert exp.attributions.shape == (4, 7, 6)
    assert exp.delta.abs().max() < 1e-3
    per_token = exp.attributions.sum(-1)
    assert per_token.shape == (4, 7)
    pads = torch.zeros_like(ids)  # baseline: the embedding of token 0 at every position
    padded = lumos.explain(
        model,
        ids,
        method="layer_integrated_gradients",
        target=0,
        layer="embedding",
        n_steps=16,
        baselines=pads,
    )
    assert padded.delta.abs().max() < 1e-3
    gxa = lumos.explain(
        model, ids, method="layer_gradient_x_activation", target=0, layer="embedding"
    )
    assert gxa.attributions.shape == (4, 7, 6)
    with pytest.raises(InputError, match="dtype"):
        lumos.explain(model, ids, method="layer_conductance", layer="embedding")


def test_layer_conductance_equals_captum():
    captum = pytest.importorskip("captum.attr")
    model, x, target = tiny_cnn(), torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    methods = {"riemann_trapezoid": "riemann_trapezoid", "gauss_legendre": "gausslegendre"}
    for ours_name, captum_name in methods.items():
        ours = lumos.explain(
            model,
            x,
            method="layer_conductance",
            target=target,
            layer="conv2",
            n_steps=8,
            integration=ours_name,
            batch_size=5,
        )
        theirs = captum.LayerConductance(model, model.conv2).attribute(
            x, target=target, n_steps=8, method=captum_name
        )
        torch.testing.assert_close(ours.attributions, theirs.detach(), rtol=1e-4, atol=1e-6)


def test_layer_conductance_is_complete_with_the_trapezoid_rule():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    exp = lumos.explain(model, x, method="layer_conductance", target=0, layer="conv2", n_steps=64)
    change = exp.attributions.flatten(1).sum(1) - exp.delta
    assert (exp.delta.abs() <= 0.01 * change.abs()).all()


def test_internal_influence_and_gradient_x_activation_equal_captum():
    captum = pytest.importorskip("captum.attr")
    model, x, target = tiny_cnn(), torch.rand(2, 3, 16, 16), torch.tensor([3, 1])
    ours = lumos.explain(
        model, x, method="internal_influence", target=target, layer="conv2", n_steps=8
    )
    theirs = captum.InternalInfluence(model, model.conv2).attribute(x, target=target, n_steps=8)
    torch.testing.assert_close(ours.attributions, theirs.detach(), rtol=1e-4, atol=1e-6)
    ours = lumos.explain(
        model, x, method="layer_gradient_x_activation", target=target, layer="conv2"
    )
    theirs = captum.LayerGradientXActivation(model, model.conv2).attribute(x, target=target)
    torch.testing.assert_close(ours.attributions, theirs.detach(), rtol=1e-5, atol=1e-6)


def test_layer_activation_is_the_layer_output():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    exp = lumos.explain(model, x, method="layer_activation", layer=model.conv2)
    with torch.no_grad():
        expected = model.conv2(
            model.block(torch.max_pool2d(model.relu(model.bn1(model.conv1(x))), 2))
        )
    torch.testing.assert_close(exp.attributions, expected)
    assert exp.extras["layer"] == "conv2" and exp.attribution_structure.keys == ("layer",)


def test_layer_methods_need_a_layer_that_runs_once():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    with pytest.raises(InputError, match="layer="):
        lumos.explain(model, x, method="layer_gradient_x_activation")
    with pytest.raises(InputError, match="one layer"):
        lumos.explain(model, x, method="layer_activation", layer=["conv2", "block"])
    with pytest.raises(UnsupportedModelError, match="2 times"):
        lumos.explain(model, x, method="layer_gradient_x_activation", layer="relu")
