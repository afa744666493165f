"""From anomaly maps to regions (methods.md §1 steps 0–2 and §2 step 1), one way for a set and for a served image.

* :func:`localise_set`: a data set's maps normalised jointly (step 0), MEBin's stability sweep over the set
  (step 1), each image's object mask from the object prior, and its anomaly-centred crops (step 2). The detect
  job uses it.
* :func:`localise_image`: one image on its own, binarised like the set it was fitted on (:class:`Localisation`:
  the set's joint map range and typical MEBin threshold, since MEBin's sweep needs a whole set), then the same
  object prior and crops. The serving predictor uses it.
* :func:`image_regions`: the discovery regions of a localised image (crops of image, normalised map and object
  mask), the same for both paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from .crops import Crop, CropConfig, anomaly_crops
from .mebin import (MAX_LEVEL, MEBinConfig, MEBinResult, erosion_kernel, mebin, normalise_jointly, normalise_to_range,
                    search_range)
from .priors.base import ObjectPrior
from .regions import Region, novel_regions


@dataclass
class LocalisedImage:
    """One image's binarisation (MEBin result, with the set-normalised map), object mask and crops."""

    mebin: MEBinResult
    object_mask: np.ndarray
    crops: list[Crop]


@dataclass(frozen=True)
class Localisation:
    """How one image is binarised like a set: raw map values ``low``..``high`` (the set's joint min-max, step 0)
    scale to 0..255, pixels above ``threshold`` on that scale are defect, then MEBin's ``erosion``×``erosion``
    erosion. ``s_min``..``s_max`` is the set's MEBin search range: the map the crops carry is rescaled to it, as
    ``mebin`` rescales each map of the set (a folder saved before these fields keeps the whole scale)."""

    low: float
    high: float
    threshold: int
    erosion: int = 6
    s_min: int = 0
    s_max: int = MAX_LEVEL

    def __post_init__(self) -> None:
        if not self.high > self.low or not 0 <= self.threshold < MAX_LEVEL or self.erosion < 1:
            raise ValueError(f"Localisation needs high > low, threshold in [0, 255) and erosion >= 1, got {self}")

    def scale(self, anomaly_map: np.ndarray) -> np.ndarray:
        values = (np.asarray(anomaly_map, np.float32) - self.low) * (MAX_LEVEL / (self.high - self.low))
        return np.clip(np.rint(values), 0, MAX_LEVEL).astype(np.uint8)

    def binarise(self, anomaly_map: np.ndarray) -> MEBinResult:
        """The MEBin result this image would have at the set's threshold."""
        scaled = self.scale(anomaly_map)
        mask = cv2.erode((scaled > self.threshold).astype(np.uint8), erosion_kernel(self.erosion))
        n_regions = cv2.connectedComponents(mask)[0] - 1
        return MEBinResult(mask.astype(bool), self.threshold, n_regions,
                           normalise_to_range(scaled, self.s_min, self.s_max), np.zeros(0, np.int64))


def fit_localisation(raw_maps: Sequence[np.ndarray], thresholds: Sequence[int], erosion: int = 6) -> Localisation:
    """A set's joint map range, its MEBin search range and the median MEBin threshold of its images (those that
    had regions)."""
    if not len(raw_maps) or not len(thresholds):
        raise ValueError("fit_localisation needs the set's raw maps and at least one MEBin threshold")
    low = min(float(np.min(m)) for m in raw_maps)
    high = max(float(np.max(m)) for m in raw_maps)
    s_min, s_max = search_range(normalise_jointly(list(raw_maps)))
    return Localisation(low, high, int(np.median(thresholds)), erosion, s_min, s_max)


def localise_set(images: Iterable[np.ndarray], maps: Sequence[np.ndarray], prior: ObjectPrior,
                 crop_config: CropConfig = CropConfig(), mebin_config: MEBinConfig = MEBinConfig(),
                 progress: bool = False) -> list[LocalisedImage]:
    """MEBin over the whole set (joint normalisation), then per image its object mask and crops. ``images`` is
    read one at a time in the order of ``maps`` (a generator that loads them keeps memory flat)."""
    binarised = mebin(normalise_jointly(list(maps)), mebin_config, progress=progress)
    results = []
    for image, result in tqdm(zip(images, binarised), total=len(binarised), desc="cropping", disable=not progress):
        results.append(LocalisedImage(result, prior.masks([image])[0], anomaly_crops(image, result, crop_config)))
    return results


def localise_image(image: np.ndarray, anomaly_map: np.ndarray, localisation: Localisation, prior: ObjectPrior,
                   crop_config: CropConfig = CropConfig()) -> LocalisedImage:
    """One image binarised at the set's level, with its object mask and crops."""
    result = localisation.binarise(anomaly_map)
    return LocalisedImage(result, prior.masks([image])[0], anomaly_crops(image, result, crop_config))


def image_regions(image_id: str, image: np.ndarray, localised: LocalisedImage) -> list[Region]:
    """The novel discovery regions of a localised image."""
    return novel_regions(image_id, image, localised.crops, localised.mebin.normalised_map, localised.object_mask)
