import numpy as np
import pytest

from anomaly_discovery.models.localisation.crops import (CropConfig, anomaly_crops, box_gap, crop_boxes, merge_boxes,
                                                         region_box)
from anomaly_discovery.models.localisation.mebin import MEBinResult, mebin, normalise_jointly

SIZE = 200


def result_for(mask, n_regions, normalised=None):
    normalised = np.zeros(mask.shape, np.uint8) if normalised is None else normalised
    return MEBinResult(mask, 100, n_regions, normalised, np.zeros(64, np.int64))


def mask_with(rectangles, size=SIZE):
    mask = np.zeros((size, size), bool)
    for x, y, w, h in rectangles:
        mask[y:y + h, x:x + w] = True
    return mask


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def test_empty_mask_gives_one_crop_of_the_whole_image(image):
    (crop,) = anomaly_crops(image, result_for(np.zeros((SIZE, SIZE), bool), 0))
    assert crop.box == (0, 0, SIZE, SIZE)
    assert np.array_equal(crop.image, image) and crop.area == 0 and not crop.mask.any()


def test_half_side_is_padded_region_or_minimum_size_capped_at_half_the_image():
    shape, config = (SIZE, SIZE), CropConfig()
    small = region_box((90, 90, 10, 10), shape, config)
    large = region_box((50, 50, 100, 60), shape, config)
    huge = region_box((0, 0, 200, 190), shape, config)
    assert small[2] - small[0] == 2 * 20
    assert large[2] - large[0] == 2 * 55
    assert huge == (0, 0, SIZE, SIZE)


def test_boxes_are_square_and_inside_the_image(image):
    rng = np.random.default_rng(1)
    for _ in range(20):
        rectangles = [(*rng.integers(0, SIZE - 20, 2), *rng.integers(2, 40, 2)) for _ in range(rng.integers(1, 6))]
        for x0, y0, x1, y1 in crop_boxes(mask_with(rectangles), 10):
            assert x1 - x0 == y1 - y0 > 0
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE


def test_box_at_the_border_is_shifted_inside_not_shrunk():
    x0, y0, x1, y1 = region_box((0, 190, 10, 10), (SIZE, SIZE), CropConfig())
    assert (x0, y1) == (0, SIZE) and x1 - x0 == y1 - y0 == 40


def test_nearby_boxes_merge_and_distant_ones_do_not():
    shape = (SIZE, SIZE)
    touching = [(10, 10, 50, 50), (50, 10, 90, 50)]
    distant = [(10, 10, 50, 50), (120, 120, 160, 160)]
    (merged,) = merge_boxes(touching, shape, 0.01)
    assert merged == (10, 0, 90, 80)
    assert sorted(merge_boxes(distant, shape, 0.01)) == distant


def test_overlapping_boxes_merge_even_with_zero_merge_distance():
    assert len(merge_boxes([(10, 10, 50, 50), (40, 40, 80, 80)], (SIZE, SIZE), 0.0)) == 1


def test_merging_repeats_until_no_pair_is_close():
    boxes = [(0, 0, 40, 40), (40, 0, 80, 40), (60, 40, 120, 100)]
    (merged,) = merge_boxes(boxes, (SIZE, SIZE), 0.01)
    assert merged[2] - merged[0] == merged[3] - merged[1] == 120


def test_box_gap_is_edge_distance_and_euclidean_on_the_diagonal():
    assert box_gap((0, 0, 10, 10), (5, 5, 15, 15)) == -1
    assert box_gap((0, 0, 10, 10), (13, 2, 20, 8)) == 3
    assert box_gap((0, 0, 10, 10), (13, 14, 20, 20)) == 5


def test_more_boxes_than_regions_keeps_n_regions_plus_one_largest_first():
    mask = mask_with([(5, 5, 10, 10), (150, 5, 30, 30), (5, 150, 45, 45), (150, 150, 12, 12)])
    boxes = crop_boxes(mask, 1)
    assert len(boxes) == 2
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    assert areas == sorted(areas, reverse=True) and areas[0] == (2 * int(45 * 0.55)) ** 2


def test_no_cap_when_boxes_do_not_exceed_the_region_count():
    mask = mask_with([(5, 5, 10, 10), (150, 150, 12, 12)])
    assert len(crop_boxes(mask, 2)) == 2


def test_crop_score_is_the_normalised_maximum_inside_the_crop_and_area_counts_mask_pixels(image):
    mask = mask_with([(20, 20, 10, 10), (150, 150, 20, 20)])
    normalised = np.zeros((SIZE, SIZE), np.uint8)
    normalised[25, 25], normalised[160, 160] = 255, 102
    crops = anomaly_crops(image, result_for(mask, 2, normalised))
    by_area = {crop.area: crop.score for crop in crops}
    assert by_area == {100: 1.0, 400: 0.4}
    for crop in crops:
        x0, y0, x1, y1 = crop.box
        assert np.array_equal(crop.image, image[y0:y1, x0:x1]) and crop.mask.shape == crop.image.shape[:2]


def test_mask_of_another_size_is_resized_to_the_image(image):
    mask = np.zeros((50, 50), bool)
    mask[10:15, 10:15] = True
    (crop,) = anomaly_crops(image, result_for(mask, 1))
    assert crop.area == 20 * 20
    assert crop.box == (30, 30, 70, 70)


def test_non_square_image_clips_a_square_longer_than_its_short_side():
    image = np.zeros((60, 300), np.uint8)
    mask = np.zeros((60, 300), bool)
    mask[20:40, 100:200] = True
    (crop,) = anomaly_crops(image, result_for(mask, 1))
    x0, y0, x1, y1 = crop.box
    assert (y0, y1) == (0, 60) and x1 - x0 == 110


def test_crops_of_real_mebin_results_have_scores_in_unit_range():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    maps = []
    for amplitude in (1.0, 0.7, 0.4, 0.2):
        centres = rng.integers(20, SIZE - 20, (3, 2))
        maps.append(sum(amplitude * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 80.0) for cx, cy in centres)
                    + 0.05 * rng.random((SIZE, SIZE)))
    images = rng.integers(0, 256, (len(maps), SIZE, SIZE), dtype=np.uint8)
    for picture, result in zip(images, mebin(normalise_jointly(maps))):
        crops = anomaly_crops(picture, result)
        assert 1 <= len(crops) <= max(result.n_regions + 1, 1)
        assert all(0.0 <= crop.score <= 1.0 for crop in crops)


def test_config_and_image_are_validated():
    with pytest.raises(ValueError, match="min_size"):
        CropConfig(min_size=0.7)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        anomaly_crops(np.zeros(4, np.uint8), result_for(np.zeros((4, 4), bool), 0))
