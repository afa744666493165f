import numpy as np
import pytest
import torch

from anomaly_discovery.models.discovery.region_merging import (default_tau, merge_by_image, merge_region_predictions,
                                                               novel_region_probabilities)


@pytest.fixture
def region_probs():
    return np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6]])


def test_equal_areas_average_the_regions(region_probs):
    merged = merge_region_predictions(region_probs, [400, 400, 400], tau=100.0)
    assert np.allclose(merged, region_probs.mean(axis=0))


def test_one_huge_region_dominates(region_probs):
    merged = merge_region_predictions(region_probs, [1_000_000, 100, 100], tau=100.0)
    assert np.allclose(merged, region_probs[0], atol=1e-3)


def test_weights_follow_softmax_of_root_area_over_tau():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    merged = merge_region_predictions(probs, [10_000, 2_500], tau=50.0)
    alpha = np.exp([100 / 50, 50 / 50]) / np.exp([100 / 50, 50 / 50]).sum()
    assert np.allclose(merged, alpha)


def test_single_crop_keeps_its_prediction(region_probs):
    assert np.allclose(merge_region_predictions(region_probs[:1], [37], tau=100.0), region_probs[0])


def test_merge_rejects_mismatched_areas(region_probs):
    with pytest.raises(ValueError, match="region_areas"):
        merge_region_predictions(region_probs, [1, 2])


def test_novel_region_probabilities_zero_base_columns():
    probs = novel_region_probabilities(torch.tensor([[0.9, 0.1, 0.3, 0.2]]), n_base=2, temperature=0.1)
    assert probs.shape == (1, 4) and np.all(probs[:, :2] == 0)
    assert probs.sum() == pytest.approx(1.0)
    assert probs[0, 2] / probs[0, 3] == pytest.approx(np.exp(1.0))


def test_merge_by_image_groups_regions_and_keeps_their_labels():
    probs = np.array([
        [0.90, 0.05, 0.05],   # image a, region 0: base-heavy, novel column 1 wins after masking
        [0.10, 0.20, 0.70],   # image a, region 1
        [0.30, 0.60, 0.10],   # image b, single region
    ])
    merged = merge_by_image(["a", "a", "b"], probs, [100, 100, 9], n_base=1, tau=100.0)
    assert list(merged) == ["a", "b"]
    assert merged["a"].region_labels == [0, 1]
    assert np.allclose(merged["a"].probs, np.mean([[0.5, 0.5], [0.2 / 0.9, 0.7 / 0.9]], axis=0))
    assert merged["a"].label == 1
    assert merged["b"].label == 0 and merged["b"].region_labels == [0]
    assert np.allclose(merged["b"].probs, [6 / 7, 1 / 7])


def test_merge_by_image_needs_one_id_per_region(region_probs):
    with pytest.raises(ValueError, match="image id"):
        merge_by_image(["a", "b"], region_probs, [1, 1, 1], n_base=0)


@pytest.mark.parametrize(("size", "tau"), [((256, 320), 50.0), ((511, 100), 50.0), ((512, 512), 100.0),
                                           ((1024, 700), 100.0)])
def test_default_tau_is_50_below_512_pixels(size, tau):
    assert default_tau(size) == tau
