"""Shapley estimators: exact enumeration equals brute force over permutations, KernelSHAP
converges to it and is exact once the budget covers every coalition, efficiency holds."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import lumos
from lumos.attribution.shapley import (
    KernelShap,
    coalition_plan,
    rescaled_bootstrap,
    waterfall_figure,
)
from lumos.core.errors import InputError


def mlp(n_features: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_features, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def brute_force(model: nn.Module, x: torch.Tensor, background: torch.Tensor, target: int):
    """Shapley values by walking every permutation of the players."""
    m = x.shape[1]

    cache: dict[tuple[int, frozenset], float] = {}

    def value(e: int, coalition: list[int]) -> float:
        key = (e, frozenset(coalition))
        if key not in cache:
            rows = background.clone()
            rows[:, coalition] = x[e, coalition]
            with torch.no_grad():
                cache[key] = model(rows)[:, target].double().mean().item()
        return cache[key]

    result = torch.zeros(len(x), m, dtype=torch.float64)
    for e in range(len(x)):
        for order in itertools.permutations(range(m)):
            coalition: list[int] = []
            for i in order:
                before = value(e, coalition)
                coalition.append(i)
                result[e, i] += value(e, coalition) - before
    return result / math.factorial(m)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(1)
    model = mlp(6)
    x, background = torch.randn(2, 6), torch.randn(4, 6)
    return model, x, background, brute_force(model, x, background, target=2)


def test_exact_shapley_equals_brute_force_over_permutations(problem):
    model, x, background, expected = problem
    exp = lumos.explain(model, x, method="exact_shapley", target=2, baselines=background)
    torch.testing.assert_close(exp.attributions.double(), expected, atol=1e-6, rtol=0)
    assert exp.delta.abs().max() < 1e-6


def test_exact_shapley_of_grouped_pixels_is_efficient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(2, 3, 8, 8)
    model(x)
    mask = torch.arange(4).view(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1)
    exp = lumos.explain(model, x, method="exact_shapley", target=0, feature_mask=mask)
    assert exp.extras["n_players"] == 4
    phi = exp.extras["phi"]
    with torch.no_grad():
        f_x, f_0 = model(x)[:, 0], model(torch.zeros_like(x))[:, 0]
    torch.testing.assert_close(phi.sum(1), (f_x - f_0).double(), atol=1e-5, rtol=0)
    # every pixel of a group carries the group's value
    assert torch.equal(
        exp.attributions[:, :, :4, :4], phi[:, 0].view(2, 1, 1, 1).expand(2, 3, 4, 4).float()
    )


def test_kernel_shap_is_exact_once_the_budget_covers_all_coalitions(problem):
    model, x, background, expected = problem
    exp = lumos.explain(
        model, x, method="kernel_shap", target=2, baselines=background, n_samples=62
    )
    torch.testing.assert_close(exp.attributions.double(), expected, atol=1e-6, rtol=0)
    assert exp.extras["exact"]


def test_kernel_shap_error_falls_with_the_budget_and_efficiency_holds_exactly():
    torch.manual_seed(0)
    model, x, background = mlp(12), torch.randn(4, 12), torch.randn(8, 12)
    exact = lumos.explain(model, x, method="exact_shapley", target=0, baselines=background)
    errors = []
    for budget in (32, 256, 2048):
        exp = lumos.explain(
            model, x, method="kernel_shap", target=0, baselines=background, n_samples=budget
        )
        assert exp.delta.abs().max() < 1e-5
        assert exp.extras["n_evaluations"] <= budget
        errors.append((exp.extras["phi"] - exact.extras["phi"]).pow(2).mean().sqrt().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05 * exact.extras["phi"].abs().mean().item()


def test_kernel_shap_standard_errors_shrink_and_track_the_error():
    torch.manual_seed(0)
    model, x = mlp(12), torch.randn(4, 12)
    exact = lumos.explain(model, x, method="exact_shapley", target=1).extras["phi"]
    small = lumos.explain(model, x, method="kernel_shap", target=1, n_samples=128)
    large = lumos.explain(model, x, method="kernel_shap", target=1, n_samples=1024)
    assert small.extras["stderr"].mean() > large.extras["stderr"].mean() > 0
    error = (small.extras["phi"] - exact).abs()
    assert (error < 4 * small.extras["stderr"] + 1e-6).float().mean() > 0.9


def test_kernel_shap_stops_early_when_the_standard_error_is_small():
    torch.manual_seed(0)
    model, x = mlp(12), torch.randn(2, 12)
    full = lumos.explain(model, x, method="kernel_shap", target=1, n_samples=3000)
    early = lumos.explain(model, x, method="kernel_shap", target=1, n_samples=3000, tol=0.05)
    assert early.extras["n_evaluations"] < full.extras["n_evaluations"]
    assert early.delta.abs().max() < 1e-5


def test_kernel_shap_plan_enumerates_small_sizes_and_stratifies_distinct_pairs():
    plan = coalition_plan(14, 2076, torch.Generator().manual_seed(0))
    assert set(plan.enumerated.sum(1).tolist()) == {1, 2, 12, 13}
    sampled = plan.sampled.view(-1, 2, 14)
    assert torch.equal(sampled[:, 0], ~sampled[:, 1])
    assert len(plan.enumerated) + len(plan.sampled) <= 2076
    # every remaining size gets the same share of pairs (the middle size, its own complement,
    # half), rounded by systematic sampling, and every prefix is spread the same way
    sizes = sampled[:, 0].sum(1)
    small = torch.minimum(sizes, 14 - sizes)
    counts = torch.bincount(small, minlength=8)[3:].double()
    share = torch.tensor([2, 2, 2, 2, 1.0]) / 9 * len(small)
    assert (counts - share).abs().max() <= 1
    first_half = torch.bincount(small[: len(small) // 2], minlength=8)[3:].double()
    assert (first_half - share / 2).abs().max() <= 1
    # without replacement: no pair twice (a size-7 pair counts once in either order)
    canonical = torch.where(sampled[:, 0, :1], sampled[:, 0], sampled[:, 1])
    assert len(torch.unique(canonical, dim=0)) == len(canonical)
    # each stratum's coalitions share its exact kernel mass
    m, s = 14, torch.arange(3, 12, dtype=torch.float64)
    torch.testing.assert_close(
        plan.weights(len(plan.strata)).sum(), ((m - 1) / (s * (m - s))).sum()
    )


def test_kernel_shap_plan_stays_within_the_budget_and_every_size_population():
    for m in range(3, 9):
        for budget in range(1, 2**m - 2):
            plan = coalition_plan(m, budget, torch.Generator().manual_seed(budget))
            assert len(plan.enumerated) + len(plan.sampled) <= budget
            assert len(plan.enumerated) + len(plan.sampled) >= budget - 1
            counts = torch.bincount(plan.strata, minlength=len(plan.population))
            assert (counts <= plan.population).all()


def test_rescaled_bootstrap_multipliers_average_one_and_vanish_for_a_full_stratum():
    strata = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    population = torch.tensor([100.0, 3.0, 50.0])
    multiplier = rescaled_bootstrap(strata, population, 4000, torch.Generator().manual_seed(0))
    assert torch.equal(multiplier[:, 4:], torch.ones(4000, 4, dtype=torch.float64))
    torch.testing.assert_close(
        multiplier[:, :4].mean(0), torch.ones(4, dtype=torch.float64), atol=0.05, rtol=0
    )


def test_kernel_shap_is_exact_for_pairwise_interactions_at_any_budget():
    torch.manual_seed(0)
    a, b = torch.randn(10).double(), torch.randn(10, 10).double()

    def quadratic(x: torch.Tensor) -> torch.Tensor:
        score = x @ a + ((x @ b) * x).sum(1)
        return torch.stack([score, -score], 1)

    x = torch.randn(3, 10).double()
    exact = lumos.explain(quadratic, x, method="exact_shapley", target=0).extras["phi"]
    for budget in (24, 60, 300):
        exp = lumos.explain(quadratic, x, method="kernel_shap", target=0, n_samples=budget)
        torch.testing.assert_close(exp.extras["phi"], exact, atol=1e-6, rtol=0)


def test_kernel_shap_shrinkage_lowers_the_error_at_a_small_budget():
    torch.manual_seed(0)
    model, x = mlp(14), torch.randn(8, 14)
    exact = lumos.explain(model, x, method="exact_shapley", target=0).extras["phi"]

    def error(shrink: bool) -> float:
        total = 0.0
        for seed in range(6):
            exp = lumos.explain(
                model, x, method="kernel_shap", target=0, n_samples=112, seed=seed, shrink=shrink
            )
            assert exp.delta.abs().max() < 1e-6
            total += ((exp.extras["phi"] - exact).pow(2).sum(1) / exact.pow(2).sum(1)).mean()
        return float(total)

    assert error(True) < 0.95 * error(False)


def test_shapley_sampling_converges_and_is_exactly_efficient(problem):
    model, x, background, expected = problem
    exp = lumos.explain(
        model, x, method="shapley_sampling", target=2, baselines=background, n_samples=2000
    )
    assert exp.delta.abs().max() < 1e-6
    assert (exp.attributions.double() - expected).abs().max() < 0.02
    assert exp.extras["n_permutations"] % 2 == 0


@pytest.mark.parametrize("method", ["kernel_shap", "shapley_sampling"])
def test_same_seed_same_values_other_seed_other_samples(method):
    model, x = mlp(10), torch.randn(2, 10)
    a = lumos.explain(model, x, method=method, target=0, n_samples=100, seed=3)
    b = lumos.explain(model, x, method=method, target=0, n_samples=100, seed=3)
    c = lumos.explain(model, x, method=method, target=0, n_samples=100, seed=4)
    assert torch.equal(a.attributions, b.attributions)
    assert not torch.equal(a.attributions, c.attributions)


def test_results_do_not_depend_on_the_batch_size(problem):
    model, x, background, _ = problem
    a = KernelShap(model, n_samples=40).explain(x, 2, baselines=background)
    b = KernelShap(model, n_samples=40, batch_size=50).explain(x, 2, baselines=background)
    torch.testing.assert_close(a.attributions, b.attributions)


def test_exact_shapley_refuses_too_many_players():
    with pytest.raises(InputError, match="kernel_shap"):
        lumos.explain(mlp(24), torch.randn(1, 24), method="exact_shapley", target=0)


def test_waterfall_figure_shows_feature_names(problem):
    model, x, background, _ = problem
    exp = lumos.explain(model, x, method="kernel_shap", target=2, baselines=background)
    names = [f"feature {i}" for i in range(6)]
    fig = waterfall_figure(exp, names, index=1, max_display=4)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 4 and labels[-1] == "3 other features"
    assert all(label in names for label in labels[:-1])
    with pytest.raises(InputError, match="names"):
        waterfall_figure(exp, names[:2])


def test_tuple_and_dict_inputs_share_one_set_of_players():
    from models import TwoInputModel

    torch.manual_seed(0)
    model = TwoInputModel().eval()
    a, b = torch.randn(2, 4), torch.randn(2, 2)
    exp = lumos.explain(model, (a, b), method="exact_shapley", target=0)
    assert exp.extras["n_players"] == 6 and exp.delta.abs().max() < 1e-6
    as_dict = lumos.explain(model, {"a": a, "b": b}, method="kernel_shap", target=0)
    torch.testing.assert_close(as_dict.attributions["a"], exp.attributions[0])
    torch.testing.assert_close(as_dict.attributions["b"], exp.attributions[1])
    # the linear input's values are closed-form: w·(a − 0)
    torch.testing.assert_close(exp.attributions[0], a * model.a.weight[0].detach())


def test_progress_bar_runs(capsys):
    pytest.importorskip("tqdm")
    exp = KernelShap(mlp(6), progress=True, batch_size=16).explain(torch.randn(1, 6), 0)
    assert exp.delta.abs().max() < 1e-6
    assert "kernel_shap" in capsys.readouterr().err


def test_kernel_shap_shrink_must_be_a_bool():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(lumos.LumosError, match="shrink must be True or False"):
        lumos.explain(model, torch.rand(2, 4), method="kernel_shap", target=0, shrink="no")
