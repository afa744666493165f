"""The one record type every dataset reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Box:
    """An axis-aligned labelled box in pixel coordinates (x0, y0 inclusive; x1, y1 exclusive)."""

    label: str
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def area(self) -> int:
        return max(0, self.x1 - self.x0) * max(0, self.y1 - self.y0)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``label`` is the defect class (``"good"`` for normal images) or ``None`` when unknown;
    ``mask_path`` is the ground-truth pixel mask or ``None`` (normal images and unlabelled data);
    ``boxes`` holds Pascal VOC boxes where a dataset has them (NEU-DET).
    """

    image_path: Path
    label: str | None
    mask_path: Path | None
    split: str
    product: str
    boxes: tuple[Box, ...] = field(default=())

    @property
    def is_normal(self) -> bool:
        return self.label == NORMAL_LABEL

    @property
    def name(self) -> str:
        return self.image_path.stem


NORMAL_LABEL = "good"
SPLITS = ("train", "test")
