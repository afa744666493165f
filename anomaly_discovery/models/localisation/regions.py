"""Region records: the crops discovery trains on, each with its anomaly-map and object-mask crops aligned.

A :class:`Region` is one square crop of an image (methods.md §1 step 2) together with the crop of the
anomaly map (floats in [0, 1]) and of the object prior (bool), all three the same H×W, plus what merging
and pseudo-label correction need: the crop's score s (max of Ã in the crop / 255), its area a (mask pixels in
the crop) and the source image's size.

* Novel regions come from detection: ``novel_regions`` turns an image's MEBin crops into regions, the map crop
  being the set-normalised Ã/255 so every region of a data set shares one scale.
* Base regions come from a labelled set (methods.md §1 step 3): around ground-truth boxes
  (``base_regions_from_boxes``, NEU-DET) or ground-truth masks (``base_regions_from_mask``, the generator),
  squared and padded like the anomaly crops, at most two per image, largest first (as AnomalyNCD does).

``regions_to_tensors`` resizes a list of regions to the network's square input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from anomaly_discovery.data.sample import Box as LabelledBox
from .crops import Crop, CropConfig, box_area, crop_boxes, region_box
from anomaly_discovery.data.images import as_rgb
from .mebin import MAX_LEVEL

Box = tuple[int, int, int, int]
MAX_BASE_CROPS_PER_IMAGE = 2


@dataclass
class Region:
    """One crop. ``image`` uint8 H×W×3, ``anomaly_map`` float32 H×W in [0, 1], ``object_mask`` bool H×W;
    ``box`` = (x0, y0, x1, y1) in the source image of size ``image_size`` = (H, W); ``class_name`` is the
    known (base) class, ``None`` for a novel region to discover."""

    image_id: str
    image: np.ndarray
    anomaly_map: np.ndarray
    object_mask: np.ndarray
    box: Box
    score: float
    area: int
    image_size: tuple[int, int]
    class_name: str | None = None

    @property
    def is_base(self) -> bool:
        return self.class_name is not None


def _check_box(box: Sequence[int], shape: tuple[int, int], what: str) -> Box:
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = shape
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"{what}: box {tuple(box)} does not lie inside the image of size {height}×{width}")
    return x0, y0, x1, y1


def _same_size(array: np.ndarray, shape: tuple[int, int], interpolation: int) -> np.ndarray:
    if array.shape[:2] == shape:
        return array
    return cv2.resize(array, (shape[1], shape[0]), interpolation=interpolation)


def crop_region(image: np.ndarray, box: Sequence[int], anomaly_map: np.ndarray, object_mask: np.ndarray | None,
                image_id: str, score: float | None = None, area: int | None = None,
                class_name: str | None = None) -> Region:
    """Crop ``image``, ``anomaly_map`` (float in [0, 1], resized bilinearly to the image when its size differs)
    and ``object_mask`` (``None`` = everything is object) to ``box``. ``score`` defaults to the map crop's
    maximum and ``area`` to its pixels ≥ 0.5."""
    image = as_rgb(np.asarray(image))
    shape = image.shape[:2]
    x0, y0, x1, y1 = _check_box(box, shape, f"region of {image_id}")
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly map of {image_id} must be 2-D, got shape {values.shape}")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(f"anomaly map of {image_id} must lie in [0, 1], got [{values.min():.3g}, {values.max():.3g}]")
    values = _same_size(values, shape, cv2.INTER_LINEAR)
    objects = (np.ones(shape, bool) if object_mask is None
               else _same_size(np.asarray(object_mask).astype(np.uint8), shape, cv2.INTER_NEAREST).astype(bool))
    map_crop = np.ascontiguousarray(values[y0:y1, x0:x1])
    return Region(image_id=image_id, image=np.ascontiguousarray(image[y0:y1, x0:x1]), anomaly_map=map_crop,
                  object_mask=np.ascontiguousarray(objects[y0:y1, x0:x1]), box=(x0, y0, x1, y1),
                  score=float(map_crop.max()) if score is None else float(score),
                  area=int((map_crop >= 0.5).sum()) if area is None else int(area),
                  image_size=(int(shape[0]), int(shape[1])), class_name=class_name)


def novel_regions(image_id: str, image: np.ndarray, crops: Sequence[Crop], normalised_map: np.ndarray,
                  object_mask: np.ndarray | None) -> list[Region]:
    """One region per MEBin crop; the map crop is the set-normalised Ã (uint8) / 255, score and area the crop's."""
    values = np.asarray(normalised_map, dtype=np.float32) / MAX_LEVEL
    return [crop_region(image, crop.box, values, object_mask, image_id, crop.score, crop.area) for crop in crops]


def _largest(boxes: list[Box], limit: int) -> list[Box]:
    return sorted(boxes, key=box_area, reverse=True)[:limit]


def base_regions_from_boxes(image: np.ndarray, boxes: Sequence[LabelledBox], image_id: str,
                            max_per_image: int = MAX_BASE_CROPS_PER_IMAGE,
                            config: CropConfig = CropConfig()) -> list[Region]:
    """Known-class regions around labelled boxes (NEU-DET): each box is squared and padded like an anomaly
    crop, the largest ``max_per_image`` are kept, and the box itself is the region's anomaly map."""
    image = as_rgb(np.asarray(image))
    shape = image.shape[:2]
    chosen = sorted(boxes, key=lambda b: b.area, reverse=True)[:max_per_image]
    regions = []
    for labelled in chosen:
        x0, y0, x1, y1 = _check_box((labelled.x0, labelled.y0, labelled.x1, labelled.y1), shape,
                                    f"labelled box of {image_id}")
        box_map = np.zeros(shape, np.float32)
        box_map[y0:y1, x0:x1] = 1.0
        square = region_box((x0, y0, x1 - x0, y1 - y0), shape, config)
        regions.append(crop_region(image, square, box_map, None, image_id, 1.0, None, labelled.label))
    return regions


def base_regions_from_mask(image: np.ndarray, mask: np.ndarray, class_name: str, image_id: str,
                           object_mask: np.ndarray | None = None, max_per_image: int = MAX_BASE_CROPS_PER_IMAGE,
                           config: CropConfig = CropConfig()) -> list[Region]:
    """Known-class regions around a ground-truth mask: the anomaly crops of the mask (padded squares, close
    boxes merged), the largest ``max_per_image`` kept; the mask is the region's anomaly map."""
    image = as_rgb(np.asarray(image))
    shape = image.shape[:2]
    binary = _same_size(np.asarray(mask).astype(np.uint8), shape, cv2.INTER_NEAREST) > 0
    if not binary.any():
        raise ValueError(f"the ground-truth mask of {image_id} is empty: no region to crop")
    boxes = _largest(crop_boxes(binary, n_regions=binary.size, config=config), max_per_image)
    values = binary.astype(np.float32)
    return [crop_region(image, box, values, object_mask, image_id, 1.0, None, class_name) for box in boxes]


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    shrink = array.shape[0] > size or array.shape[1] > size
    return cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def regions_to_tensors(regions: Sequence[Region], size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Regions resized to ``size``×``size``, as uint8 tensors: images N×3×S×S, anomaly maps N×1×S×S (×255),
    object masks N×1×S×S (object coverage ×255, so a resized edge keeps its fraction)."""
    if not regions:
        raise ValueError("regions_to_tensors: no regions")
    images = np.stack([_resize(r.image, size) for r in regions]).transpose(0, 3, 1, 2)
    maps = np.stack([_resize(r.anomaly_map.astype(np.float32), size) for r in regions])
    masks = np.stack([_resize(r.object_mask.astype(np.float32), size) for r in regions])

    def to_uint8(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.clip(np.rint(values * MAX_LEVEL), 0, MAX_LEVEL).astype(np.uint8))[:, None]

    return torch.from_numpy(np.ascontiguousarray(images)), to_uint8(maps), to_uint8(masks)
