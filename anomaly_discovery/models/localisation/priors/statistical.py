"""The offline object prior (methods.md §2, step 1, without weights): the product told from the background by
colour statistics of the image border, hysteresis, GrabCut and hole filling; a full-frame texture keeps the
whole image."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from .base import ObjectMask, check_images, full_frame

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatisticalPriorConfig:
    """Settings of :class:`StatisticalObjectPrior` (sizes are fractions of the working image's side)."""

    working_size: int = 256
    smoothing: float = 0.005
    border_width: float = 0.04
    z_threshold: float = 3.0
    min_scale: float = 2.0
    texture_centre_fraction: float = 0.25
    max_reference_images: int = 32
    grabcut_iterations: int = 3
    morphology_size: float = 0.02
    min_component_fraction: float = 0.2

    def __post_init__(self):
        if self.working_size < 16:
            raise ValueError(f"working_size must be ≥ 16 px, got {self.working_size}")
        for name in ("smoothing", "border_width", "texture_centre_fraction", "morphology_size",
                     "min_component_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
        if self.z_threshold <= 0 or self.min_scale <= 0:
            raise ValueError(f"z_threshold and min_scale must be > 0, got {self.z_threshold}, {self.min_scale}")


def working_image(image: np.ndarray, size: int, smoothing: float) -> np.ndarray:
    """Float32 H'×W'×C copy with its long side at most ``size``, Gaussian-smoothed by ``smoothing``·side."""
    height, width = image.shape[:2]
    scale = min(1.0, size / max(height, width))
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=cv2.INTER_AREA)
    features = image.astype(np.float32)
    sigma = smoothing * max(features.shape[:2])
    if sigma > 0:
        features = cv2.GaussianBlur(features, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return features.reshape(*features.shape[:2], -1)


def border_band(shape: tuple[int, int], width: float) -> np.ndarray:
    """Bool mask of a frame ``width``·(short side) wide (at least one pixel) along the image edges."""
    height, width_px = shape
    band = max(1, round(width * min(height, width_px)))
    mask = np.zeros(shape, dtype=bool)
    mask[:band], mask[-band:], mask[:, :band], mask[:, -band:] = True, True, True, True
    return mask


def robust_colour_stats(pixels: np.ndarray, min_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel median and 1.4826·MAD (floored at ``min_scale``) of N×C pixels."""
    median = np.median(pixels, axis=0)
    scale = 1.4826 * np.median(np.abs(pixels - median), axis=0)
    return median, np.maximum(scale, min_scale)


def colour_distance(features: np.ndarray, median: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Root-mean-square robust z-score over channels: how far each pixel is from the background colour."""
    return np.sqrt(np.mean(((features - median) / scale) ** 2, axis=-1))


def centre_outlier_fraction(distance: np.ndarray, z_threshold: float) -> float:
    """Fraction of the central half-box whose distance from the border statistics exceeds ``z_threshold``."""
    height, width = distance.shape
    centre = distance[height // 4: max(height // 4 + 1, 3 * height // 4),
                      width // 4: max(width // 4 + 1, 3 * width // 4)]
    return float(np.mean(centre > z_threshold))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance) of 1-D values clipped at their 99.5th percentile."""
    low, high = float(values.min()), float(np.percentile(values, 99.5))
    if high <= low:
        return high
    hist, edges = np.histogram(np.clip(values, low, high), bins=bins, range=(low, high))
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(p)
    mean_low = np.cumsum(p * centres)
    between = (mean_low[-1] * weight_low - mean_low) ** 2 / np.maximum(weight_low * (1 - weight_low), 1e-12)
    return float(centres[int(np.argmax(between[:-1]))])


def hysteresis(distance: np.ndarray, low: float, high: float) -> np.ndarray:
    """Pixels above ``low`` that are 8-connected to a pixel above ``high``."""
    _, labels = cv2.connectedComponents((distance > low).astype(np.uint8), connectivity=8)
    seeds = np.unique(labels[distance > high])
    return np.isin(labels, seeds[seeds > 0])


def grabcut_refine(image: np.ndarray, probable: np.ndarray, sure_object: np.ndarray,
                   sure_background: np.ndarray, iterations: int) -> np.ndarray:
    """GrabCut (colour GMMs + graph cut) from a seeded mask; returns ``probable`` unchanged when a class is empty."""
    seeds = np.full(probable.shape, cv2.GC_PR_BGD, dtype=np.uint8)
    seeds[probable] = cv2.GC_PR_FGD
    seeds[sure_object] = cv2.GC_FGD
    seeds[sure_background & ~sure_object] = cv2.GC_BGD
    is_object = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    if iterations == 0 or is_object.sum() < 16 or (~is_object).sum() < 16:
        return probable
    background_model = np.zeros((1, 65), np.float64)
    object_model = np.zeros((1, 65), np.float64)
    cv2.grabCut(image, seeds, None, background_model, object_model, iterations, cv2.GC_INIT_WITH_MASK)
    return (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region that does not touch the image edge filled in."""
    _, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask | ~np.isin(labels, outside)


def clean_mask(mask: np.ndarray, kernel_size: int, min_component_fraction: float) -> np.ndarray:
    """Close, fill holes, open, then keep the components at least ``min_component_fraction`` of the largest."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    closed = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    opened = cv2.morphologyEx(fill_holes(closed).astype(np.uint8), cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if count <= 1:
        return np.zeros_like(mask)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.flatnonzero(areas >= min_component_fraction * areas.max())
    return np.isin(labels, keep)


class StatisticalObjectPrior:
    """Offline object prior from colour statistics; no weights needed.

    Background colour = robust statistics (median, MAD) of a frame along the image border, pooled over the
    normal images when they are given. The set is first judged texture or object: a reference image whose
    central half-box matches its own border statistics (few pixels beyond ``z_threshold``) votes "full-frame
    texture"; the majority of the normal images (or, without them, of the images) decides, since one product
    category is either a texture or an object on a background. Textures get the whole frame. Objects are
    segmented per image: robust z-distance from the background colour, Otsu threshold with hysteresis down
    to ``z_threshold``, GrabCut refinement, morphology and the largest component(s).
    """

    name = "fallback"

    def __init__(self, config: StatisticalPriorConfig | None = None):
        self.config = config or StatisticalPriorConfig()

    def _features(self, image: np.ndarray) -> np.ndarray:
        return working_image(image, self.config.working_size, self.config.smoothing)

    def _own_stats(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        band = border_band(features.shape[:2], self.config.border_width)
        return robust_colour_stats(features[band], self.config.min_scale)

    def _looks_like_texture(self, image: np.ndarray) -> bool:
        features = self._features(image)
        distance = colour_distance(features, *self._own_stats(features))
        return centre_outlier_fraction(distance, self.config.z_threshold) < self.config.texture_centre_fraction

    def _texture_votes(self, references: Sequence[np.ndarray]) -> tuple[int, int]:
        step = max(1, len(references) // self.config.max_reference_images)
        chosen = list(references)[::step][: self.config.max_reference_images]
        return sum(self._looks_like_texture(image) for image in chosen), len(chosen)

    def _pooled_stats(self, normal_images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        step = max(1, len(normal_images) // self.config.max_reference_images)
        pixels = []
        for image in list(normal_images)[::step][: self.config.max_reference_images]:
            features = self._features(image)
            pixels.append(features[border_band(features.shape[:2], self.config.border_width)])
        return robust_colour_stats(np.concatenate(pixels), self.config.min_scale)

    def segment_object(self, image: np.ndarray,
                       background: tuple[np.ndarray, np.ndarray] | None = None) -> ObjectMask:
        """Object mask of one RGB uint8 image.

        The background colour comes from the image's border; with ``background`` = (median, scale) learned
        from normal images, only the border pixels that match it are used (so an object touching the edge
        does not pollute the statistics).
        """
        cfg = self.config
        features = self._features(image)
        band = border_band(features.shape[:2], cfg.border_width)
        border_pixels = features[band]
        source = "its own border"
        if background is not None:
            matching = colour_distance(border_pixels, *background) <= cfg.z_threshold
            if matching.mean() >= 0.25:
                border_pixels, source = border_pixels[matching], "its border pixels matching the normal images"
        distance = colour_distance(features, *robust_colour_stats(border_pixels, cfg.min_scale))
        threshold = max(cfg.z_threshold, otsu_threshold(distance.ravel()))
        sure_object = distance > threshold
        probable = hysteresis(distance, cfg.z_threshold, threshold)
        sure_background = band & (distance <= cfg.z_threshold)
        height, width = image.shape[:2]
        small = cv2.resize(image, distance.shape[::-1], interpolation=cv2.INTER_AREA)
        refined = grabcut_refine(small, probable, sure_object, sure_background, cfg.grabcut_iterations)
        kernel = max(3, round(cfg.morphology_size * max(distance.shape))) | 1
        cleaned = clean_mask(refined, kernel, cfg.min_component_fraction)
        if not cleaned.any():
            return ObjectMask(full_frame(image), "fallback: no region differs from the background colour of "
                                                 f"{source}; whole image used")
        resized = cv2.resize(cleaned.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
        return ObjectMask(resized, f"fallback: object differs from the background colour of {source} "
                                   f"(z > {threshold:.1f}); {resized.mean():.0%} of the image")

    def segment(self, images: Sequence[np.ndarray],
                normal_images: Sequence[np.ndarray] | None = None) -> list[ObjectMask]:
        images = check_images(images)
        has_normals = normal_images is not None and len(normal_images) > 0
        normals = check_images(normal_images, "normal_images") if has_normals else []
        if not images:
            return []
        references = normals or images
        votes, total = self._texture_votes(references)
        which = "normal images" if normals else "images"
        if votes * 2 >= total:
            reason = (f"fallback: full-frame texture (centre matches border colour in {votes}/{total} "
                      f"{which}); whole image used")
            logger.info(reason)
            return [ObjectMask(full_frame(image), reason) for image in images]
        background = self._pooled_stats(normals) if normals else None
        return [self.segment_object(image, background) for image in images]

    def masks(self, images: Sequence[np.ndarray],
              normal_images: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        return [item.mask for item in self.segment(images, normal_images)]
