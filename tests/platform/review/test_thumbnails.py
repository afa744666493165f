"""Gallery thumbnails: the square context crop, the overlays read from the detect-style files, the JPEG size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from anomaly_discovery.data import save_image
from anomaly_discovery.platform.review.thumbnails import context_box, overlay, region_thumbnail

BOX = (40, 50, 60, 58)


@pytest.fixture
def region_files(tmp_path, rng):
    """A 128 px grey image with a bright bar in ``BOX``, its whole-image mask and anomaly map beside it."""
    image = np.full((128, 128, 3), 120, np.uint8) + rng.integers(0, 5, (128, 128, 3), dtype=np.uint8)
    image[BOX[1]:BOX[3], BOX[0]:BOX[2]] = (250, 250, 40)
    mask = np.zeros((128, 128), bool)
    mask[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
    save_image(tmp_path / "image.png", image)
    save_image(tmp_path / "detect" / "mebin_mask.png", mask)
    save_image(tmp_path / "detect" / "anomaly_map.png", np.uint8(mask) * 255)
    return str(tmp_path / "image.png"), str(tmp_path / "detect" / "mebin_mask.png")


def decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


@pytest.mark.parametrize("box, shape", [((40, 50, 60, 58), (128, 128)), ((0, 0, 4, 4), (128, 128)),
                                        ((100, 120, 128, 128), (128, 200))])
def test_context_box_is_a_square_inside_the_image_holding_the_box(box, shape):
    x0, y0, x1, y1 = context_box(box, shape)
    assert x1 - x0 == y1 - y0 >= 32
    assert 0 <= x0 <= box[0] and 0 <= y0 <= box[1] and box[2] <= x1 <= shape[1] and box[3] <= y1 <= shape[0]


def test_context_box_of_a_box_longer_than_the_image_is_as_tall_as_the_image_around_its_centre():
    x0, y0, x1, y1 = context_box((0, 0, 300, 20), (64, 400))
    assert (y0, y1, x1 - x0) == (0, 64, 64) and x0 <= 150 <= x1


def test_thumbnail_is_a_small_square_jpeg(region_files):
    image_path, mask_path = region_files
    data = region_thumbnail(image_path, BOX, mask_path, "map + mask", size=96)
    assert data[:2] == b"\xff\xd8" and len(data) < 10_000
    assert decode(data).shape == (96, 96, 3)


def test_overlays_change_the_crop_and_a_region_without_files_shows_the_plain_crop(region_files):
    image_path, mask_path = region_files
    plain = decode(region_thumbnail(image_path, BOX, mask_path, "image")).astype(int)
    mapped = decode(region_thumbnail(image_path, BOX, mask_path, "anomaly map")).astype(int)
    masked = decode(region_thumbnail(image_path, BOX, mask_path, "mask")).astype(int)
    assert np.abs(mapped - plain).mean() > 1 and np.abs(masked - plain).mean() > 0.5
    without_files = decode(region_thumbnail(image_path, BOX, None, "map + mask")).astype(int)
    assert np.abs(without_files - plain).max() <= 3


def test_unknown_overlay_mode_is_refused(region_files):
    with pytest.raises(ValueError, match="overlay mode"):
        region_thumbnail(region_files[0], BOX, None, "heatmap")


def test_float_maps_above_one_are_scaled_for_display():
    image = np.zeros((8, 8, 3), np.uint8)
    raw = np.zeros((8, 8), np.float32)
    raw[0, 0] = 5.0
    shown = overlay(image, raw)
    assert shown[0, 0].any() and not shown[7, 7].any()
