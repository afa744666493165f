"""A small world for the view models: grey images with one coloured square each (three colours = three classes),
the square as the anomaly map, and defect-free grey images as the normal set."""

from __future__ import annotations

import numpy as np

from anomaly_discovery.models.localisation.regions import crop_region

COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220))
SIZE = 96


def grey(rng: np.random.Generator) -> np.ndarray:
    return (np.full((SIZE, SIZE, 3), 128, np.int16) + rng.integers(-10, 10, (SIZE, SIZE, 3))).astype(np.uint8)


def square_world(n_images: int = 36, seed: int = 0):
    """(regions, images by id, class of each id, normal images)."""
    rng = np.random.default_rng(seed)
    regions, images, truth = [], {}, {}
    for i in range(n_images):
        image = grey(rng)
        x, y = (int(v) for v in rng.integers(10, 60, 2))
        image[y:y + 24, x:x + 24] = COLOURS[i % 3]
        anomaly = np.zeros((SIZE, SIZE), np.float32)
        anomaly[y:y + 24, x:x + 24] = 0.9
        box = (max(0, x - 12), max(0, y - 12), min(SIZE, x + 36), min(SIZE, y + 36))
        images[f"im{i}"], truth[f"im{i}"] = image, i % 3
        regions.append(crop_region(image, box, anomaly, None, f"im{i}"))
    return regions, images, truth, [grey(rng) for _ in range(12)]
