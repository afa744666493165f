"""Defect-free products: a brushed metal plate (full-frame texture) and a bottle seen from above.

Each renderer returns a :class:`Surface`: the image plus what the defect renderers need to know about it
(where a defect may sit, the object's own mask, and the substrate that shows where material is missing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from .shapes import pixel_grid, smooth_noise, smoothstep

BOTTLE_PALETTE = np.array([[150, 95, 40], [60, 125, 70], [150, 160, 168], [95, 70, 55]], dtype=np.float32)


@dataclass
class Surface:
    """A rendered normal product.

    ``image`` is float32 C×H×W in 0..255 (C = 1 or 3; channel-first so that H×W maps broadcast cheaply);
    ``allowed`` marks pixels a defect may be centred on; ``object_mask`` is the product's own silhouette
    (``None`` for full-frame textures); ``edge`` marks the band along the silhouette where chipped edges
    start (``None`` without an object); ``substrate`` (C×H×W) is what shows where material is missing.
    """

    image: np.ndarray
    allowed: np.ndarray
    substrate: np.ndarray
    object_mask: np.ndarray | None = None
    edge: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.image.shape[1]

    @property
    def channels(self) -> int:
        return self.image.shape[0]


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear light gradient plus one broad highlight, as under an uneven ring light."""
    rows, cols = pixel_grid(size)
    angle = rng.uniform(0.0, 2 * math.pi)
    gradient = (rng.uniform(5.0, 20.0) / size) * ((cols - size / 2) * math.cos(angle)
                                                  + (rows - size / 2) * math.sin(angle))
    cx, cy = (float(v) for v in rng.uniform(0.0, size, 2))
    spread = 2 * (rng.uniform(0.3, 0.7) * size) ** 2
    highlight = rng.uniform(0.0, 25.0) * np.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / spread)
    return (gradient + highlight).astype(np.float32)


def metal_plate(rng: np.random.Generator, size: int) -> Surface:
    """Brushed metal: streaks along a random direction, fine grain and uneven light, grayscale."""
    streak = int(rng.uniform(0.06, 0.2) * size) | 1
    streaks = cv2.blur(rng.random((size, size), dtype=np.float32) - 0.5, (streak, 1))
    rotation = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-90.0, 90.0), 1.0)
    streaks = cv2.warpAffine(streaks, rotation, (size, size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)
    streaks /= max(float(streaks.std()), 1e-6)
    grain = smooth_noise(rng, size, 0.6)
    level = rng.uniform(95.0, 170.0)
    image = level + rng.uniform(4.0, 10.0) * streaks + rng.uniform(1.5, 4.0) * grain + _illumination(rng, size)
    under = level + (1.0 if rng.random() < 0.5 else -1.0) * rng.uniform(50.0, 90.0)
    under = under if 15.0 <= under <= 245.0 else 2 * level - under
    substrate = under + rng.uniform(2.0, 5.0) * smooth_noise(rng, size, 1.5)
    margin = max(2, size // 32)
    allowed = np.zeros((size, size), dtype=bool)
    allowed[margin:-margin, margin:-margin] = True
    return Surface(image=image[None], allowed=allowed, substrate=substrate[None])


def bottle(rng: np.random.Generator, size: int) -> Surface:
    """A round bottle seen from above (dark opening, bright rim, shaded shoulder) on a dull background, RGB."""
    rows, cols = pixel_grid(size)
    cx, cy = (float(v) for v in size / 2 + rng.uniform(-0.04, 0.04, 2) * size)
    radius = rng.uniform(0.36, 0.44) * size
    r = np.hypot(cols - cx, rows - cy) / radius

    tint = 1.0 + rng.uniform(-0.08, 0.08, (3, 1, 1)).astype(np.float32)
    background = (rng.uniform(25.0, 75.0) + rng.uniform(2.0, 5.0) * smooth_noise(rng, size, 3.0)
                  + rng.uniform(1.0, 3.0) * smooth_noise(rng, size, 0.7))[None] * tint

    rim_in = rng.uniform(0.26, 0.34)
    rim_out = rim_in + rng.uniform(0.08, 0.14)
    knots = [0.0, rim_in - 0.02, rim_in + 0.02, rim_out - 0.02, rim_out + 0.03, 0.7, 0.93, 1.0]
    levels = [0.35, 0.22, 1.25, 1.15, 0.75, rng.uniform(0.85, 1.1), 0.8, 0.55]
    shading = np.interp(r, knots, levels).astype(np.float32)
    colour = (BOTTLE_PALETTE[rng.integers(len(BOTTLE_PALETTE))] * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    glint_angle = rng.uniform(0.0, 2 * math.pi)
    gx, gy = cx + 0.6 * radius * math.cos(glint_angle), cy + 0.6 * radius * math.sin(glint_angle)
    glint_spread = 2 * (0.12 * radius) ** 2
    glint_map = rng.uniform(15.0, 45.0) * np.exp(-((cols - gx) ** 2 + (rows - gy) ** 2) / glint_spread)
    body = (shading[None] * colour[:, None, None] + glint_map[None]
            + rng.uniform(1.5, 3.5) * smooth_noise(rng, size, 0.6)[None])

    coverage = (1.0 - smoothstep(r, 1.0 - 1.0 / radius, 1.0 + 1.0 / radius))[None]
    image = background * (1.0 - coverage) + body * coverage
    margin = max(3.0, size / 40) / radius
    return Surface(
        image=image.astype(np.float32),
        allowed=r <= 1.0 - margin,
        substrate=background.astype(np.float32),
        object_mask=r <= 1.0,
        edge=(r > 0.9) & (r <= 1.0),
    )


PRODUCT_RENDERERS: dict[str, Callable[[np.random.Generator, int], Surface]] = {
    "metal_plate": metal_plate,
    "bottle": bottle,
}
