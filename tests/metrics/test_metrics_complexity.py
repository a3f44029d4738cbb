"""Complexity metrics: closed forms on uniform and one-hot maps."""

from __future__ import annotations

import math

import pytest
import torch

import lumos.metrics as M


def test_uniform_and_one_hot_maps_have_the_closed_form_scores():
    uniform = torch.ones(1, 1, 10, 10)
    one_hot = torch.zeros(1, 1, 10, 10)
    one_hot[0, 0, 3, 4] = -2.0  # magnitudes count
    assert M.sparseness(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert M.sparseness(one_hot).item() == pytest.approx(99 / 100)
    assert M.complexity(uniform).item() == pytest.approx(math.log(100))
    assert M.complexity(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert M.effective_complexity(uniform).item() == 1.0
    assert M.effective_complexity(one_hot).item() == pytest.approx(0.01)


def test_sparseness_matches_the_gini_definition():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mean_difference = sum(abs(a - b) for a in values[0] for b in values[0]) / 16
    gini = mean_difference / (2 * values.mean())
    assert M.sparseness(values).item() == pytest.approx(gini.item())


def test_complexity_scores_are_scale_free_and_per_example():
    maps = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for fn in (M.sparseness, M.complexity, M.effective_complexity):
        torch.testing.assert_close(fn(maps), fn(7.5 * maps))
        single = torch.cat([fn(maps[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(fn(maps), single)
