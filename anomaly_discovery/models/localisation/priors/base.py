"""Object priors (methods.md §2, step 1): the interface every prior follows and the trivial prior.

ProtoAnomalyNCD segments the product with Grounded SAM into an object mask O that suppresses background. Every
prior returns, per image, a bool H×W mask (True = product) together with a reason string. The offline statistical
fallback lives in :mod:`.statistical`, the Grounded SAM adapter in :mod:`.grounded_sam`, and
:func:`~.factory.build_object_prior` picks one and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from anomaly_discovery.data.images import as_rgb


@dataclass
class ObjectMask:
    """One image's object mask (bool H×W, True = product) and why it looks the way it does."""

    mask: np.ndarray
    reason: str


@runtime_checkable
class ObjectPrior(Protocol):
    name: str

    def segment(self, images: Sequence[np.ndarray],
                normal_images: Sequence[np.ndarray] | None = None) -> list[ObjectMask]: ...

    def masks(self, images: Sequence[np.ndarray],
              normal_images: Sequence[np.ndarray] | None = None) -> list[np.ndarray]: ...


def check_images(images: Sequence[np.ndarray], what: str = "images") -> list[np.ndarray]:
    """Each image as a uint8 RGB H×W×3 array; a bad one is refused with its index, dtype or shape named."""
    checked = []
    for index, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"{what}[{index}]: expected a uint8 image, got dtype {image.dtype}")
        try:
            checked.append(as_rgb(image))
        except ValueError as exc:
            raise ValueError(f"{what}[{index}]: {exc}") from exc
    return checked


def full_frame(image: np.ndarray) -> np.ndarray:
    """The all-True mask of an image's (H, W)."""
    return np.ones(np.asarray(image).shape[:2], dtype=bool)


class NoObjectPrior:
    """Every pixel is product."""

    name = "none"

    def segment(self, images: Sequence[np.ndarray],
                normal_images: Sequence[np.ndarray] | None = None) -> list[ObjectMask]:
        return [ObjectMask(full_frame(image), "object prior 'none': whole image")
                for image in check_images(images)]

    def masks(self, images: Sequence[np.ndarray],
              normal_images: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        return [item.mask for item in self.segment(images, normal_images)]
