"""The black-box engine: NumPy models such as scikit-learn's, players, references, batching,
and dataset-level permutation importance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lumos
from lumos.attribution.blackbox import TensorCallable, make_players, numpy_model, references
from lumos.attribution.importance import permutation_importance
from lumos.core.errors import BaselineError, InputError
from lumos.core.inputs import Structure

TENSOR = Structure("tensor", ("input",))


@pytest.fixture(scope="module")
def forest():
    ensemble = pytest.importorskip("sklearn.ensemble")
    rng = np.random.default_rng(0)
    data = rng.normal(size=(300, 5)).astype(np.float32)
    labels = (data[:, 0] + 2 * data[:, 2] > 0).astype(int)
    model = ensemble.RandomForestClassifier(n_estimators=20, random_state=0).fit(data, labels)
    return model, torch.from_numpy(data)


def test_kernel_shap_explains_a_scikit_learn_forest_through_predict_proba(forest):
    model, data = forest
    x, background = data[:3], data[100:120]
    exp = lumos.explain(
        model.predict_proba, x, method="kernel_shap", target=1, baselines=background
    )
    exact = lumos.explain(
        model.predict_proba, x, method="exact_shapley", target=1, baselines=background
    )
    torch.testing.assert_close(exp.attributions, exact.attributions, atol=1e-6, rtol=0)
    assert exp.delta.abs().max() < 1e-6
    base = model.predict_proba(background.numpy())[:, 1].mean()
    phi_sum = exp.extras["phi"].sum(1).numpy()
    np.testing.assert_allclose(phi_sum, model.predict_proba(x.numpy())[:, 1] - base, atol=1e-6)
    top = exp.attributions.abs().mean(0).argsort(descending=True)[:2]
    assert set(top.tolist()) == {0, 2}


@pytest.mark.parametrize(
    "method", ["lime", "occlusion", "feature_ablation", "shapley_sampling", "ciu", "rise"]
)
def test_every_black_box_method_takes_a_numpy_model(forest, method):
    model, data = forest
    options = {i.name: i.options for i in lumos.methods()}[method]
    fast = {k: v for k, v in {"n_samples": 8, "n_masks": 8}.items() if k in options}
    exp = lumos.explain(model.predict_proba, data[:2], method=method, target=0, **fast)
    assert exp.attributions.shape == (2, 5) and torch.isfinite(exp.attributions).all()


def test_scalar_outputs_with_target_none():
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    data = rng.normal(size=(50, 4))
    regressor = linear_model.LinearRegression().fit(data, data @ np.array([1.0, -2.0, 0.0, 3.0]))
    x = torch.from_numpy(data[:2])
    exp = lumos.explain(regressor.predict, x, method="exact_shapley", target=None)
    expected = x * torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(exp.attributions, expected, atol=1e-8, rtol=0)


def test_tensor_callables_stay_on_tensors_and_numpy_model_converts():
    calls = []

    def on_tensors(x):
        calls.append(type(x))
        return x.sum(1, keepdim=True)

    wrapped = TensorCallable(on_tensors)
    assert isinstance(wrapped(torch.ones(2, 3)), torch.Tensor) and wrapped.numpy is False
    forced = numpy_model(lambda a: a.sum(1))
    out = forced(torch.ones(2, 3))
    assert isinstance(out, torch.Tensor) and out.tolist() == [3.0, 3.0]
    assert calls == [torch.Tensor]


def test_default_players_grid_for_images_features_for_tables_and_offsets_for_tuples():
    image, table = torch.rand(2, 3, 16, 16), torch.rand(2, 5)
    players = make_players([image])
    assert players.n_players == 64 and players.masks[0].shape == (1, 3, 16, 16)
    assert torch.equal(players.masks[0][0, 0], players.masks[0][0, 2])  # channels together
    both = make_players([image, table], (torch.zeros(16, 16, dtype=torch.long), torch.arange(5)))
    assert both.n_players == 6 and both.masks[1].min() == 1
    with pytest.raises(InputError, match="broadcast"):
        make_players([table], torch.arange(4))
    with pytest.raises(InputError, match="integer"):
        make_players([table], torch.rand(5))


def test_players_spread_values_onto_their_elements():
    x = torch.rand(2, 1, 2, 2)
    players = make_players([x], torch.tensor([[0, 1], [1, 2]]))
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    spread = players.spread(values, [x.shape])[0]
    assert spread[1, 0].tolist() == [[4.0, 5.0], [5.0, 6.0]]


def test_references_one_row_a_background_set_or_a_name():
    x = torch.rand(3, 4)
    assert references(None, [x], TENSOR)[0].shape == (3, 1, 4)
    assert references(torch.rand(4), [x], TENSOR)[0].shape == (1, 1, 4)
    assert references(torch.rand(7, 4), [x], TENSOR)[0].shape == (1, 7, 4)
    assert references("mean", [x], TENSOR)[0].shape == (3, 1, 4)
    with pytest.raises(BaselineError, match="background"):
        references(torch.rand(7, 5), [x], TENSOR)


def test_permutation_importance_finds_the_features_a_model_uses(forest):
    model, data = forest
    labels = (data[:, 0] + 2 * data[:, 2] > 0).long()
    result = permutation_importance(model.predict_proba, data[:200], labels[:200], n_repeats=3)
    assert result.importances.shape == (5, 3)
    assert result.mean.argmax() == 2 and result.mean[0] > result.mean[[1, 3, 4]].max()
    assert result.baseline_score > 0.95
    again = permutation_importance(model.predict_proba, data[:200], labels[:200], n_repeats=3)
    assert torch.equal(result.importances, again.importances)


def test_permutation_importance_on_a_torch_regressor_with_groups():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    x = torch.randn(100, 4)
    y = model(x).detach()
    result = permutation_importance(
        model, x, y, metric="neg_mse", feature_mask=torch.tensor([0, 1, 1, 0])
    )
    assert result.mean.shape == (2,) and result.mean[0].abs() < 1e-9 and result.mean[1] > 1


def test_generated_rows_reach_the_model_in_its_usual_layout():
    """A model that views across the batch needs contiguous rows (the player masks are looked
    up as a transposed view)."""
    torch.manual_seed(0)
    weights = torch.randn(3, 3)

    def model(x: torch.Tensor) -> torch.Tensor:
        assert x.is_contiguous()
        return x.view(-1, 2).sum(1).view(x.shape[0], 3) @ weights

    x, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))
    scores = permutation_importance(model, x, labels, n_repeats=2)
    assert torch.isfinite(torch.as_tensor(scores.mean)).all()
    exp = lumos.explain(model, x, method="kernel_shap", target=1, n_samples=40)
    assert torch.isfinite(exp.attributions).all()
