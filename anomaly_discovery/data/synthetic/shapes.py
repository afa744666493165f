"""Small vectorised drawing helpers shared by the texture and defect renderers.

Every helper works on float32 H×W arrays and draws with OpenCV; none loops over pixels.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np


@lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (float32, size×size) of every pixel; cached per size."""
    axis = np.arange(size, dtype=np.float32)
    rows, cols = np.meshgrid(axis, axis, indexing="ij")
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with a Gaussian correlation of ``sigma`` px (size×size, float32).

    Uniform white noise (much cheaper to draw than normal noise, and Gaussian once blurred) is blurred; for
    wide blurs it is drawn at a coarser grid and resized up, which the blur makes indistinguishable.
    """
    step = max(1, int(sigma / 1.5))
    coarse = -(-size // step)
    noise = rng.random((coarse, coarse), dtype=np.float32)
    if sigma > 0:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma / step, borderType=cv2.BORDER_REFLECT)
    if step > 1:
        noise = cv2.resize(noise, (size, size), interpolation=cv2.INTER_LINEAR)
    noise -= noise.mean()
    return noise / max(float(noise.std()), 1e-6)


def blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float32 field (no-op for ``sigma`` ≤ 0)."""
    if sigma <= 0:
        return field
    return cv2.GaussianBlur(field, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def smoothstep(field: np.ndarray, low: float, high: float) -> np.ndarray:
    """0 below ``low``, 1 above ``high``, a smooth cubic ramp between."""
    t = np.clip((field - low) / max(high - low, 1e-6), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def random_point(rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
    """A uniformly chosen (x, y) pixel where ``allowed`` is True."""
    flat = np.flatnonzero(allowed)
    if flat.size == 0:
        raise ValueError("no pixel is allowed to hold a defect (the allowed region is empty)")
    index = int(flat[rng.integers(flat.size)])
    row, col = divmod(index, allowed.shape[1])
    return np.array([col, row], dtype=np.float64)


def bent_curve(rng: np.random.Generator, centre: np.ndarray, length: float, bend: float,
               n_points: int = 32) -> np.ndarray:
    """Points (N×2, x/y) of a quadratic Bézier of ``length`` through ``centre`` at a random angle.

    ``bend`` is the sideways offset of the control point as a fraction of the length (0 = straight).
    """
    angle = rng.uniform(0.0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    start = centre - direction * length / 2
    end = centre + direction * length / 2
    control = centre + normal * rng.normal(0.0, bend) * length
    t = np.linspace(0.0, 1.0, n_points)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end


def draw_polyline(size: int, points: np.ndarray, thickness: int, antialiased: bool = True) -> np.ndarray:
    """A float32 coverage map (0..1) of an open polyline."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    line_type = cv2.LINE_AA if antialiased else cv2.LINE_8
    cv2.polylines(canvas, [np.round(points).astype(np.int32)], False, 255, max(1, int(thickness)), line_type)
    return canvas.astype(np.float32) / 255.0


def random_polygon(rng: np.random.Generator, centre: np.ndarray, radius: float, n_min: int, n_max: int,
                   roughness: float) -> np.ndarray:
    """Vertices (N×2) of a star-shaped polygon; ``roughness`` in 0..1 sets how far radii vary."""
    count = int(rng.integers(n_min, n_max + 1))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, count))
    radii = radius * rng.uniform(1.0 - roughness, 1.0, count)
    return centre + np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


def fill_polygon(size: int, vertices: np.ndarray) -> np.ndarray:
    """A boolean mask of a filled polygon."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    cv2.fillPoly(canvas, [np.round(vertices).astype(np.int32)], 1)
    return canvas.astype(bool)
