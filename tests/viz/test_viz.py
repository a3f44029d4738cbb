"""Figures and HTML fragments: right panels, display scaling as an option, nothing external."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import linear_model, tiny_cnn

import lumos
from lumos.core.errors import InputError
from lumos.viz.maps import absolute_scale, reduce_channels, signed_scale


@pytest.fixture(scope="module")
def image_explanation():
    return lumos.explain(tiny_cnn(), torch.rand(3, 3, 16, 16), method="saliency", abs=False)


def test_image_figure_has_a_row_per_example_and_the_requested_panels(image_explanation):
    fig = image_explanation.figure(examples=[0, 2], panels=("input", "signed", "overlay"))
    assert len(fig.axes) == 6
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1] == "signed" and titles[2] == "overlay"


def test_unknown_panels_and_reductions_are_input_errors(image_explanation):
    with pytest.raises(InputError, match="panels"):
        image_explanation.figure(panels=("input", "sparkles"))
    with pytest.raises(InputError, match="reduction"):
        image_explanation.figure(reduce="median")


def test_tabular_figure_draws_named_bars():
    exp = lumos.explain(linear_model(), torch.randn(2, 5), method="input_x_gradient", target=0)
    fig = exp.figure(feature_names=list("abcde"))
    labels = {t.get_text() for t in fig.axes[0].get_yticklabels()}
    assert labels == set("abcde")


def test_html_repr_is_self_contained(image_explanation):
    html = image_explanation._repr_html_()
    assert "data:image/png;base64," in html and "saliency" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_channel_reductions():
    attr = torch.tensor([[[[1.0]], [[-3.0]], [[2.0]]]])
    assert reduce_channels(attr, "sum").item() == 0.0
    assert reduce_channels(attr, "abs_sum").item() == 6.0
    assert reduce_channels(attr, "max_abs").item() == 3.0
    assert reduce_channels(attr, "norm").item() == pytest.approx(14**0.5)


def test_percentile_scaling_clips_outliers_and_keeps_sign():
    maps = np.concatenate([np.linspace(-1, 1, 99), [100.0]])[None]
    scaled = signed_scale(maps, percentile=98)
    assert scaled.max() == 1.0 and scaled.min() >= -1.0
    assert np.sign(scaled[0, 10]) == -1
    assert absolute_scale(maps).min() >= 0
