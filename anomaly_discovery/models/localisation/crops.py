"""Anomaly-centred square crops from a MEBin mask (AnomalyNCD, methods.md §1 step 2).

With L = max(H, W) of the image and, per external contour of the mask, its bounding box (x, y, w, h):

- centre (x + ⌊w/2⌋, y + ⌊h/2⌋); half-side
  r = min(max(⌊(1 + padding)/2 · max(w, h)⌋, ⌊min_size·L⌋), ⌊L/2⌋). With the paper's "padding 0.1, min crop
  size 0.1" this is r = min(max(⌊0.55·max(w,h)⌋, ⌊0.1·L⌋), ⌊0.5·L⌋):
  ``padding`` is the fraction added to the region's longer side (half on each side), ``min_size`` is the
  smallest half-side as a fraction of L (so the smallest crop side is 2·min_size·L); r ≥ 1 on tiny images;
- the square is shifted to lie inside the image (on a non-square image a square longer than the short side
  is clipped to it: the only case where a crop is not square);
- boxes whose gap is < ⌊merge_distance·L⌋ are merged (the paper's "merge distance 0.01"); overlapping boxes
  always merge. The gap is the reference's: the distance between the closest edges, Euclidean between
  corners for diagonal neighbours. The union is squared about its centre and put back inside the image;
  merging repeats until no pair qualifies;
- boxes are sorted by area, largest first; if there are more than δ̄ of them, δ̄ + 1 are kept. The "+ 1" is
  the reference code's off-by-one (``boxes[:n + 1]`` after ``len(boxes) > n``), kept so results match it;
- an empty mask gives one crop: the whole image.

Each crop carries the image crop, the mask crop, its score max(Ã within the crop)/255 and its area (the
number of mask pixels inside it).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from .mebin import MAX_LEVEL, MEBinResult

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class CropConfig:
    """The paper's cropping settings: padding 0.1, min crop size 0.1, merge distance 0.01 (see module doc)."""

    padding: float = 0.1
    min_size: float = 0.1
    merge_distance: float = 0.01

    def __post_init__(self) -> None:
        if not self.padding >= 0:
            raise ValueError(f"CropConfig.padding must be ≥ 0, got {self.padding!r}")
        if not 0 <= self.min_size <= 0.5:
            raise ValueError(f"CropConfig.min_size must be in [0, 0.5], got {self.min_size!r}")
        if not self.merge_distance >= 0:
            raise ValueError(f"CropConfig.merge_distance must be ≥ 0, got {self.merge_distance!r}")


@dataclass
class Crop:
    """``box`` = (x0, y0, x1, y1), end-exclusive, in image pixels."""

    box: Box
    image: np.ndarray
    mask: np.ndarray
    score: float
    area: int


def region_rectangles(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) bounding boxes of the mask's external contours, smallest area first."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rectangles = [tuple(int(v) for v in cv2.boundingRect(contour)) for contour in contours]
    return sorted(rectangles, key=lambda rect: (rect[2] * rect[3], rect))


def _place(start: int, side: int, limit: int) -> tuple[int, int]:
    """Shift the interval [start, start + side) inside [0, limit); clip it to [0, limit) if longer."""
    if side >= limit:
        return 0, limit
    start = min(max(start, 0), limit - side)
    return start, start + side


def square_box(centre_x: int, centre_y: int, half_side: int, shape: tuple[int, int]) -> Box:
    """The square of side 2·half_side about the centre, shifted inside an image of shape (H, W)."""
    height, width = shape
    x0, x1 = _place(centre_x - half_side, 2 * half_side, width)
    y0, y1 = _place(centre_y - half_side, 2 * half_side, height)
    return x0, y0, x1, y1


def region_box(rectangle: tuple[int, int, int, int], shape: tuple[int, int], config: CropConfig) -> Box:
    """The padded square crop box of one region (x, y, w, h) in an image of shape (H, W)."""
    x, y, w, h = rectangle
    longest = max(shape)
    half_side = max(int(max(w, h) * (1 + config.padding) * 0.5), int(longest * config.min_size))
    half_side = max(min(half_side, int(longest * 0.5)), 1)
    return square_box(x + w // 2, y + h // 2, half_side, shape)


def box_gap(a: Box, b: Box) -> float:
    """Distance between two boxes' closest edges; −1 when they overlap (share interior)."""
    gap_x = max(a[0], b[0]) - min(a[2], b[2])
    gap_y = max(a[1], b[1]) - min(a[3], b[3])
    if gap_x < 0 and gap_y < 0:
        return -1.0
    return math.hypot(max(gap_x, 0), max(gap_y, 0))


def squared_union(a: Box, b: Box, shape: tuple[int, int]) -> Box:
    """The union of two boxes, widened about its centre to a square, inside an image of shape (H, W)."""
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[2], b[2]), max(a[3], b[3])
    side = max(x1 - x0, y1 - y0)
    height, width = shape
    new_x0, new_x1 = _place(x0 - (side - (x1 - x0)) // 2, side, width)
    new_y0, new_y1 = _place(y0 - (side - (y1 - y0)) // 2, side, height)
    return new_x0, new_y0, new_x1, new_y1


def _first_close_pair(boxes: list[Box], limit: int) -> tuple[int, int] | None:
    for i, j in itertools.combinations(range(len(boxes)), 2):
        if box_gap(boxes[i], boxes[j]) < limit:
            return i, j
    return None


def merge_boxes(boxes: list[Box], shape: tuple[int, int], merge_distance: float) -> list[Box]:
    """Merge pairs whose gap is < ⌊merge_distance·max(H, W)⌋ (overlaps always: gap −1) until none is left."""
    limit = int(max(shape) * merge_distance)
    merged = list(boxes)
    while (pair := _first_close_pair(merged, limit)) is not None:
        i, j = pair
        merged[i] = squared_union(merged[i], merged.pop(j), shape)
    return merged


def box_area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def crop_boxes(mask: np.ndarray, n_regions: int, config: CropConfig = CropConfig()) -> list[Box]:
    """All of step 2's boxes for a mask at image size: largest first, at most δ̄ + 1 when more than δ̄."""
    shape = mask.shape[:2]
    rectangles = region_rectangles(mask)
    if not rectangles:
        return [(0, 0, shape[1], shape[0])]
    boxes = merge_boxes([region_box(rect, shape, config) for rect in rectangles], shape, config.merge_distance)
    boxes = sorted(boxes, key=box_area, reverse=True)
    if len(boxes) > n_regions:
        boxes = boxes[: n_regions + 1]
    return boxes


def anomaly_crops(image: np.ndarray, mebin_result: MEBinResult, config: CropConfig = CropConfig()) -> list[Crop]:
    """Crops of ``image`` (H×W or H×W×C) around the regions of a MEBin result, with scores and mask crops.

    A mask of another size than the image is resized with nearest neighbour, Ã bilinearly.
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or min(image.shape[:2]) == 0:
        shape = image.shape if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"anomaly_crops expects an H×W or H×W×C image, got {shape}")
    height, width = image.shape[:2]
    mask = mebin_result.mask
    normalised = mebin_result.normalised_map
    if mask.shape != (height, width):
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    if normalised.shape != (height, width):
        normalised = cv2.resize(normalised, (width, height), interpolation=cv2.INTER_LINEAR)
    crops = []
    for box in crop_boxes(mask, mebin_result.n_regions, config):
        x0, y0, x1, y1 = box
        mask_crop = mask[y0:y1, x0:x1].copy()
        score = float(normalised[y0:y1, x0:x1].max()) / MAX_LEVEL
        crops.append(Crop(box, image[y0:y1, x0:x1].copy(), mask_crop, score, int(mask_crop.sum())))
    return crops
