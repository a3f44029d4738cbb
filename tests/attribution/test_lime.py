"""LIME: recovers the coefficients of a model linear in the superpixels, seeded, with image,
text and tabular modes and the surrogate's fit in the extras."""

from __future__ import annotations

import pytest
import torch
from models import tiny_cnn
from torch import nn

import lumos
from lumos.attribution.lime import superpixel_means, superpixels, weighted_ridge
from lumos.core.errors import InputError, UnknownNameError

SEGMENTS = torch.arange(16).view(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)


class LinearInSuperpixels(nn.Module):
    """f(x) = Σ_j c_j · mean of superpixel j (over channels and pixels)."""

    def __init__(self, coefficients: torch.Tensor) -> None:
        super().__init__()
        self.coefficients = coefficients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(x.shape[0], 16).index_add_(1, SEGMENTS.flatten(), x.mean(1).flatten(1))
        score = sums / 16 @ self.coefficients
        return torch.stack([score, -score], 1)


def test_lime_recovers_the_coefficients_of_a_model_linear_in_the_superpixels():
    torch.manual_seed(0)
    coefficients = torch.randn(16)
    x = torch.ones(2, 3, 16, 16)
    exp = lumos.explain(
        LinearInSuperpixels(coefficients),
        x,
        method="lime",
        target=0,
        feature_mask=SEGMENTS,
        baselines=0.0,
        alpha=0.0,
        n_samples=200,
    )
    torch.testing.assert_close(
        exp.extras["coefficients"][0].float(), coefficients, atol=1e-4, rtol=0
    )
    assert exp.extras["score"].min() > 0.9999
    torch.testing.assert_close(
        exp.attributions[0, 1, :4, :4], torch.full((4, 4), coefficients[0].item())
    )
    torch.testing.assert_close(
        exp.extras["local_prediction"].float(),
        torch.full((2,), coefficients.sum().item()),
        atol=1e-4,
        rtol=0,
    )


def test_lime_with_default_ridge_shrinks_only_slightly():
    coefficients = torch.linspace(-1, 1, 16)
    exp = lumos.explain(
        LinearInSuperpixels(coefficients),
        torch.ones(1, 3, 16, 16),
        method="lime",
        target=0,
        feature_mask=SEGMENTS,
        baselines=0.0,
    )
    assert (
        torch.corrcoef(torch.stack([exp.extras["coefficients"][0].float(), coefficients]))[0, 1]
        > 0.999
    )


def test_same_seed_same_explanation_other_seed_other_samples():
    model, x = tiny_cnn(), torch.rand(1, 3, 16, 16)
    a = lumos.explain(model, x, method="lime", target=1, n_samples=64, seed=0)
    b = lumos.explain(model, x, method="lime", target=1, n_samples=64, seed=0)
    c = lumos.explain(model, x, method="lime", target=1, n_samples=64, seed=1)
    assert torch.equal(a.attributions, b.attributions)
    assert not torch.equal(a.attributions, c.attributions)


@pytest.mark.parametrize("segmentation", ["slic", "quickshift", "felzenszwalb"])
def test_superpixels_from_scikit_image(segmentation):
    x = torch.rand(2, 3, 24, 24)
    x[:, :, :12] *= 0.2
    labels = superpixels(x, segmentation)
    assert labels.shape == (2, 24, 24) and labels.min() == 0
    exp = lumos.explain(
        tiny_cnn(), x, method="lime", target=0, n_samples=32, segmentation=segmentation
    )
    assert exp.extras["feature_mask"].shape == (2, 3, 24, 24)


def test_unknown_segmentation_is_an_error_with_suggestion():
    with pytest.raises(UnknownNameError, match="slic"):
        lumos.explain(tiny_cnn(), torch.rand(1, 3, 8, 8), method="lime", segmentation="slik")


def test_superpixel_means_fill_each_segment_with_its_colour():
    x = torch.rand(1, 3, 16, 16)
    filled = superpixel_means(x, SEGMENTS.view(1, 1, 16, 16).expand(1, 3, 16, 16))
    torch.testing.assert_close(filled[0, :, 0, 0], x[0, :, :4, :4].mean((1, 2)))


def test_text_lime_replaces_tokens_with_the_mask_token():
    weights = torch.zeros(10)
    weights[3], weights[7] = 2.0, -1.0

    def bag_of_words(ids: torch.Tensor) -> torch.Tensor:
        score = weights[ids].sum(1)
        return torch.stack([score, -score], 1)

    ids = torch.tensor([[3, 1, 7, 2]])
    exp = lumos.explain(
        bag_of_words, ids, method="lime", target=0, mask_token=0, alpha=0.0, n_samples=100
    )
    torch.testing.assert_close(
        exp.attributions.float(), torch.tensor([[2.0, 0.0, -1.0, 0.0]]), atol=1e-5, rtol=0
    )


def test_text_lime_removes_a_uniform_number_of_tokens_and_images_switch_each_with_one_half():
    removed: list[torch.Tensor] = []

    def recording(ids: torch.Tensor) -> torch.Tensor:
        removed.append((ids == 0).sum(1))
        return ids.double().sum(1, keepdim=True)

    ids = torch.arange(1, 6)[None]
    lumos.explain(recording, ids, method="lime", target=0, n_samples=3000)
    counts = torch.bincount(torch.cat(removed), minlength=6)
    # besides the all-on first sample: k = 1..5 tokens off, each k equally often
    assert counts[1:].sum() == 2999
    assert ((counts[1:] - 2999 / 5).abs() < 0.1 * 2999 / 5).all()

    removed.clear()
    image = torch.ones(1, 3, 16, 16)

    def recording_image(x: torch.Tensor) -> torch.Tensor:
        cells = x[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)[..., 0, 0].flatten(1)
        removed.append((cells == 0).sum(1))
        return x.mean((1, 2, 3))[:, None]

    lumos.explain(
        recording_image,
        image,
        method="lime",
        target=0,
        feature_mask=SEGMENTS,
        baselines=0.0,
        n_samples=2000,
    )
    off = torch.cat(removed)[2:].double()  # after the forward pass and the all-on sample
    assert abs(off.mean().item() - 8) < 0.2 and abs(off.var().item() - 4) < 0.5  # Binomial(16, ½)


def test_text_lime_agrees_with_the_lime_package():
    lime_text = pytest.importorskip("lime.lime_text")
    torch.manual_seed(0)
    bag, head = nn.EmbeddingBag(40, 4, mode="sum", padding_idx=0), nn.Linear(4, 3)
    with torch.no_grad():
        bag.weight.mul_(8)  # saturated probabilities: the sampling scheme matters

    def model(ids: torch.Tensor) -> torch.Tensor:
        return torch.softmax(head(bag(ids)), 1)

    def classifier(texts: list[str]):
        rows = [[0 if w == "UNKWORDZ" else int(w[1:]) for w in t.split()] for t in texts]
        with torch.no_grad():
            return model(torch.tensor(rows)).double().numpy()

    correlations, differences = [], []
    for seed in range(3):
        ids = torch.randint(1, 40, (1, 20), generator=torch.Generator().manual_seed(100 + seed))
        text = " ".join(f"w{int(t)}" for t in ids[0])
        explainer = lime_text.LimeTextExplainer(
            bow=False, random_state=seed, feature_selection="none"
        )
        found = explainer.explain_instance(
            text, classifier, labels=(1,), num_features=20, num_samples=4000
        )
        theirs = torch.zeros(20, dtype=torch.float64)
        for position, coefficient in found.local_exp[1]:
            theirs[position] = coefficient
        ours = lumos.explain(model, ids, method="lime", target=1, n_samples=4000, seed=seed)
        ours = ours.extras["coefficients"][0]
        correlations.append(torch.corrcoef(torch.stack([ours, theirs]))[0, 1].item())
        differences.append(((ours - theirs).norm() / theirs.norm()).item())
    # lime against itself with another seed: correlation ≈ 0.99, relative difference ≈ 0.15;
    # switching each token with probability ½ instead gives a relative difference ≈ 0.37
    assert sum(correlations) / 3 > 0.95
    assert sum(differences) / 3 < 0.25


def test_tabular_lime_coefficients_are_weights_times_training_spread():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    train = torch.randn(200, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 1
    x = train[:3]
    exp = lumos.explain(
        model, x, method="lime", target=1, train_data=train, alpha=0.0, n_samples=300
    )
    expected = model.weight[1].detach() * train.std(0)
    torch.testing.assert_close(exp.attributions, expected.expand(3, -1), atol=1e-4, rtol=1e-4)
    assert exp.extras["score"].min() > 0.9999
    with torch.no_grad():
        torch.testing.assert_close(
            exp.extras["local_prediction"].float(), model(x)[:, 1], atol=1e-4, rtol=0
        )


def test_tabular_lime_with_discretization_finds_the_relevant_feature():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 3.0, 0.0, 0.0]]))
    train = torch.randn(400, 4)
    x = train[train[:, 1] > 1.2][:1]
    exp = lumos.explain(model, x, method="lime", target=None, train_data=train, discretize=True)
    assert exp.attributions[0].abs().argmax() == 1 and exp.attributions[0, 1] > 0


def test_tabular_lime_checks_the_training_data():
    with pytest.raises(InputError, match="train_data"):
        lumos.explain(
            nn.Linear(4, 2), torch.rand(2, 4), method="lime", target=0, train_data=torch.rand(10, 3)
        )


def test_weighted_ridge_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    torch.manual_seed(0)
    design, y, w = torch.rand(50, 4).double(), torch.randn(50).double(), torch.rand(50).double()
    coefficients, intercept, score = weighted_ridge(design[None], y[None], w[None], alpha=0.7)
    ridge = linear_model.Ridge(alpha=0.7).fit(design.numpy(), y.numpy(), sample_weight=w.numpy())
    torch.testing.assert_close(coefficients[0], torch.from_numpy(ridge.coef_))
    assert abs(intercept.item() - ridge.intercept_) < 1e-8
    assert (
        abs(score.item() - ridge.score(design.numpy(), y.numpy(), sample_weight=w.numpy())) < 1e-8
    )
