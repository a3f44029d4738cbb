"""Localisation metrics: hand-built masks with known answers, and peers' definitions."""

from __future__ import annotations

import pytest
import torch

import lumos.metrics as M
from lumos.core.errors import InputError


@pytest.fixture
def block():
    """A 224×224 image whose ground truth is the block [50:150, 50:150]; the map equals it."""
    mask = torch.zeros(1, 1, 224, 224, dtype=torch.bool)
    mask[..., 50:150, 50:150] = True
    return mask.float(), mask


def test_block_mask_gives_the_known_scores(block):
    attributions, mask = block
    assert M.top_k_intersection(attributions, mask, k=10_000).item() == 1.0
    assert M.top_k_intersection(attributions, mask, k=40_000).item() == 0.25
    assert M.pointing_game(attributions, mask).item() == 1.0
    assert M.relevance_mass_accuracy(attributions, mask).item() == 1.0
    assert M.relevance_rank_accuracy(attributions, mask).item() == 1.0
    assert M.energy_pointing_game(attributions, mask).item() == 1.0
    assert M.attribution_auc(attributions, mask).item() == 1.0


def test_block_scores_for_channel_maps_and_2d_masks(block):
    attributions, mask = block
    rgb = attributions.expand(1, 3, 224, 224) / 3  # channels are summed
    assert M.top_k_intersection(rgb, mask[:, 0], k=10_000).item() == pytest.approx(1.0)
    assert M.relevance_mass_accuracy(rgb, mask[:, 0]).item() == pytest.approx(1.0)


def test_a_map_outside_the_mask_scores_zero(block):
    attributions, mask = block
    outside = 1 - attributions
    assert M.pointing_game(outside, mask).item() == 0.0
    assert M.relevance_mass_accuracy(outside, mask).item() == 0.0
    assert M.attribution_auc(outside, mask).item() == 0.0
    assert M.pointing_game(outside, mask, tolerance=1).item() == 1.0


def test_attribution_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 5, (3, 12, 12), generator=generator).float()  # many ties
    masks = torch.rand(3, 12, 12, generator=generator) > 0.6
    ours = M.attribution_auc(maps, masks)
    for i in range(3):
        expected = roc_auc_score(masks[i].flatten().numpy(), maps[i].flatten().numpy())
        assert ours[i].item() == pytest.approx(expected, abs=1e-6)


def test_relevance_mass_counts_only_positive_relevance():
    maps = torch.tensor([[[3.0, -5.0], [1.0, 0.0]]])
    mask = torch.tensor([[[True, True], [False, False]]])
    assert M.relevance_mass_accuracy(maps, mask).item() == pytest.approx(0.75)
    assert M.relevance_rank_accuracy(maps, mask).item() == pytest.approx(0.5)


def test_localisation_is_per_example_in_a_batch():
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(5, 3, 20, 20, generator=generator)
    masks = torch.rand(5, 1, 20, 20, generator=generator) > 0.7
    for fn in (M.pointing_game, M.relevance_mass_accuracy, M.attribution_auc, M.top_k_intersection):
        batched = fn(maps, masks)
        single = torch.cat([fn(maps[i : i + 1], masks[i : i + 1]) for i in range(5)])
        torch.testing.assert_close(batched, single)


def test_missing_or_mismatched_masks_say_why():
    maps = torch.rand(2, 1, 8, 8)
    with pytest.raises(InputError, match="ground-truth masks"):
        M.pointing_game(maps, None)
    with pytest.raises(InputError, match="shape"):
        M.pointing_game(maps, torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="k must be"):
        M.top_k_intersection(maps, torch.ones(2, 8, 8, dtype=torch.bool), k=100)
