"""Six defect kinds drawn onto a :class:`Surface`, each returning the changed image and its pixel mask.

Every kind varies in size, orientation, contrast and polarity (darker or brighter than the surface), so
the kinds differ by shape and edge structure rather than by mean intensity.
"""

from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

from .shapes import (bent_curve, blur, draw_polyline, fill_polygon, random_point, random_polygon,
                     smoothstep)
from .textures import Surface

Defect = tuple[np.ndarray, np.ndarray]


def _polarity(rng: np.random.Generator, p_dark: float) -> float:
    return -1.0 if rng.random() < p_dark else 1.0


def _scale(surface: Surface) -> float:
    return surface.size / 256.0


def _tint(rng: np.random.Generator, channels: int) -> np.ndarray:
    """A per-channel factor near 1 (shape C×1×1), so colour products get slightly coloured defects."""
    if channels == 1:
        return np.ones((1, 1, 1), dtype=np.float32)
    return (1.0 + rng.uniform(-0.25, 0.25, (channels, 1, 1))).astype(np.float32)


def scratch(rng: np.random.Generator, surface: Surface) -> Defect:
    """A thin, long, nearly straight line, brighter or darker than the surface."""
    s = _scale(surface)
    points = bent_curve(rng, random_point(rng, surface.allowed), rng.uniform(0.15, 0.5) * surface.size,
                        bend=rng.uniform(0.0, 0.12))
    coverage = draw_polyline(surface.size, points, thickness=int(rng.integers(1, 4) * s))
    delta = _polarity(rng, 0.5) * rng.uniform(25.0, 80.0) * _tint(rng, surface.channels)
    return surface.image + coverage[None] * delta, coverage > 0.3


def _random_walk(rng: np.random.Generator, origin: np.ndarray, heading: float, length: float,
                 s: float) -> np.ndarray:
    """Points of a jagged path: short steps whose direction drifts randomly around ``heading``."""
    n_steps = max(3, int(length / (4.0 * s)))
    turns = heading + np.cumsum(rng.normal(0.0, 0.55, n_steps))
    steps = rng.uniform(2.0, 6.0, n_steps)[:, None] * s * np.stack([np.cos(turns), np.sin(turns)], axis=1)
    return np.vstack([origin, origin + np.cumsum(steps, axis=0)])


def crack(rng: np.random.Generator, surface: Surface) -> Defect:
    """A jagged random-walk fissure with up to two side branches, mostly dark, with a faint shadow beside it."""
    s = _scale(surface)
    heading = rng.uniform(0.0, 2 * np.pi)
    length = rng.uniform(0.1, 0.35) * surface.size
    trunk = _random_walk(rng, random_point(rng, surface.allowed), heading, length, s)
    paths = [trunk]
    for _ in range(int(rng.integers(0, 3))):
        origin = trunk[int(rng.integers(len(trunk) // 4, len(trunk)))]
        side = heading + _polarity(rng, 0.5) * rng.uniform(0.5, 1.3)
        paths.append(_random_walk(rng, origin, side, rng.uniform(0.2, 0.5) * length, s))
    coverage = np.zeros((surface.size, surface.size), dtype=np.float32)
    for path in paths:
        line = draw_polyline(surface.size, path, int(rng.integers(1, 3) * s), antialiased=False)
        coverage = np.maximum(coverage, line)
    strength = _polarity(rng, 0.75) * rng.uniform(40.0, 100.0)
    shadow = 0.3 * blur(coverage, 1.5 * s)
    return surface.image + (np.maximum(coverage, shadow) * strength)[None], coverage > 0.5


def hole(rng: np.random.Generator, surface: Surface) -> Defect:
    """A round or oval puncture with a flat interior (dark, or bright when backlit) and a raised burr rim."""
    s = _scale(surface)
    centre = random_point(rng, surface.allowed)
    major = rng.uniform(3.0, 14.0) * s
    axes = (max(2, int(major)), max(2, int(major * rng.uniform(0.6, 1.0))))
    angle = rng.uniform(0.0, 180.0)
    middle = (int(centre[0]), int(centre[1]))
    canvas = np.zeros((surface.size, surface.size), dtype=np.uint8)
    cv2.ellipse(canvas, middle, axes, angle, 0, 360, 255, -1, cv2.LINE_AA)
    interior = canvas.astype(np.float32) / 255.0
    rim_width = max(1, int(rng.integers(1, 4) * s))
    rim = np.zeros_like(canvas)
    rim_axes = (axes[0] + rim_width, axes[1] + rim_width)
    cv2.ellipse(rim, middle, rim_axes, angle, 0, 360, 255, rim_width + 1, cv2.LINE_AA)
    rim_cover = blur(rim.astype(np.float32) / 255.0, 0.6 * s) * (1.0 - interior)
    dark = rng.random() < 0.75
    fill = rng.uniform(5.0, 45.0) if dark else rng.uniform(200.0, 250.0)
    burr = (1.0 if dark else -1.0) * rng.uniform(15.0, 45.0)
    image = surface.image * (1.0 - interior[None]) + fill * interior[None] + (rim_cover * burr)[None]
    return image, (interior > 0.5) | (rim_cover > 0.3)


def stain(rng: np.random.Generator, surface: Surface) -> Defect:
    """A soft-edged irregular blot, semi-transparent, dark or light, sometimes with a drying ring."""
    s = _scale(surface)
    centre = random_point(rng, surface.allowed)
    radius = rng.uniform(8.0, 35.0) * s
    canvas = np.zeros((surface.size, surface.size), dtype=np.float32)
    for _ in range(int(rng.integers(3, 8))):
        offset = rng.normal(0.0, 0.45 * radius, 2)
        cv2.circle(canvas, (int(centre[0] + offset[0]), int(centre[1] + offset[1])),
                   max(1, int(radius * rng.uniform(0.3, 0.7))), 1.0, -1)
    field = blur(canvas, rng.uniform(0.15, 0.35) * radius)
    alpha = smoothstep(field, 0.15, rng.uniform(0.4, 0.8))
    opacity = rng.uniform(0.25, 0.65)
    level = float(surface.image[:, int(centre[1]), int(centre[0])].mean())
    colour = float(np.clip(level + _polarity(rng, 0.6) * rng.uniform(50.0, 120.0), 5.0, 250.0)) \
        * _tint(rng, surface.channels)
    ring = 4.0 * alpha * (1.0 - alpha) * rng.uniform(0.0, 0.5)
    weight = np.clip(alpha * opacity + ring * opacity, 0.0, 1.0)[None]
    return surface.image * (1.0 - weight) + colour * weight, alpha > 0.3


def missing_material(rng: np.random.Generator, surface: Surface) -> Defect:
    """An angular chip where the surface layer is gone and the substrate shows, with a dark broken edge."""
    s = _scale(surface)
    region = surface.edge if surface.edge is not None and rng.random() < 0.7 else surface.allowed
    vertices = random_polygon(rng, random_point(rng, region), rng.uniform(8.0, 30.0) * s, 5, 9, roughness=0.55)
    chip = fill_polygon(surface.size, vertices)
    coverage = blur(chip.astype(np.float32), 0.5 * s)
    edge = np.zeros((surface.size, surface.size), dtype=np.uint8)
    cv2.polylines(edge, [np.round(vertices).astype(np.int32)], True, 255, max(1, int(s)), cv2.LINE_AA)
    edge_shade = (edge.astype(np.float32) / 255.0) * rng.uniform(0.0, 40.0)
    image = surface.image * (1.0 - coverage[None]) + surface.substrate * coverage[None]
    return image - edge_shade[None], chip


def fold(rng: np.random.Generator, surface: Surface) -> Defect:
    """A crease: a wide ridge along a bent curve, lit from one side (bright flank, dark flank)."""
    s = _scale(surface)
    width = rng.uniform(3.0, 10.0) * s
    points = bent_curve(rng, random_point(rng, surface.allowed), rng.uniform(0.2, 0.6) * surface.size,
                        bend=rng.uniform(0.0, 0.3))
    height = blur(draw_polyline(surface.size, points, thickness=max(1, int(width / 2))), width)
    height /= max(float(height.max()), 1e-6)
    light = rng.uniform(0.0, 2 * math.pi)
    slope = (math.cos(light) * cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3)
             + math.sin(light) * cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3))
    slope /= max(float(np.abs(slope).max()), 1e-6)
    shading = rng.uniform(30.0, 80.0) * slope - rng.uniform(0.0, 20.0) * height
    return surface.image + shading[None], height > 0.3


DEFECT_RENDERERS: dict[str, Callable[[np.random.Generator, Surface], Defect]] = {
    "scratch": scratch,
    "crack": crack,
    "hole": hole,
    "stain": stain,
    "missing_material": missing_material,
    "fold": fold,
}
DEFECT_TYPES: tuple[str, ...] = tuple(DEFECT_RENDERERS)
