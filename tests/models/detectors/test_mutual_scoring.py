import cv2
import numpy as np
import pytest
import torch

from anomaly_discovery.models.detectors.protocol import Detector
from anomaly_discovery.models.detectors.mutual_scoring import (MutualScoringDetector, interval_average, lowest_count,
                                                               mutual_patch_scores, pairwise_image_min_distances,
                                                               reference_groups)

SIZE = 64


def texture(seed: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """A gray grainy surface with faint diagonal streaks."""
    rng = np.random.default_rng(seed)
    grain = cv2.GaussianBlur(rng.normal(0.0, 1.0, (height, width)).astype(np.float32), (0, 0), 1.0)
    rows, cols = np.mgrid[0:height, 0:width]
    streaks = np.sin((rows + cols) * 0.5 + rng.uniform(0, 6.3))
    return np.clip(120 + 30 * grain / grain.std() + 8 * streaks, 0, 255).astype(np.uint8)


def with_blob(image: np.ndarray, row: int, col: int, half: int = 5) -> tuple[np.ndarray, np.ndarray]:
    out, mask = image.copy(), np.zeros(image.shape[:2], bool)
    mask[row - half:row + half, col - half:col + half] = True
    out[mask] = 245
    return out, mask


def image_set(blob_places):
    """Eight textures; image i gets a blob at blob_places[i] when given. Returns images and masks."""
    images, masks = [], []
    for index in range(8):
        image, mask = texture(300 + index), np.zeros((SIZE, SIZE), bool)
        if index in blob_places:
            image, mask = with_blob(image, *blob_places[index])
        images.append(image)
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def detector() -> MutualScoringDetector:
    return MutualScoringDetector("tiny", image_size=SIZE, device="cpu", progress=False)


def _assert_defect_pixels_stand_out(detections, masks, defective, normal_percentile=99.0):
    normal_pixels = np.concatenate([d.anomaly_map.ravel() for i, d in enumerate(detections) if i not in defective])
    for index in defective:
        inside = detections[index].anomaly_map[masks[index]]
        assert inside.mean() > np.percentile(normal_pixels, normal_percentile)
    scores = np.array([d.score for d in detections])
    assert set(np.argsort(scores)[-len(defective):]) == set(defective)


def test_follows_detector_protocol_and_fit_needs_no_data(detector):
    assert isinstance(detector, Detector)
    assert detector.fit() is detector
    assert detector.fit([]) is detector
    assert detector.fit(None) is detector


def test_defects_at_different_places_score_above_normal_pixels(detector):
    images, masks = image_set({2: (16, 16), 5: (44, 40)})
    _assert_defect_pixels_stand_out(detector.predict(images), masks, [2, 5])


def test_mobilenet_v2_finds_the_defects_too():
    images, masks = image_set({2: (16, 16), 5: (44, 40)})
    detector = MutualScoringDetector("mobilenet_v2", image_size=128, device="cpu", progress=False)
    _assert_defect_pixels_stand_out(detector.predict(images), masks, [2, 5])


def test_a_defect_shared_by_two_images_is_not_hidden(detector):
    # Each patch averages its distances to at least 3 other images, so the twin blob is not its only match.
    images, masks = image_set({1: (30, 30), 6: (30, 30)})
    _assert_defect_pixels_stand_out(detector.predict(images), masks, [1, 6], normal_percentile=100.0)


def test_grouped_scoring_of_a_larger_set_still_finds_defects():
    images, masks = image_set({0: (20, 44), 3: (40, 20)})
    grouped = MutualScoringDetector("tiny", image_size=SIZE, max_references=3, device="cpu", progress=False)
    _assert_defect_pixels_stand_out(grouped.predict(images), masks, [0, 3])


def test_maps_have_each_images_own_size(detector):
    images = [texture(1, 50, 90), np.stack([texture(2, 70, 40)] * 3, axis=2), texture(3)]
    assert [d.anomaly_map.shape for d in detector.predict(images)] == [(50, 90), (70, 40), (64, 64)]


def test_predict_on_no_images_gives_nothing(detector):
    assert detector.predict([]) == []


def test_a_single_image_is_refused(detector):
    with pytest.raises(ValueError, match="at least 2 images"):
        detector.predict([texture(0)])


def test_bad_image_shape_is_named(detector):
    with pytest.raises(ValueError, match=r"image 1 has shape \(2, 64, 64, 3\)"):
        detector.predict([texture(0), np.zeros((2, 64, 64, 3), np.uint8)])


@pytest.mark.parametrize("argument, value, message", [
    ("lowest_fraction", 0.0, "lowest_fraction must be in"), ("top_fraction", 2.0, "top_fraction must be in"),
    ("neighbourhoods", (2,), "neighbourhoods must be odd"), ("max_references", 0, "max_references must be"),
])
def test_bad_settings_are_refused(argument, value, message):
    with pytest.raises(ValueError, match=message):
        MutualScoringDetector("tiny", device="cpu", **{argument: value})


def test_pairwise_image_min_distances_match_brute_force(monkeypatch):
    import anomaly_discovery.models.detectors.mutual_scoring as module

    monkeypatch.setattr(module, "DISTANCE_BLOCK_ELEMENTS", 64)  # blocks of two 4-patch images: many blocks
    features = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0))
    flat = features.reshape(-1, 3)
    expected = torch.cdist(flat, flat).view(5, 4, 5, 4).amin(3)
    torch.testing.assert_close(pairwise_image_min_distances(features), expected, rtol=1e-4, atol=1e-4)


def test_mutual_scores_ignore_the_images_own_patches():
    features = torch.zeros(4, 2, 1)
    features[0] = 5.0  # image 0 differs from the others: far from them, though equal to itself
    scores = mutual_patch_scores(features, lowest_fraction=0.5)
    expected = torch.zeros(4, 2)
    expected[0] = 5.0
    expected[1:] = 5.0 / 3  # images 1-3 average their 3 others: two at distance 0, image 0 at 5
    torch.testing.assert_close(scores, expected)


def test_interval_average_takes_the_lowest_values():
    distances = torch.tensor([[4.0, 1.0, 3.0, 2.0, 10.0], [5.0, 5.0, 0.0, 1.0, 9.0]])
    torch.testing.assert_close(interval_average(distances, 2), torch.tensor([1.5, 0.5]))


def test_lowest_count_is_the_fraction_of_at_least_three_references():
    assert lowest_count(64, 0.1) == 7
    assert lowest_count(7, 0.1) == 3
    assert lowest_count(2, 0.1) == 2
    assert lowest_count(10, 1.0) == 10


def test_reference_groups_cover_every_image_once_with_bounded_sizes():
    groups = reference_groups(23, max_references=4, seed=1)
    assert sorted(torch.cat(groups).tolist()) == list(range(23))
    assert all(2 <= len(group) <= 5 for group in groups)
    assert len(reference_groups(3, max_references=1)) == 1
