"""Faithfulness metrics: orderings with known answers on a linear model, a per-example reference
loop, batching and seeding."""

from __future__ import annotations

import pytest
import torch
from models import linear_model, tiny_cnn

import lumos
import lumos.metrics as M
from lumos.core.errors import InputError

SEEDED = (M.faithfulness_correlation, M.infidelity, M.region_perturbation, M.road)
CURVES = (M.deletion, M.insertion, M.pixel_flipping, M.region_perturbation, M.road)


@pytest.fixture
def linear():
    """A one-output linear model, positive inputs, and three maps: x·w, random, −x·w."""
    model = linear_model(n_features=40, n_classes=1, seed=3)
    x = torch.rand(6, 40, generator=torch.Generator().manual_seed(0))
    true = x * model.weight[0].detach()
    random = torch.rand(6, 40, generator=torch.Generator().manual_seed(1))
    return model, x, {"true": true, "random": random, "negated": -true}


def test_true_linear_attribution_deletes_best_and_inserts_best(linear):
    model, x, maps = linear
    deletion = {k: M.deletion(model, x, a, target=None) for k, a in maps.items()}
    insertion = {k: M.insertion(model, x, a, target=None, baseline=0.0) for k, a in maps.items()}
    # removing the largest contributions first gives the lowest curve at every step
    assert (deletion["true"] < deletion["random"]).all()
    assert (deletion["random"] < deletion["negated"]).all()
    assert (insertion["true"] > insertion["random"]).all()
    assert (insertion["random"] > insertion["negated"]).all()


def test_true_linear_attribution_is_faithful_by_every_curve(linear):
    model, x, maps = linear
    flip = {k: M.pixel_flipping(model, x, a, target=None) for k, a in maps.items()}
    aopc = {
        k: M.region_perturbation(model, x, a, target=None, baseline=0.0, patch_size=1)
        for k, a in maps.items()
    }
    correlation = M.faithfulness_correlation(model, x, maps["true"], target=None)
    assert (flip["true"] < flip["negated"]).all()
    assert (aopc["true"] > aopc["negated"]).all()
    # with a zero baseline the output drop is exactly the removed relevance
    torch.testing.assert_close(correlation, torch.ones(6), atol=1e-5, rtol=0)
    # for Gaussian perturbations the exact attribution of a linear model is its gradient
    gradient = model.weight.detach().expand_as(x)
    assert M.infidelity(model, x, gradient, target=None, normalize=False).max().item() < 1e-8
    assert M.infidelity(model, x, maps["true"], target=None).min().item() > 1e-4


def reference_deletion(model, x, maps, n_steps, target):
    """A straightforward per-example loop (what Quantus does)."""
    curves = []
    for i in range(len(x)):
        order = maps[i].sum(0).flatten().argsort(descending=True, stable=True)
        row = []
        for k in range(n_steps + 1):
            count = round(k / n_steps * order.numel())
            xi = x[i].clone().view(x.shape[1], -1)
            xi[:, order[:count]] = 0.0
            with torch.no_grad():
                p = model(xi.view(1, *x.shape[1:])).softmax(1)[0, target[i]]
            row.append(p.item())
        curves.append(row)
    return torch.tensor(curves)


def test_deletion_curves_match_a_per_example_reference_loop():
    model = tiny_cnn()
    x = torch.rand(3, 3, 8, 8)
    maps = torch.randn(3, 3, 8, 8)
    target = torch.tensor([0, 2, 3])
    curve = M.deletion(model, x, maps, target=target, n_steps=8, return_curve=True)
    expected = reference_deletion(model, x, maps, 8, target)
    torch.testing.assert_close(curve.y, expected.float(), atol=1e-5, rtol=1e-5)
    assert curve.x[0] == 0 and curve.x[-1] == 1


@pytest.mark.parametrize("metric", [*CURVES, M.comprehensiveness, M.sufficiency, M.completeness])
def test_batched_scores_equal_per_example_scores(metric):
    model = tiny_cnn()
    x = torch.rand(4, 3, 8, 8)
    maps = lumos.explain(model, x, method="input_x_gradient", target=1).attributions
    options = {"n_steps": 4} if metric in (M.deletion, M.insertion, M.pixel_flipping) else {}
    if metric is M.region_perturbation:
        options = {"patch_size": 2, "n_steps": 4, "baseline": 0.0}
    batched = metric(model, x, maps, target=1, **options)
    single = torch.cat(
        [metric(model, x[i : i + 1], maps[i : i + 1], target=1, **options) for i in range(4)]
    )
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    chunked = metric(model, x, maps, target=1, batch_size=3, **options)
    torch.testing.assert_close(batched, chunked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("metric", SEEDED)
def test_same_seed_same_scores_and_chunking_does_not_matter(metric):
    model = tiny_cnn()
    x = torch.rand(3, 3, 8, 8)
    maps = torch.randn(3, 1, 8, 8)
    first = metric(model, x, maps, target=0, seed=5)
    torch.testing.assert_close(first, metric(model, x, maps, target=0, seed=5, batch_size=2))
    assert not torch.equal(first, metric(model, x, maps, target=0, seed=6))


def test_metrics_leave_the_model_as_it_was():
    model = tiny_cnn().train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    x = torch.rand(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="train mode"):
        M.deletion(model, x, torch.rand(2, 1, 8, 8), n_steps=2)
    assert model.training and torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert all(p.requires_grad for p in model.parameters())


def test_token_inputs_are_removed_by_a_token_id():
    embedding = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(24, 2)
    )
    tokens = torch.randint(1, 10, (3, 6), generator=torch.Generator().manual_seed(0))
    scores = torch.rand(3, 6)
    comprehensive = M.comprehensiveness(embedding, tokens, scores, baseline=0)
    assert comprehensive.shape == (3,)
    with pytest.raises(InputError, match="token"):
        M.comprehensiveness(embedding, tokens, scores)


def test_wrong_shapes_and_non_images_say_why():
    model = tiny_cnn()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(InputError, match="do not match"):
        M.deletion(model, x, torch.rand(2, 1, 4, 4))
    with pytest.raises(InputError, match="completeness needs"):
        M.completeness(model, x, torch.rand(2, 1, 8, 8))
    linear = linear_model(n_features=5, n_classes=3)
    with pytest.raises(InputError, match="images"):
        M.road(linear, torch.rand(2, 5), torch.rand(2, 5))
