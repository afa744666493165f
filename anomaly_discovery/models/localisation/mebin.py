"""MEBin: main-element binarisation of anomaly maps (AnomalyNCD, methods.md §1 steps 0–1). Written here because no
library offers it on its own (it lives inside AnomalyNCD's and anomalib's code); OpenCV does the erosion and the
counting.

Step 0, :func:`normalise_jointly`: one min-max over the whole map set of a category, to uint8.

Step 1, :func:`mebin`, per image A (uint8):

- search range from the per-image peaks: s_max = max_i max(A_i), s_min = min_i max(A_i);
- Ã = 0 where A < s_min, else 255·(A − s_min)/(s_max − s_min);
- sweep ε_j = 255 − sample_rate·j, j = 0..n_thresholds−1; δ_j = number of 8-connected components of
  erode_{k×k}(Ã > ε_j), background excluded;
- stable interval: a maximal run of constant δ ≠ 0 of length ≥ min_interval_len; δ̄ is the count whose
  longest run is longest, ties going to the count first seen from the high-threshold end; within that count
  the longest run (equal lengths: the later one, as the reference code's stable sort does); b* = the run's
  last index, ε* = ε_{b*};
- t = int(ε*·(s_max − s_min)/255 + s_min) on the raw scale and M = erode(A > t);
- no stable run: t = 255, δ̄ = 0, M empty (downstream the whole image becomes one crop).

Implementation notes (results identical to the literal per-threshold loop, checked in the tests):

- Ã is stored as uint8 rounded *up*, ⌈255·(A − s_min)/(s_max − s_min)⌉, in exact integer arithmetic. For an
  integer ε, ⌈x⌉ > ε ⇔ x > ε, so thresholding the uint8 Ã gives the reference's float comparisons exactly.
- Erosion by a flat structuring element commutes with thresholding, erode(Ã > ε) = (erode(Ã) > ε), so Ã is
  eroded once (a grayscale min filter) and each ε is a comparison. Components are counted only where the
  binary image changes: the thresholds decrease, so equal pixel counts above two thresholds mean equal sets.
- When all peaks are equal (one image, or constant maps) there is no search range. The reference code then
  divides 0 by 0, every comparison with NaN is false and every mask is empty; here Ã = 0 and the outcome is
  the same, without the division.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

MAX_LEVEL = 255


@dataclass(frozen=True)
class MEBinConfig:
    """Sweep and stability settings; the defaults are the paper's (64 thresholds of step 4, 6×6 erosion)."""

    sample_rate: int = 4
    n_thresholds: int = 64
    erosion_size: int = 6
    min_interval_len: int = 4

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_thresholds", "erosion_size", "min_interval_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"MEBinConfig.{name} must be a positive integer, got {value!r}")
        lowest = MAX_LEVEL - self.sample_rate * (self.n_thresholds - 1)
        if lowest < 0:
            raise ValueError(
                f"MEBinConfig sweeps below 0: sample_rate={self.sample_rate} × "
                f"(n_thresholds={self.n_thresholds} − 1) exceeds {MAX_LEVEL}"
            )

    @property
    def thresholds(self) -> np.ndarray:
        """ε_j = 255 − sample_rate·j, from high to low."""
        return MAX_LEVEL - self.sample_rate * np.arange(self.n_thresholds)


@dataclass
class MEBinResult:
    """One image's binarisation.

    ``mask``: bool, the map's size. ``threshold``: t on the raw uint8 scale (255 when no stable run).
    ``n_regions``: δ̄ (0 when no stable run). ``normalised_map``: Ã as uint8 (used for crop scores).
    ``component_counts``: δ_j for every sweep threshold, high to low.
    """

    mask: np.ndarray
    threshold: int
    n_regions: int
    normalised_map: np.ndarray
    component_counts: np.ndarray


def normalise_jointly(maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Step 0: one min-max over the whole set (not per image) to uint8, rounded to nearest.

    A set whose values are all equal maps to zeros. NaN/inf and non-2-D maps are refused by index.
    """
    if len(maps) == 0:
        raise ValueError("normalise_jointly needs at least one map, got an empty sequence")
    arrays = [_checked_map(anomaly_map, index) for index, anomaly_map in enumerate(maps)]
    low = min(float(array.min()) for array in arrays)
    high = max(float(array.max()) for array in arrays)
    if high == low:
        return [np.zeros(array.shape, dtype=np.uint8) for array in arrays]
    scale = MAX_LEVEL / (high - low)
    return [np.clip(np.rint((array - low) * scale), 0, MAX_LEVEL).astype(np.uint8) for array in arrays]


def search_range(maps: Sequence[np.ndarray]) -> tuple[int, int]:
    """(s_min, s_max): the smallest and the largest per-image peak of the set."""
    peaks = [int(anomaly_map.max()) for anomaly_map in maps]
    return min(peaks), max(peaks)


def normalise_to_range(anomaly_map: np.ndarray, s_min: int, s_max: int) -> np.ndarray:
    """Ã = ⌈255·(A − s_min)/(s_max − s_min)⌉ where A ≥ s_min, else 0, as uint8; all zeros if s_max = s_min."""
    span = s_max - s_min
    if span <= 0:
        return np.zeros(anomaly_map.shape, dtype=np.uint8)
    shifted = anomaly_map.astype(np.int32) - s_min
    scaled = (MAX_LEVEL * shifted + span - 1) // span
    return np.where(shifted < 0, 0, np.minimum(scaled, MAX_LEVEL)).astype(np.uint8)


def erosion_kernel(size: int) -> np.ndarray:
    return np.ones((size, size), dtype=np.uint8)


def sweep_component_counts(eroded_map: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """δ_j = 8-connected components of (eroded Ã > ε_j), background excluded, for decreasing ε_j."""
    histogram = np.bincount(eroded_map.ravel(), minlength=MAX_LEVEL + 1)
    pixels_above = np.concatenate([np.cumsum(histogram[::-1])[::-1][1:], [0]])
    counts = np.zeros(len(thresholds), dtype=np.int64)
    previous_above, previous_count = 0, 0
    for index, threshold in enumerate(thresholds):
        above = int(pixels_above[threshold])
        if above == 0:
            continue
        if above != previous_above:
            binary = (eroded_map > threshold).view(np.uint8)
            n_labels, _ = cv2.connectedComponents(binary, connectivity=8)
            previous_above, previous_count = above, n_labels - 1
        counts[index] = previous_count
    return counts


def select_stable_run(counts: Sequence[int], min_interval_len: int) -> tuple[int, int] | None:
    """(b*, δ̄): the chosen stable run's last index and its count; None when there is no stable run."""
    longest: dict[int, tuple[int, int]] = {}
    start, n_counts = 0, len(counts)
    while start < n_counts:
        end = start
        while end + 1 < n_counts and counts[end + 1] == counts[start]:
            end += 1
        value, length = int(counts[start]), end - start + 1
        if value != 0 and length >= min_interval_len and length >= longest.get(value, (0, 0))[0]:
            longest[value] = (length, end)
        start = end + 1
    if not longest:
        return None
    best_count = max(longest, key=lambda count: longest[count][0])
    return longest[best_count][1], best_count


def raw_threshold(normalised_threshold: int, s_min: int, s_max: int) -> int:
    """t = int(ε*·(s_max − s_min)/255 + s_min)."""
    return int(normalised_threshold * (s_max - s_min) / MAX_LEVEL + s_min)


def mebin(
    maps_uint8: Sequence[np.ndarray], config: MEBinConfig = MEBinConfig(), progress: bool = False
) -> list[MEBinResult]:
    """Step 1 on a jointly normalised set of uint8 maps (one category); returns one result per map."""
    _check_uint8_maps(maps_uint8)
    s_min, s_max = search_range(maps_uint8)
    thresholds = config.thresholds
    kernel = erosion_kernel(config.erosion_size)
    results = []
    for anomaly_map in tqdm(maps_uint8, desc="MEBin", disable=not progress):
        normalised = normalise_to_range(anomaly_map, s_min, s_max)
        counts = sweep_component_counts(cv2.erode(normalised, kernel), thresholds)
        run = select_stable_run(counts, config.min_interval_len)
        if run is None:
            threshold, n_regions = MAX_LEVEL, 0
        else:
            last_index, n_regions = run
            threshold = raw_threshold(int(thresholds[last_index]), s_min, s_max)
        mask = cv2.erode((anomaly_map > threshold).view(np.uint8), kernel).astype(bool)
        results.append(MEBinResult(mask, threshold, n_regions, normalised, counts))
    return results


def _check_uint8_maps(maps: Sequence[np.ndarray]) -> None:
    if len(maps) == 0:
        raise ValueError("mebin needs at least one map, got an empty sequence")
    for index, anomaly_map in enumerate(maps):
        if not isinstance(anomaly_map, np.ndarray):
            raise ValueError(f"map {index}: mebin expects a 2-D uint8 array, got {type(anomaly_map).__name__}")
        if anomaly_map.dtype != np.uint8 or anomaly_map.ndim != 2:
            raise ValueError(
                f"map {index}: mebin expects a 2-D uint8 array (see normalise_jointly), "
                f"got {anomaly_map.dtype} of shape {anomaly_map.shape}"
            )


def _checked_map(anomaly_map: np.ndarray, index: int) -> np.ndarray:
    array = np.asarray(anomaly_map)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"map {index}: expected a non-empty 2-D anomaly map, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"map {index}: expected numeric values, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"map {index}: contains NaN or infinite values")
    return array
