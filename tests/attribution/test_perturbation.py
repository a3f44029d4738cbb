"""Occlusion, feature ablation and RISE: Captum parity, additivity of disjoint windows,
closed forms on linear models, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch
from models import tiny_cnn
from torch import nn

import lumos
from lumos.attribution.perturbation import Occlusion, window_masks
from lumos.core.errors import InputError


@pytest.mark.parametrize(
    ("window", "stride", "fill"),
    [(4, 2, 0.0), ((3, 5), (2, 3), 0.3), ((4, 4), (4, 4), 0.0), ((2, 3), 1, -1.0)],
)
def test_occlusion_equals_captum_with_the_same_windows(window, stride, fill):
    captum = pytest.importorskip("captum.attr")
    model, x = tiny_cnn(), torch.rand(2, 3, 10, 10)
    exp = lumos.explain(
        model, x, method="occlusion", target=1, window=window, stride=stride, fill=fill
    )
    win = (3, window, window) if isinstance(window, int) else (3, *window)
    st = (3, stride, stride) if isinstance(stride, int) else (3, *stride)
    expected = captum.Occlusion(model).attribute(
        x,
        sliding_window_shapes=win,
        strides=st,
        target=1,
        baselines=fill,
        perturbations_per_eval=128,
    )
    torch.testing.assert_close(exp.attributions, expected, atol=1e-5, rtol=1e-4)


def test_disjoint_windows_add_up_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(12, 3)
    x = torch.randn(4, 12)
    exp = lumos.explain(model, x, method="occlusion", target=2, window=3, stride=3, fill=0.5)
    per_window = exp.attributions.view(4, 4, 3)
    assert torch.equal(per_window, per_window[:, :, :1].expand(-1, -1, 3))  # one drop per window
    with torch.no_grad():
        drop_all = model(x)[:, 2] - model(torch.full_like(x, 0.5))[:, 2]
    torch.testing.assert_close(per_window[:, :, 0].sum(1), drop_all, atol=1e-5, rtol=0)


def test_occlusion_fills_with_mean_blur_or_a_tensor():
    model, x = tiny_cnn(), torch.rand(1, 3, 16, 16)
    for fill in ("mean", "blur", torch.rand(3, 16, 16)):
        exp = lumos.explain(model, x, method="occlusion", target=0, fill=fill)
        assert exp.attributions.shape == x.shape and torch.isfinite(exp.attributions).all()
    same = lumos.explain(model, x, method="occlusion", target=0, fill=x[0])
    # filling with the input itself changes nothing (up to the rounding of kernels that
    # differ with the batch size)
    assert same.attributions.abs().max() < 1e-6


def test_occlusion_defaults_and_window_errors():
    method = Occlusion(tiny_cnn())
    exp = method.explain(torch.rand(1, 3, 64, 64), 0)
    assert exp.attributions.shape == (1, 3, 64, 64)
    with pytest.raises(InputError, match="window"):
        Occlusion(tiny_cnn(), window=(2, 2, 2, 2)).explain(torch.rand(1, 3, 8, 8), 0)
    masks = window_masks((7,), (2,), (2,), torch.device("cpu"))
    assert masks.sum(0).min() == 1  # the last, cut window still covers the border


def test_feature_ablation_of_a_linear_model_is_weight_times_input():
    torch.manual_seed(0)
    model = nn.Linear(6, 2, bias=True)
    x = torch.randn(3, 6)
    exp = lumos.explain(model, x, method="feature_ablation", target=1)
    torch.testing.assert_close(exp.attributions, x * model.weight[1].detach(), atol=1e-5, rtol=0)


def test_feature_ablation_with_groups_equals_captum():
    captum = pytest.importorskip("captum.attr")
    model, x = tiny_cnn(), torch.rand(2, 3, 8, 8)
    mask = torch.arange(4).view(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1)
    exp = lumos.explain(
        model, x, method="feature_ablation", target=3, feature_mask=mask, baselines=0.2
    )
    expected = captum.FeatureAblation(model).attribute(
        x, target=3, feature_mask=mask.view(1, 1, 8, 8), baselines=0.2, perturbations_per_eval=8
    )
    torch.testing.assert_close(exp.attributions, expected, atol=1e-5, rtol=1e-4)


def test_feature_ablation_averages_over_a_background_set():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, background = torch.randn(2, 4), torch.randn(5, 4)
    exp = lumos.explain(model, x, method="feature_ablation", target=None, baselines=background)
    expected = (x - background.mean(0)) * model.weight[0].detach()
    torch.testing.assert_close(exp.attributions, expected, atol=1e-5, rtol=0)


def test_rise_is_seeded_and_finds_the_region_the_model_looks_at():
    class TopLeft(nn.Module):
        def forward(self, x):
            score = x[:, :, :8, :8].mean((1, 2, 3))
            return torch.stack([score, -score], 1)

    x = torch.ones(1, 3, 16, 16)
    a = lumos.explain(TopLeft(), x, method="rise", target=0, n_masks=400, cells=4, seed=1)
    b = lumos.explain(TopLeft(), x, method="rise", target=0, n_masks=400, cells=4, seed=1)
    c = lumos.explain(TopLeft(), x, method="rise", target=0, n_masks=400, cells=4, seed=2)
    assert torch.equal(a.attributions, b.attributions)
    assert not torch.equal(a.attributions, c.attributions)
    saliency = a.attributions[0, 0]
    assert saliency[:6, :6].mean() > saliency[10:, 10:].mean() + 0.05


def test_rise_on_tabular_players():
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    x = torch.randn(3, 5)
    exp = lumos.explain(model, x, method="rise", target=0, n_masks=4000, p=0.5)
    # Σ_i f(x ⊙ M_i) M_ij / (N p) → E[f | M_j = 1] = b + w_j x_j + p Σ_{k≠j} w_k x_k
    w, b = model.weight[0].detach(), model.bias[0].detach()
    expected = b + w * x + ((w * x).sum(1, keepdim=True) - w * x) / 2
    torch.testing.assert_close(exp.attributions, expected, atol=0.15, rtol=0.05)
