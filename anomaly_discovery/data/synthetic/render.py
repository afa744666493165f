"""One synthetic image from its seed key: the product, then (for a defect label) one defect on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..sample import NORMAL_LABEL, Box
from .defects import DEFECT_RENDERERS
from .textures import PRODUCT_RENDERERS

MAX_DEFECT_ATTEMPTS = 20
MIN_DEFECT_PIXELS = 6


@dataclass(frozen=True)
class RenderedImage:
    """A uint8 image (H×W for grayscale products, H×W×3 for colour ones) with its boolean masks.

    ``defect_mask`` is ``None`` for normal images; ``object_mask`` is ``None`` for full-frame textures.
    """

    image: np.ndarray
    defect_mask: np.ndarray | None
    object_mask: np.ndarray | None

    def defect_box(self, label: str) -> Box | None:
        """The defect mask's bounding box (x1, y1 exclusive), or ``None`` for a normal image."""
        if self.defect_mask is None:
            return None
        rows = np.flatnonzero(self.defect_mask.any(axis=1))
        cols = np.flatnonzero(self.defect_mask.any(axis=0))
        return Box(label, int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """C×H×W float32 to H×W (one channel) or H×W×3 uint8."""
    out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out[0] if out.shape[0] == 1 else np.ascontiguousarray(out.transpose(1, 2, 0))


def render_image(product: str, label: str, image_size: int, seed_key: tuple[int, ...]) -> RenderedImage:
    """Render one image; the same (product, label, size, seed key) always gives the same pixels.

    Defects on an object product are clipped to the object's silhouette, and a defect that ends up
    smaller than ``MIN_DEFECT_PIXELS`` after clipping is drawn again from the same generator.
    """
    if product not in PRODUCT_RENDERERS:
        raise ValueError(f"unknown product {product!r}; known products: {', '.join(PRODUCT_RENDERERS)}")
    if label != NORMAL_LABEL and label not in DEFECT_RENDERERS:
        raise ValueError(f"unknown defect type {label!r}; known types: {', '.join(DEFECT_RENDERERS)}")
    rng = np.random.default_rng(list(seed_key))
    surface = PRODUCT_RENDERERS[product](rng, image_size)
    if label == NORMAL_LABEL:
        return RenderedImage(_to_uint8(surface.image), None, surface.object_mask)
    for _ in range(MAX_DEFECT_ATTEMPTS):
        image, mask = DEFECT_RENDERERS[label](rng, surface)
        if surface.object_mask is not None:
            mask = mask & surface.object_mask
            image = np.where(surface.object_mask[None], image, surface.image)
        if np.count_nonzero(mask) >= MIN_DEFECT_PIXELS:
            return RenderedImage(_to_uint8(image), mask, surface.object_mask)
    raise RuntimeError(f"could not place a {label} on {product} (seed key {seed_key}) "
                       f"in {MAX_DEFECT_ATTEMPTS} attempts")
