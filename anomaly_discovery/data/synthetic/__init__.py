"""Synthetic industrial defect generator: the embedded default data for the demo and the tests.

Two products (``metal_plate``, a brushed full-frame texture; ``bottle``, an object on a background with its
own silhouette mask) and six defect kinds (:data:`DEFECT_TYPES`), written in the MVTec AD layout.
"""

from .defects import DEFECT_TYPES
from .generate import (GENERATOR_VERSION, PRODUCTS, GeneratedDataset, GeneratedImage, generate_dataset,
                       split_counts)
from .render import RenderedImage, render_image

__all__ = [
    "DEFECT_TYPES",
    "GENERATOR_VERSION",
    "PRODUCTS",
    "GeneratedDataset",
    "GeneratedImage",
    "RenderedImage",
    "generate_dataset",
    "render_image",
    "split_counts",
]
