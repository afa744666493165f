import cv2
import numpy as np
import pytest

from anomaly_discovery.models.localisation.mebin import (MEBinConfig, mebin, normalise_jointly, normalise_to_range,
                                                         raw_threshold, select_stable_run)

SIZE = 128


def gaussian_blobs(centres, sigma=6.0, amplitude=1.0, size=SIZE, noise=0.0, seed=0):
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    out = np.zeros((size, size))
    for cx, cy in centres:
        out += amplitude * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return out + noise * np.random.default_rng(seed).random((size, size))


def reference_mebin(maps, sample_rate=4, min_interval_len=4, kernel_size=6):
    """The literal algorithm: float Ã, binary erosion at every threshold, the reference's run selection."""
    kernel = np.ones((kernel_size, kernel_size), np.uint8)
    peaks = [int(m.max()) for m in maps]
    s_max, s_min = max(peaks), min(peaks)
    results = []
    for anomaly_map in maps:
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.where(anomaly_map < s_min, 0, (anomaly_map.astype(np.float64) - s_min) / (s_max - s_min) * 255)
        counts = []
        for score in range(255, 0, -sample_rate):
            binary = cv2.erode(np.where(norm > score, 255, 0).astype(np.uint8), kernel, iterations=1)
            counts.append(cv2.connectedComponents(binary, connectivity=8)[0] - 1)
        runs = {}
        index = 0
        while index < len(counts):
            end = index
            while end + 1 < len(counts) and counts[end + 1] == counts[index]:
                end += 1
            if counts[index] != 0 and end - index + 1 >= min_interval_len:
                runs.setdefault(counts[index], []).append((index, end))
            index = end + 1
        if runs:
            best = max(runs, key=lambda c: max(e - s for s, e in runs[c]))
            end = sorted(runs[best], key=lambda r: r[1] - r[0])[-1][1]
            threshold = int((255 - end * sample_rate) * (s_max - s_min) / 255 + s_min)
        else:
            threshold, best = 255, 0
        mask = cv2.erode(np.where(anomaly_map > threshold, 255, 0).astype(np.uint8), kernel, iterations=1) > 0
        results.append((counts, threshold, best, mask))
    return results


@pytest.fixture
def blob_set():
    """Maps with 1, 2, 3 and 4 equal blobs, and a faint normal map that sets the bottom of the search range."""
    layouts = [
        [(64, 64)],
        [(30, 30), (95, 95)],
        [(25, 25), (100, 30), (60, 100)],
        [(25, 25), (100, 25), (25, 100), (100, 100)],
    ]
    amplitudes = (1.0, 0.9, 0.8, 0.95)
    maps = [gaussian_blobs(c, amplitude=a, noise=0.02, seed=i) for i, (c, a) in enumerate(zip(layouts, amplitudes))]
    maps.append(gaussian_blobs([(64, 64)], amplitude=0.25, sigma=20, noise=0.02, seed=9))
    return normalise_jointly(maps), [1, 2, 3, 4]


def test_mebin_finds_the_number_of_gaussian_blobs(blob_set):
    maps, expected = blob_set
    results = mebin(maps)
    assert [r.n_regions for r in results[:4]] == expected
    for result, n_blobs in zip(results, expected):
        assert cv2.connectedComponents(result.mask.view(np.uint8), connectivity=8)[0] - 1 == n_blobs


def test_mebin_matches_the_literal_per_threshold_algorithm():
    rng = np.random.default_rng(3)
    found = []
    for trial in range(8):
        maps = []
        for index in range(5):
            centres = [tuple(rng.integers(10, SIZE - 10, 2)) for _ in range(rng.integers(0, 5))]
            maps.append(gaussian_blobs(centres, sigma=rng.uniform(3, 10), amplitude=rng.uniform(0.3, 1),
                                       noise=rng.uniform(0.05, 0.4), seed=trial * 10 + index))
        maps = normalise_jointly(maps)
        for ours, (counts, threshold, n_regions, mask) in zip(mebin(maps), reference_mebin(maps)):
            assert list(ours.component_counts) == counts
            assert (ours.threshold, ours.n_regions) == (threshold, n_regions)
            assert np.array_equal(ours.mask, mask)
            found.append(n_regions)
    assert 0 in found and len(set(found)) >= 3


def test_grayscale_erosion_then_threshold_equals_binary_erosion_at_every_threshold():
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (96, 80), dtype=np.uint8), (7, 7), 2)
    kernel = np.ones((6, 6), np.uint8)
    eroded = cv2.erode(image, kernel)
    for threshold in range(256):
        literal = cv2.erode((image > threshold).astype(np.uint8) * 255, kernel, iterations=1) > 0
        assert np.array_equal(eroded > threshold, literal), threshold


def test_uint8_normalised_map_thresholds_like_the_float_formula():
    anomaly_map = np.minimum(np.arange(256), 211).astype(np.uint8).reshape(16, 16)
    s_min, s_max = 37, 211
    ours = normalise_to_range(anomaly_map, s_min, s_max)
    exact = np.where(anomaly_map < s_min, 0, (anomaly_map.astype(np.float64) - s_min) / (s_max - s_min) * 255)
    for threshold in range(256):
        assert np.array_equal(ours > threshold, exact > threshold)


def test_set_level_normalisation_leaves_the_flat_image_empty():
    strong = gaussian_blobs([(64, 64)], amplitude=1.0, noise=0.01, seed=1)
    flat = 0.05 + gaussian_blobs([], noise=0.01, seed=2)
    strong_result, flat_result = mebin(normalise_jointly([strong, flat]))
    assert strong_result.n_regions == 1 and strong_result.mask.any()
    assert flat_result.n_regions == 0 and not flat_result.mask.any()
    assert flat_result.threshold == 255


def test_normalise_jointly_uses_one_range_for_the_whole_set():
    low, high = np.full((4, 4), 1.0), np.full((4, 4), 3.0)
    low[0, 0], high[0, 0] = 0.0, 5.0
    out_low, out_high = normalise_jointly([low, high])
    assert out_low.dtype == np.uint8 and out_low[0, 0] == 0 and out_high[0, 0] == 255
    assert out_low[1, 1] == 51 and out_high[1, 1] == 153


def test_constant_maps_give_empty_masks_without_warnings():
    maps = normalise_jointly([np.full((32, 32), 0.7), np.full((32, 32), 0.7)])
    with np.errstate(all="raise"):
        results = mebin(maps)
    for result in results:
        assert not result.mask.any() and result.n_regions == 0 and result.threshold == 255
        assert not result.normalised_map.any()


def test_a_set_whose_peaks_are_all_equal_has_no_search_range():
    maps = normalise_jointly([gaussian_blobs([(64, 64)])])
    (result,) = mebin(maps)
    assert result.n_regions == 0 and not result.mask.any()


def test_longest_run_wins_and_its_lowest_threshold_is_taken():
    counts = [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 0]
    assert select_stable_run(counts, 4) == (10, 2)


def test_tie_between_counts_goes_to_the_count_seen_first_from_the_high_end():
    counts = [3, 3, 3, 3, 3, 1, 1, 1, 1, 1]
    assert select_stable_run(counts, 4) == (4, 3)


def test_tie_within_a_count_takes_the_later_run_like_the_reference():
    counts = [2, 2, 2, 2, 5, 2, 2, 2, 2, 0]
    assert select_stable_run(counts, 4) == (8, 2)


def test_runs_shorter_than_min_interval_len_and_zero_runs_are_not_stable():
    assert select_stable_run([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2], 4) is None


def test_threshold_is_mapped_back_to_the_raw_scale():
    assert raw_threshold(243, 40, 240) == int(243 * 200 / 255 + 40)


def test_mebin_refuses_maps_that_are_not_2d_uint8():
    with pytest.raises(ValueError, match="map 1: .*uint8"):
        mebin([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32)])


def test_normalise_jointly_refuses_nan_naming_the_map():
    bad = np.zeros((8, 8))
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="map 1: contains NaN"):
        normalise_jointly([np.zeros((8, 8)), bad])


def test_config_refuses_a_sweep_below_zero():
    with pytest.raises(ValueError, match="sample_rate=8"):
        MEBinConfig(sample_rate=8, n_thresholds=64)
