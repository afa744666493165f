"""Checking the files a reader found, with the choice to stop at the first bad one or to skip and count."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError

from .errors import DataError, ImageReadError
from .sample import Sample


@dataclass
class ReadReport:
    """What a reader returned, and what it skipped (only when asked to skip bad files)."""

    samples: list[Sample]
    skipped: list[DataError] = field(default_factory=list)

    @property
    def defects_without_mask(self) -> int:
        """Labelled defect images that have no pixel mask (read all the same: masks only score results)."""
        return sum(s.label is not None and not s.is_normal and s.mask_path is None for s in self.samples)

    def summary(self) -> str:
        text = f"{len(self.samples)} images"
        if self.defects_without_mask:
            text += f", {self.defects_without_mask} defect images without a mask"
        if self.skipped:
            text += f", {len(self.skipped)} bad files skipped"
        return text


def decoded_size(path: Path) -> tuple[int, int]:
    """Decode ``path`` fully and return its (H, W); ImageReadError for empty, truncated or non-image files."""
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"image too large ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"not a readable image ({exc})") from exc
    return height, width


def check_sample(sample: Sample) -> Sample:
    """Decode the image and its mask; the mask must have the image's size. Returns the sample unchanged."""
    image_hw = decoded_size(sample.image_path)
    if sample.mask_path is not None:
        if not sample.mask_path.is_file():
            raise ImageReadError(sample.mask_path, f"mask of {sample.image_path.name} not found")
        mask_hw = decoded_size(sample.mask_path)
        if mask_hw != image_hw:
            raise ImageReadError(sample.mask_path, f"mask size {mask_hw[1]}x{mask_hw[0]} differs from its "
                                 f"image {sample.image_path.name} ({image_hw[1]}x{image_hw[0]})")
    return sample


def check_samples(samples: Iterable[Sample], skip_bad: bool = False) -> ReadReport:
    """Check every sample: raise on the first bad file, or with ``skip_bad`` drop it and record why."""
    report = ReadReport(samples=[])
    for sample in samples:
        try:
            report.samples.append(check_sample(sample))
        except DataError as error:
            if not skip_bad:
                raise
            report.skipped.append(error)
    return report

