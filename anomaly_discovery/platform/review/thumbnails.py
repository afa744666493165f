"""Crops of defect regions with anomaly-map and mask overlays, as small JPEGs for the galleries (about a sixth
of a PNG's bytes, so 200 of them load in a browser quickly).

A region's mask is the file its ``mask_path`` names: the whole image's defect mask (``adisc detect`` writes
``images/<id>/mebin_mask.png``; another resolution is resized to the image's). Its anomaly map is
``anomaly_map.png`` beside that mask (the detect output's set-normalised map Ã, 0..255); a region without those
files is shown without that overlay.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from anomaly_discovery.data import load_image

OVERLAYS = ("map + mask", "anomaly map", "mask", "image")
MAP_FILE = "anomaly_map.png"
MAP_ALPHA = 0.45
MASK_COLOUR = (0, 255, 0)
BOX_COLOUR = (255, 220, 0)
JPEG_QUALITY = 85


def context_box(box: tuple[int, int, int, int], shape: tuple[int, ...], margin: float = 0.25,
                min_side: int = 32) -> tuple[int, int, int, int]:
    """The square around ``box``'s centre, its longer side plus ``margin`` of it on each side (at least
    ``min_side``), shifted and clipped to lie inside the image."""
    x0, y0, x1, y1 = box
    height, width = shape[:2]
    side = min(max(min_side, round(max(x1 - x0, y1 - y0) * (1 + 2 * margin))), width, height)
    left = min(max(0, (x0 + x1 - side) // 2), width - side)
    top = min(max(0, (y0 + y1 - side) // 2), height - side)
    return left, top, left + side, top + side


def overlay(image: np.ndarray, anomaly_map: np.ndarray | None = None, mask: np.ndarray | None = None
            ) -> np.ndarray:
    """RGB uint8 image with the anomaly map blended in (jet colours weighted by the map; a uint8 map is read as
    0..255, a float map as 0..1 unless it exceeds 1, then it is divided by its maximum for display) and the mask's
    outline drawn."""
    result = image.copy()
    if anomaly_map is not None:
        values = np.asarray(anomaly_map, np.float32)
        if np.asarray(anomaly_map).dtype == np.uint8:
            values = values / 255.0
        elif values.max(initial=0.0) > 1.0:
            values = values / values.max()
        colours = cv2.cvtColor(cv2.applyColorMap(np.uint8(np.clip(values, 0, 1) * 255), cv2.COLORMAP_JET),
                               cv2.COLOR_BGR2RGB).astype(np.float32)
        weight = (MAP_ALPHA * np.clip(values, 0, 1))[..., None]
        result = np.uint8(result * (1 - weight) + colours * weight)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(result, contours, -1, MASK_COLOUR, max(1, min(image.shape[:2]) // 96))
    return result


def _fit(array: np.ndarray, shape: tuple[int, int], interpolation: int) -> np.ndarray:
    if array.shape[:2] == shape:
        return array
    return cv2.resize(array, (shape[1], shape[0]), interpolation=interpolation)


def region_overlays(image_shape: tuple[int, ...], mask_path: str | None, view: tuple[int, int, int, int]
                    ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(anomaly map, mask) over ``view`` of the image, from the region's files (``None`` where absent)."""
    if not mask_path or not Path(mask_path).is_file():
        return None, None
    x0, y0, x1, y1 = view
    height, width = image_shape[:2]

    def cut(array: np.ndarray, interpolation: int) -> np.ndarray:
        return _fit(array, (height, width), interpolation)[y0:y1, x0:x1]

    mask = cut(load_image(mask_path, mode="L"), cv2.INTER_NEAREST) > 0
    map_path = Path(mask_path).with_name(MAP_FILE)
    anomaly_map = cut(load_image(map_path, mode="L"), cv2.INTER_LINEAR) if map_path.is_file() else None
    return anomaly_map, mask


def region_thumbnail(image_path: str, box: tuple[int, int, int, int], mask_path: str | None, mode: str,
                     size: int = 128) -> bytes:
    """JPEG of the region's square context crop at ``size`` × ``size`` px with the overlays ``mode`` asks for (one
    of :data:`OVERLAYS`) and a frame just outside the region's box (so the mask outline stays visible)."""
    if mode not in OVERLAYS:
        raise ValueError(f"overlay mode must be one of {OVERLAYS}, got {mode!r}")
    image = load_image(image_path)
    view = context_box(box, image.shape)
    x0, y0, x1, y1 = view
    anomaly_map, mask = region_overlays(image.shape, mask_path, view) if mode != "image" else (None, None)
    scale = size / (x1 - x0)
    shape = (size, size)
    crop = _fit(image[y0:y1, x0:x1], shape, cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    anomaly_map = _fit(anomaly_map, shape, cv2.INTER_LINEAR) if anomaly_map is not None and "map" in mode else None
    mask = _fit(mask.astype(np.uint8), shape, cv2.INTER_NEAREST) > 0 if mask is not None and "mask" in mode else None
    crop = overlay(crop, anomaly_map, mask)
    bx0, by0, bx1, by1 = (round((v - o) * scale) for v, o in zip(box, (x0, y0, x0, y0)))
    cv2.rectangle(crop, (bx0 - 1, by0 - 1), (bx1, by1), BOX_COLOUR, 1)
    encoded = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
    return encoded.tobytes()
