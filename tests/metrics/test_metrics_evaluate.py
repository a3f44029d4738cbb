"""`lumos.evaluate`: the grid, "not applicable" reasons, ranking, tables, figures and HTML."""

from __future__ import annotations

import pytest
import torch
from models import linear_model, tiny_cnn

import lumos
import lumos.metrics as M
from lumos.core.errors import InputError, UnknownNameError


@pytest.fixture
def data():
    x = torch.rand(4, 3, 8, 8)
    masks = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    masks[..., 2:6, 2:6] = True
    return tiny_cnn(), x, masks


def test_every_metric_is_registered_with_a_direction_and_a_paper():
    names = {m.name for m in M.metrics()}
    assert len(names) == 26
    for info in M.metrics():
        assert info.direction in ("higher", "lower") and info.paper
        assert len((info.fn.__doc__ or "").strip().splitlines()) >= 3
        assert getattr(M, info.name) is info.fn
    with pytest.raises(UnknownNameError, match="pointing_game"):
        M.get_metric("pointing_gam")


def test_evaluate_scores_each_method_and_metric_per_example(data):
    model, x, masks = data
    result = lumos.evaluate(
        model,
        x,
        "predicted",
        methods=["saliency", "integrated_gradients", "grad_cam"],
        metrics=["deletion", "pointing_game", "sparseness", "max_sensitivity"],
        masks=masks,
        layer="conv2",
        batch_size=16,
        method_options={"integrated_gradients": {"n_steps": 8}},
        metric_options={"deletion": {"n_steps": 4}, "max_sensitivity": {"n_samples": 3}},
    )
    assert len(result.scores) == 12 and not result.not_applicable
    assert result.scores[("saliency", "deletion")].shape == (4,)
    expected = M.pointing_game(result.attributions["grad_cam"], masks)
    torch.testing.assert_close(result.scores[("grad_cam", "pointing_game")], expected)
    curve = result.curves[("saliency", "deletion")]
    assert curve.y.shape == (4, 5)
    stats = result.summary("saliency", "sparseness")
    assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"] and stats["n"] == 4


def test_metrics_and_methods_that_do_not_apply_say_why(data):
    model, x, _ = data
    result = lumos.evaluate(
        model,
        x,
        methods=["saliency", "layer_activation", "neuron_gradient"],
        metrics=["pointing_game", "completeness"],
    )
    assert "masks" in result.not_applicable[("saliency", "pointing_game")]
    assert "needs a layer" in result.method_errors["layer_activation"]
    assert "neuron" in result.method_errors["neuron_gradient"]
    explanation = lumos.explain(model, x, method="saliency")
    given = lumos.evaluate(model, x, explanations=[explanation], metrics=["max_sensitivity"])
    assert "methods=" in given.not_applicable[("saliency", "max_sensitivity")]
    cam = lumos.evaluate(model, x, methods=["grad_cam"], metrics=["completeness"], layer="conv2")
    assert "inputs' shape" in cam.not_applicable[("grad_cam", "completeness")]
    records = cam.to_records()
    assert records[0]["status"] == "not applicable" and records[0]["reason"]


def test_ranking_respects_each_metrics_direction():
    result = M.EvaluationResult(methods=["a", "b", "c"], metrics=["deletion", "insertion"])
    result.scores = {
        ("a", "deletion"): torch.tensor([0.1, 0.1]),  # lower is better: a best
        ("b", "deletion"): torch.tensor([0.5, 0.5]),
        ("c", "deletion"): torch.tensor([0.9, 0.9]),
        ("a", "insertion"): torch.tensor([0.8, 0.8]),  # higher is better: a best
        ("b", "insertion"): torch.tensor([0.2, 0.2]),
        ("c", "insertion"): torch.tensor([0.2, 0.2]),
    }
    ranking = result.ranking()
    assert [r["method"] for r in ranking] == ["a", "b", "c"]
    assert ranking[0]["deletion"] == 1 and ranking[0]["insertion"] == 1
    assert ranking[1]["insertion"] == ranking[2]["insertion"] == 2.5  # a tie shares its rank
    assert ranking[0]["overall_rank"] == 1


def test_evaluate_reports_are_self_contained(data):
    model, x, masks = data
    result = lumos.evaluate(
        model,
        x,
        methods=["saliency", "guided_backprop"],
        metrics=["deletion", "pointing_game"],
        masks=masks,
        metric_options={"deletion": {"n_steps": 4}},
    )
    page = result.to_html()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "http" not in page and "<script" not in page
    assert "Ranking" in page and "pointing_game" in page
    assert result.to_html(full=False).startswith("<section")
    records = result.to_records()
    assert {r["method"] for r in records} == {"saliency", "guided_backprop"} and len(records) == 4
    pytest.importorskip("pandas")
    frame = result.to_pandas()
    assert set(frame["method"]) == {"saliency", "guided_backprop"} and len(frame) == 4
    fig = result.plot()
    assert len(fig.axes) == 2 and result.curves_figure() is not None


def test_trust_report_runs_the_applicable_methods(data):
    model, x, masks = data
    names = M.applicable_methods()
    assert "saliency" in names and all(
        "layer" not in info.needs for info in lumos.methods() if info.name in names
    )
    result = M.trust_report(
        model, x, masks=masks, methods=["saliency", "input_x_gradient"], metrics=["sparseness"]
    )
    assert [r["method"] for r in result.ranking()]


def test_evaluate_checks_its_arguments(data):
    model, x, _ = data
    with pytest.raises(InputError, match="either"):
        lumos.evaluate(model, x)
    with pytest.raises(UnknownNameError):
        lumos.evaluate(model, x, methods=["saliency"], metrics=["delet"])
    with pytest.raises(UnknownNameError, match="n_step"):
        lumos.evaluate(
            model,
            x,
            methods=["saliency"],
            metrics=["deletion"],
            metric_options={"deletion": {"n_step": 3}},
        )


def test_same_seed_same_evaluation():
    model = linear_model(n_features=6, n_classes=3)
    x = torch.rand(5, 6)
    kwargs = dict(methods=["saliency"], metrics=["faithfulness_correlation", "infidelity"])
    first = lumos.evaluate(model, x, seed=1, **kwargs)
    second = lumos.evaluate(model, x, seed=1, **kwargs)
    for key, value in first.scores.items():
        torch.testing.assert_close(value, second.scores[key])
