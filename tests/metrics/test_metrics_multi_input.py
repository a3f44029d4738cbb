"""Metrics on models with several inputs: a model that concatenates its two inputs into one
linear layer must score exactly as that layer on the concatenated input, with the concatenated
attributions — the features of all inputs are ranked, perturbed and summed jointly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lumos
import lumos.metrics as M
from lumos.core.errors import BaselineError, InputError
from lumos.metrics.base import ModelRunner
from lumos.metrics.features import Features


class ConcatModel(nn.Module):
    """f(a, b) = W·[a; b]: one linear layer on the concatenation of its two inputs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([a.flatten(1), b.flatten(1)], 1))


def concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a.flatten(1), b.flatten(1)], 1)


@pytest.fixture
def pair():
    """The two-input model and its one-input twin; inputs a (5, 4) and b (5, 2, 3); random
    attributions for each; targets."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    linear = nn.Linear(10, 3).eval()
    a, b = torch.rand(5, 4, generator=generator), torch.rand(5, 2, 3, generator=generator)
    maps = torch.randn(5, 4, generator=generator), torch.randn(5, 2, 3, generator=generator)
    return ConcatModel(linear).eval(), linear, (a, b), maps, torch.tensor([0, 1, 2, 1, 0])


#: metric, its options on both models (tuple baselines become one per-feature tensor)
WITH_ATTRIBUTIONS = [
    (M.deletion, {"n_steps": 5}),
    (M.deletion, {"n_steps": 10, "baseline": (0.3, -0.2)}),
    (M.insertion, {"n_steps": 5}),
    (M.pixel_flipping, {"n_steps": 5}),
    (M.pixel_flipping, {"n_steps": 5, "order": "random", "seed": 4}),
    (M.region_perturbation, {"n_steps": 5, "baseline": (0.0, 1.0)}),
    (M.faithfulness_correlation, {"n_samples": 16, "subset_size": 3, "seed": 1}),
    (M.infidelity, {"n_samples": 8, "seed": 2}),
    (M.infidelity, {"n_samples": 8, "seed": 2, "normalize": False}),
    (M.comprehensiveness, {"fractions": (0.1, 0.3)}),
    (M.sufficiency, {"fractions": (0.1, 0.3), "baseline": (1.0, 0.5)}),
    (M.completeness, {}),
    (M.completeness, {"baseline": (0.5, 0.0), "relative": True}),
    (M.non_sensitivity, {"patch_size": 2, "eps": 0.1}),
]


def restructured(options: dict, structure: str) -> dict:
    """Per-input baselines for dict inputs, or as one per-feature baseline of the concatenated
    input (``structure="tensor"``)."""
    options = dict(options)
    if isinstance(options.get("baseline"), tuple):
        value_a, value_b = options["baseline"]
        if structure == "dict":
            options["baseline"] = {"a": value_a, "b": value_b}
        else:
            per_feature = concat(torch.full((1, 4), value_a), torch.full((1, 6), value_b))
            options["baseline"] = per_feature[0]
    return options


@pytest.mark.parametrize(
    "metric, options", WITH_ATTRIBUTIONS, ids=lambda v: getattr(v, "__name__", "")
)
def test_two_inputs_score_as_their_concatenation(pair, metric, options):
    model, linear, (a, b), maps, target = pair
    two = metric(model, (a, b), maps, target=target, **options)
    one = metric(
        linear, concat(a, b), concat(*maps), target=target, **restructured(options, "tensor")
    )
    torch.testing.assert_close(two, one)
    # a dict is matched by its keys, whatever their order
    attributions = {"b": maps[1], "a": maps[0]}
    inputs = {"a": a, "b": b}
    as_dict = metric(model, inputs, attributions, target, **restructured(options, "dict"))
    torch.testing.assert_close(as_dict, one)


def test_curves_rank_the_features_of_both_inputs_jointly(pair):
    model, linear, (a, b), maps, target = pair
    two = M.deletion(model, (a, b), maps, target=target, n_steps=10, return_curve=True)
    one = M.deletion(linear, concat(a, b), concat(*maps), target=target, n_steps=10)
    torch.testing.assert_close(two.scores, one)
    # one feature per step: with both inputs ranked together every step removes one element
    assert two.y.shape == (5, 11) and not torch.equal(two.y[:, 1], two.y[:, 0])


#: metrics that re-explain: (metric, method, options)
WITH_EXPLAINER = [
    (M.max_sensitivity, "input_x_gradient", {"n_samples": 4, "seed": 3}),
    (M.avg_sensitivity, "input_x_gradient", {"n_samples": 4, "seed": 3}),
    (M.local_lipschitz, "input_x_gradient", {"n_samples": 4, "seed": 3}),
    (M.random_logit, "saliency", {"seed": 1}),
    (M.random_logit, "input_x_gradient", {"similarity_measure": "spearman"}),
    (M.model_randomisation, "input_x_gradient", {}),
    (M.input_invariance, "input_x_gradient", {}),
]


@pytest.mark.parametrize(
    "metric, method, options", WITH_EXPLAINER, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_re_explaining_metrics_on_two_inputs_score_as_their_concatenation(
    pair, metric, method, options
):
    model, linear, (a, b), _, target = pair
    two = metric(model, (a, b), method, target=target, **options)
    one = metric(linear, concat(a, b), method, target=target, **options)
    torch.testing.assert_close(two, one)
    as_dict = metric(model, {"a": a, "b": b}, method, target=target, **options)
    torch.testing.assert_close(as_dict, one)


def test_given_attributions_in_the_inputs_structure_are_used(pair):
    model, _, (a, b), _, target = pair
    exp = lumos.explain(model, (a, b), method="input_x_gradient", target=target)
    given = M.max_sensitivity(model, (a, b), "input_x_gradient", target, attributions=exp)
    computed = M.max_sensitivity(model, (a, b), "input_x_gradient", target)
    torch.testing.assert_close(given, computed)
    # an Explanation of the same inputs is taken as the attributions
    ig = lumos.explain(model, {"a": a, "b": b}, method="integrated_gradients", target=target)
    assert M.completeness(model, {"a": a, "b": b}, ig, target=target).max() < 1e-4


def test_robustness_leaves_token_ids_unperturbed():
    class Tagged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(7, 3)
            self.linear = nn.Linear(4 + 3 * 2, 2)

        def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return self.linear(torch.cat([x, self.embedding(ids).flatten(1)], 1))

    model = Tagged().eval()
    x, ids = torch.rand(3, 4), torch.randint(0, 7, (3, 2), generator=torch.Generator())
    seen = []

    def explainer(model, inputs, target):
        seen.append(inputs)
        return inputs[0] * 2.0, torch.zeros(inputs[1].shape)

    scores = M.max_sensitivity(model, (x, ids), explainer, target=0, n_samples=4, radius=0.1)
    assert scores.shape == (3,) and (scores > 0).all()
    rows = seen[-1]
    assert torch.equal(rows[1], ids.repeat(4, 1)) and not torch.equal(rows[0], x.repeat(4, 1))
    assert M.infidelity(model, (x, ids), (x, torch.zeros(3, 2)), target=0).shape == (3,)
    deleted = M.deletion(model, (x, ids), (x, ids.float()), target=0, baseline=(0.0, 0))
    assert deleted.shape == (3,)
    with pytest.raises(InputError, match="token id"):
        M.deletion(model, (x, ids), (x, ids.float()), target=0)
    tokens_only = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(InputError, match="floating-point inputs only"):
        M.max_sensitivity(tokens_only, ids, explainer, target=0)


def test_patches_are_cut_only_from_image_inputs():
    image, table = torch.rand(2, 3, 4, 4), torch.rand(2, 5)
    runner = ModelRunner(lambda i, t: i.flatten(1).sum(1, keepdim=True) + t, (image, table), 0)
    features = Features(runner, (torch.rand(2, 1, 4, 4), torch.rand(2, 5)), patch_size=2)
    assert features.count == 4 + 5  # four 2×2 patches, five table elements
    first_patch, first_element = torch.zeros(2, 9, dtype=torch.bool), torch.zeros(2, 9).bool()
    first_patch[:, 0], first_element[:, 4] = True, True
    image_mask, table_mask = features.expand(first_patch)
    assert image_mask.shape == (2, 1, 4, 4) and image_mask[0, 0, :2, :2].all()
    assert image_mask.sum() == 2 * 4 and not table_mask.any()
    image_mask, table_mask = features.expand(first_element)
    assert not image_mask.any() and table_mask[:, 0].all() and table_mask.sum() == 2


def test_evaluate_scores_dict_inputs_as_their_concatenation(pair):
    model, linear, (a, b), _, target = pair
    metrics = [
        "deletion",
        "insertion",
        "faithfulness_correlation",
        "infidelity",
        "max_sensitivity",
        "completeness",
        "random_logit",
        "model_randomisation",
        "sparseness",
    ]
    options = {
        "methods": ["saliency", "integrated_gradients"],
        "metrics": metrics,
        "method_options": {"integrated_gradients": {"n_steps": 16}},
        "metric_options": {"deletion": {"n_steps": 5}, "max_sensitivity": {"n_samples": 3}},
    }
    two = lumos.evaluate(model, {"a": a, "b": b}, target, **options)
    one = lumos.evaluate(linear, concat(a, b), target, **options)
    assert not two.method_errors and set(two.scores) == set(one.scores) - {
        (m, "sparseness") for m in two.methods
    }
    for key, scores in two.scores.items():
        torch.testing.assert_close(scores, one.scores[key])
    assert "one input's attributions" in two.not_applicable[("saliency", "sparseness")]
    assert set(two.attributions["saliency"]) == {"a", "b"} and set(two.inputs) == {"a", "b"}
    assert two.to_html().startswith("<!DOCTYPE html>")
    exp = lumos.explain(model, {"a": a, "b": b}, method="saliency", target=target)
    given = lumos.evaluate(
        model,
        {"a": a, "b": b},
        target,
        explanations=[exp],
        metrics=["deletion"],
        metric_options={"deletion": {"n_steps": 5}},
    )
    torch.testing.assert_close(
        given.scores[("saliency", "deletion")], two.scores[("saliency", "deletion")]
    )


def test_mismatched_attributions_say_what_to_pass(pair):
    model, _, (a, b), maps, target = pair
    as_dict = {"a": a, "b": b}
    cases = [
        (as_dict, maps, "dict with the same keys"),
        (as_dict, {"a": maps[0], "c": maps[1]}, "dict with the same keys"),
        ((a, b), maps[:1], "tuple of 2 entries"),
        ((a, b), maps[0], "one attribution tensor per input"),
        ((a, b), (maps[0], maps[1][:, 0]), r"do not match the inputs\[1\]"),
        ((a, b), (maps[0], maps[1][:3]), "5 rows"),
    ]
    for inputs, attributions, message in cases:
        with pytest.raises(InputError, match=message):
            M.deletion(model, inputs, attributions, target)
    with pytest.raises(InputError, match="one tensor"):
        M.deletion(model.linear, concat(a, b), maps, target)
    with pytest.raises(InputError, match=r"inputs' shape of inputs\[1\]"):
        M.completeness(model, (a, b), (maps[0], maps[1].flatten(1)), target)
    with pytest.raises(InputError, match="tuple of 2 entries"):
        M.deletion(model, (a, b), maps, target, baseline=(0.0, 0.0, 0.0))
    with pytest.raises(BaselineError, match="one per input"):
        M.deletion(model, (a, b), maps, target, baseline=torch.zeros(4))
    with pytest.raises(BaselineError, match=r"inputs\[1\]"):
        M.deletion(model, (a, b), maps, target, baseline=(0.0, torch.zeros(5)))
    with pytest.raises(InputError, match="the same method on the same inputs"):
        M.max_sensitivity(model, (a, b), "saliency", target, attributions=(maps[0], maps[0]))
    with pytest.raises(InputError, match="every input must be an image"):
        M.road(model, (a, b), maps, target)


def test_map_metrics_ask_for_one_inputs_attributions(pair):
    model, _, (a, b), maps, target = pair
    masks = torch.ones(5, 4, dtype=torch.bool)
    for call in (lambda m: M.sparseness(m), lambda m: M.pointing_game(m, masks)):
        with pytest.raises(InputError, match=r"exp.attributions\[0\]"):
            call(maps)
        with pytest.raises(InputError, match="one input's attributions"):
            call({"a": maps[0], "b": maps[1]})
    exp = lumos.explain(model, (a, b), method="saliency", target=target)
    with pytest.raises(InputError, match="holds 2 tensors"):
        M.complexity(exp)
    assert M.sparseness(maps[0]).shape == (5,)
