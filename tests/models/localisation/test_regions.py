import numpy as np
import pytest
import torch

from anomaly_discovery.data.sample import Box
from anomaly_discovery.models.localisation.crops import Crop
from anomaly_discovery.models.localisation.regions import (base_regions_from_boxes, base_regions_from_mask, crop_region,
                                                           novel_regions, regions_to_tensors)


@pytest.fixture
def scene():
    """A 96×128 image with a bright 6×6 defect at rows 40–45, cols 70–75, its map and an object mask."""
    image = np.full((96, 128, 3), 60, np.uint8)
    image[40:46, 70:76] = 250
    anomaly = np.zeros((96, 128), np.float32)
    anomaly[40:46, 70:76] = 0.9
    objects = np.zeros((96, 128), bool)
    objects[10:90, 20:120] = True
    return image, anomaly, objects


def test_crop_region_keeps_image_map_and_mask_aligned(scene):
    image, anomaly, objects = scene
    region = crop_region(image, (60, 30, 92, 62), anomaly, objects, "img")
    bright = np.argwhere(region.image[..., 0] == 250)
    hot = np.argwhere(region.anomaly_map > 0.5)
    np.testing.assert_array_equal(bright, hot)
    assert region.image.shape[:2] == region.anomaly_map.shape == region.object_mask.shape == (32, 32)
    np.testing.assert_array_equal(region.object_mask, objects[30:62, 60:92])
    assert region.score == pytest.approx(0.9) and region.area == 36 and region.image_size == (96, 128)


def test_crop_region_resizes_a_map_of_another_size(scene):
    image, anomaly, _ = scene
    half = anomaly[::2, ::2]
    region = crop_region(image, (60, 30, 92, 62), half, None, "img")
    assert region.anomaly_map.shape == (32, 32)
    assert region.object_mask.all()
    peak = np.unravel_index(region.anomaly_map.argmax(), region.anomaly_map.shape)
    assert abs(peak[0] - 12) <= 2 and abs(peak[1] - 12) <= 2


def test_crop_region_refuses_a_box_outside_the_image(scene):
    image, anomaly, _ = scene
    with pytest.raises(ValueError, match="does not lie inside"):
        crop_region(image, (100, 0, 140, 40), anomaly, None, "img")


def test_crop_region_refuses_a_map_outside_unit_range(scene):
    image, anomaly, _ = scene
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        crop_region(image, (0, 0, 10, 10), anomaly * 3, None, "img")


def test_novel_regions_use_the_normalised_map_and_the_crop_score(scene):
    image, anomaly, objects = scene
    normalised = (anomaly * 255).astype(np.uint8)
    crops = [Crop((60, 30, 92, 62), image[30:62, 60:92], np.zeros((32, 32), bool), 0.42, 17)]
    (region,) = novel_regions("img", image, crops, normalised, objects)
    assert region.anomaly_map.max() == pytest.approx(229 / 255)
    assert region.score == 0.42 and region.area == 17 and not region.is_base


def test_base_regions_from_boxes_keep_the_two_largest_padded_squares(scene):
    image, _, _ = scene
    boxes = [Box("scratch", 70, 40, 76, 46), Box("scratch", 10, 10, 40, 30), Box("pit", 90, 60, 115, 90)]
    regions = base_regions_from_boxes(image, boxes, "neu_1")
    assert [r.class_name for r in regions] == ["pit", "scratch"]
    for region, box in zip(regions, (boxes[2], boxes[1])):
        x0, y0, x1, y1 = region.box
        assert x0 <= box.x0 and y0 <= box.y0 and x1 >= box.x1 and y1 >= box.y1
        assert region.anomaly_map.sum() == box.area
        assert region.score == 1.0


def test_base_regions_from_mask_crop_around_the_mask(scene):
    image, anomaly, objects = scene
    regions = base_regions_from_mask(image, anomaly > 0, "hole", "gen_1", objects)
    (region,) = regions
    assert region.class_name == "hole" and region.area == 36
    assert region.anomaly_map.sum() == 36


def test_base_regions_from_an_empty_mask_is_an_error(scene):
    image, anomaly, _ = scene
    with pytest.raises(ValueError, match="empty"):
        base_regions_from_mask(image, np.zeros_like(anomaly, bool), "hole", "gen_1")


def test_regions_to_tensors_resize_all_three_alike(scene):
    image, anomaly, objects = scene
    regions = [crop_region(image, (60, 30, 92, 62), anomaly, objects, "a"),
               crop_region(image, (0, 0, 96, 96), anomaly, objects, "b")]
    images, maps, masks = regions_to_tensors(regions, 64)
    assert images.shape == (2, 3, 64, 64) and maps.shape == masks.shape == (2, 1, 64, 64)
    assert images.dtype == maps.dtype == masks.dtype == torch.uint8
    bright = images[0, 0] > 200
    hot = maps[0, 0] > 100
    assert (bright == hot).float().mean() > 0.98
