import numpy as np
import pytest

from anomaly_discovery.models.detectors.anomaly_synthesis import (TEXTURE_KINDS, augment_defect, extend_anomaly,
                                                                  paste_defect, perlin_mask, perlin_noise,
                                                                  procedural_texture, simulate_anomaly)

SHAPE = (96, 96)


@pytest.fixture
def gray_image() -> np.ndarray:
    return np.full(SHAPE + (3,), 120, np.uint8)


@pytest.fixture
def defect() -> tuple[np.ndarray, np.ndarray]:
    image = np.full(SHAPE + (3,), 60, np.uint8)
    mask = np.zeros(SHAPE, bool)
    mask[40:52, 30:44] = True
    image[mask] = 250
    return image, mask


def test_perlin_noise_has_the_shape_asked_even_when_not_divisible_by_the_resolution():
    noise = perlin_noise((50, 70), (4, 8), np.random.default_rng(0))
    assert noise.shape == (50, 70)
    assert noise.dtype == np.float32
    assert -1.5 < noise.min() < 0 < noise.max() < 1.5


def test_perlin_mask_is_binary_nonempty_and_covers_a_sensible_fraction():
    rng = np.random.default_rng(0)
    masks = [perlin_mask((128, 128), rng) for _ in range(40)]
    fractions = np.array([m.mean() for m in masks])
    assert all(m.dtype == np.bool_ for m in masks)
    assert (fractions > 0).all()
    assert 0.01 < fractions.mean() < 0.3
    assert fractions.max() < 0.6


def test_perlin_mask_is_deterministic_for_a_seed():
    first = perlin_mask(SHAPE, np.random.default_rng(7))
    again = perlin_mask(SHAPE, np.random.default_rng(7))
    other = perlin_mask(SHAPE, np.random.default_rng(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("kind", TEXTURE_KINDS)
def test_procedural_texture_of_each_kind_is_a_varied_rgb_image(kind):
    texture = procedural_texture(SHAPE, np.random.default_rng(1), kind)
    assert texture.shape == SHAPE + (3,)
    assert texture.dtype == np.uint8
    assert texture.std() > 1.0


def test_unknown_texture_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="marble"):
        procedural_texture(SHAPE, np.random.default_rng(0), "marble")


def test_simulated_anomaly_changes_only_and_almost_all_of_its_mask(gray_image):
    changed_in_mask, mask_pixels = 0, 0
    for seed in range(10):
        out, mask = simulate_anomaly(gray_image, np.random.default_rng(seed))
        changed = (out != gray_image).any(axis=2)
        assert mask.any()
        assert not (changed & ~mask).any()
        changed_in_mask += int((changed & mask).sum())
        mask_pixels += int(mask.sum())
    assert changed_in_mask >= 0.9 * mask_pixels


def test_simulated_anomaly_stays_in_the_foreground(gray_image):
    foreground = np.zeros(SHAPE, bool)
    foreground[:, :40] = True
    for seed in range(5):
        out, mask = simulate_anomaly(gray_image, np.random.default_rng(seed), foreground)
        assert mask.any() and not (mask & ~foreground).any()
        assert np.array_equal(out[:, 40:], gray_image[:, 40:])


def test_simulated_anomaly_does_not_modify_its_input(gray_image):
    before = gray_image.copy()
    simulate_anomaly(gray_image, np.random.default_rng(0))
    assert np.array_equal(gray_image, before)


def test_fainter_blend_range_changes_the_image_less(gray_image):
    def mean_change(min_beta, max_beta):
        changes = []
        for seed in range(10):
            out, mask = simulate_anomaly(gray_image, np.random.default_rng(seed), min_beta=min_beta,
                                         max_beta=max_beta)
            changes.append(np.abs(out.astype(float) - gray_image)[mask].mean())
        return np.mean(changes)

    assert mean_change(0.85, 0.95) < 0.5 * mean_change(0.0, 0.1)


@pytest.mark.parametrize("min_beta, max_beta", [(0.5, 0.4), (-0.1, 0.5), (0.2, 1.0)])
def test_blend_range_outside_zero_one_or_reversed_is_refused(gray_image, min_beta, max_beta):
    with pytest.raises(ValueError, match="min_beta"):
        simulate_anomaly(gray_image, np.random.default_rng(0), min_beta=min_beta, max_beta=max_beta)


def test_augmented_defect_crop_matches_its_mask_and_respects_the_size_limit(defect):
    image, mask = defect
    for seed in range(10):
        crop, crop_mask = augment_defect(image, mask, np.random.default_rng(seed), max_size=(10, 10))
        assert crop.shape[:2] == crop_mask.shape
        assert crop_mask.any()
        assert crop_mask.shape[0] <= 10 and crop_mask.shape[1] <= 10


def test_extended_anomaly_is_pasted_inside_the_foreground_only(gray_image, defect):
    foreground = np.zeros(SHAPE, bool)
    foreground[10:60, 50:90] = True
    for seed in range(20):
        out, mask = extend_anomaly(gray_image, *defect, np.random.default_rng(seed), foreground)
        assert mask.any()
        assert not (mask & ~foreground).any()
        assert np.array_equal(out[~mask], gray_image[~mask])
        assert (out[mask] != 120).any()


def test_paste_clips_to_a_foreground_too_small_for_the_defect(gray_image):
    crop = np.full((20, 20, 3), 255, np.uint8)
    crop_mask = np.ones((20, 20), bool)
    foreground = np.zeros(SHAPE, bool)
    foreground[30:35, 30:35] = True
    out, mask = paste_defect(gray_image, crop, crop_mask, np.random.default_rng(0), foreground)
    assert mask.any() and not (mask & ~foreground).any()
    assert (out[mask] == 255).all()


def test_extending_a_defect_with_an_empty_mask_is_refused(gray_image):
    with pytest.raises(ValueError, match="empty"):
        extend_anomaly(gray_image, gray_image, np.zeros(SHAPE, bool), np.random.default_rng(0))
