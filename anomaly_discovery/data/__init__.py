"""Dataset readers, image and mask loading, and the synthetic defect generator."""

from .errors import DataError, ImageReadError, LayoutError
from .images import load_image, load_mask, save_image
from .readers import DATASET_FORMATS, detect_format, read_dataset
from .sample import NORMAL_LABEL, Box, Sample
from .validation import ReadReport

__all__ = [
    "DATASET_FORMATS", "NORMAL_LABEL", "Box", "DataError", "ImageReadError", "LayoutError", "ReadReport",
    "Sample", "detect_format", "load_image", "load_mask", "read_dataset", "save_image",
]
