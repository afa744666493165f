"""One localisation for a set (the detect job) and for a single served image (the predictor)."""

import numpy as np
import pytest

from anomaly_discovery.models.localisation.localise import (Localisation, fit_localisation, image_regions,
                                                            localise_image, localise_set)
from anomaly_discovery.models.localisation.priors.base import NoObjectPrior

SIZE = 96


class LeftHalfPrior:
    """A prior whose product is the left half of every image."""

    name = "left-half"

    def masks(self, images, normal_images=None):
        masks = []
        for image in images:
            mask = np.zeros(image.shape[:2], bool)
            mask[:, : image.shape[1] // 2] = True
            masks.append(mask)
        return masks


def blob_map(x: int, y: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (strength * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 60.0) + 0.02 * rng.random((SIZE, SIZE))
            ).astype(np.float32)


@pytest.fixture
def data_set():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(6)]
    maps = [blob_map(20 + 8 * i, 30 + 5 * i, 0.6 + 0.08 * i, rng) for i in range(6)]
    return images, maps


def test_a_set_gives_one_localised_image_per_map_with_the_priors_masks_and_crops_around_the_blob(data_set):
    images, maps = data_set
    localised = localise_set(iter(images), maps, LeftHalfPrior())
    assert len(localised) == len(maps)
    for i, result in enumerate(localised):
        assert result.object_mask[:, : SIZE // 2].all() and not result.object_mask[:, SIZE // 2:].any()
        x0, y0, x1, y1 = result.crops[0].box
        assert x0 <= 20 + 8 * i < x1 and y0 <= 30 + 5 * i < y1


def test_one_image_at_the_sets_level_is_cut_as_in_the_set(data_set):
    images, maps = data_set
    localised = localise_set(iter(images), maps, NoObjectPrior())
    thresholds = [r.mebin.threshold for r in localised if r.mebin.n_regions > 0]
    localisation = fit_localisation(maps, thresholds)
    at_the_median = [i for i, r in enumerate(localised) if r.mebin.threshold == localisation.threshold]
    assert at_the_median
    for i in at_the_median:
        alone = localise_image(images[i], maps[i], localisation, NoObjectPrior())
        assert [c.box for c in alone.crops] == [c.box for c in localised[i].crops]
        assert np.array_equal(alone.mebin.mask, localised[i].mebin.mask)


def test_one_image_carries_the_map_its_regions_had_in_the_set(data_set):
    """Every image of the set, alone, gets the set's rescaled map (what its crops' anomaly maps are cut from)."""
    images, maps = data_set
    localised = localise_set(iter(images), maps, NoObjectPrior())
    localisation = fit_localisation(maps, [r.mebin.threshold for r in localised])
    for image, anomaly_map, in_set in zip(images, maps, localised):
        alone = localise_image(image, anomaly_map, localisation, NoObjectPrior())
        assert np.abs(alone.mebin.normalised_map.astype(int) - in_set.mebin.normalised_map).max() <= 1


def test_regions_carry_the_object_mask_of_the_prior_on_both_paths(data_set):
    images, maps = data_set
    localisation = fit_localisation(maps, [128])
    for localised in (localise_set(iter(images[:1]), maps[:1], LeftHalfPrior()),
                      [localise_image(images[0], maps[0], localisation, LeftHalfPrior())]):
        (region, *_) = image_regions("a", images[0], localised[0])
        x0, _, x1, _ = region.box
        expected = np.arange(x0, x1) < SIZE // 2
        assert np.array_equal(region.object_mask[0], expected)


def test_a_localisation_needs_a_range_and_a_threshold_on_the_uint8_scale():
    with pytest.raises(ValueError, match="high > low"):
        Localisation(1.0, 1.0, 10)
    with pytest.raises(ValueError, match="at least one MEBin threshold"):
        fit_localisation([np.zeros((4, 4))], [])
