"""NEU-DET (steel strip): ``IMAGES/<class>_<n>.jpg`` with Pascal VOC boxes in ``ANNOTATIONS/<class>_<n>.xml``.

The class of an image is its file-name prefix. Boxes keep their own class names (123 images carry two) and are
rescaled from the annotation's declared size to the image's real size (the public copy's images are 416 px,
its annotations 200 px).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .errors import DataError, LayoutError
from .images import image_size
from .sample import Box, Sample

NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def neu_class_of(name: str) -> str:
    for cls in sorted(NEU_CLASSES, key=len, reverse=True):
        if name.startswith(cls + "_"):
            return cls
    raise DataError(Path(name), f"file name does not start with a NEU-DET class ({', '.join(NEU_CLASSES)})")


def read_voc_boxes(xml_path: Path, image_hw: tuple[int, int]) -> tuple[Box, ...]:
    """Boxes of one VOC file, scaled to ``image_hw`` = (H, W)."""
    try:
        root = ET.parse(xml_path).getroot()
        declared_w = float(root.findtext("size/width") or image_hw[1])
        declared_h = float(root.findtext("size/height") or image_hw[0])
        boxes = []
        for obj in root.findall("object"):
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            sx, sy = image_hw[1] / declared_w, image_hw[0] / declared_h
            boxes.append(Box(obj.findtext("name").strip(), int(x0 * sx), int(y0 * sy),
                             min(image_hw[1], int(round(x1 * sx))), min(image_hw[0], int(round(y1 * sy)))))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise DataError(xml_path, f"not a Pascal VOC annotation ({exc})") from exc
    return tuple(boxes)


def read_neu(root: str | Path) -> list[Sample]:
    """All NEU-DET images with their class and boxes (split ``train``: a labelled set of known classes)."""
    root = Path(root)
    images_dir, notes_dir = root / "IMAGES", root / "ANNOTATIONS"
    if not images_dir.is_dir() or not notes_dir.is_dir():
        raise LayoutError(root, "not a NEU-DET layout: expected IMAGES/ and ANNOTATIONS/ folders")
    samples = []
    for image in sorted(images_dir.glob("*.jpg")):
        xml_path = notes_dir / f"{image.stem}.xml"
        if not xml_path.is_file():
            raise DataError(xml_path, f"annotation of {image.name} not found")
        boxes = read_voc_boxes(xml_path, image_size(image))
        samples.append(Sample(image_path=image, label=neu_class_of(image.name), mask_path=None,
                              split="train", product="steel_strip", boxes=boxes))
    if not samples:
        raise LayoutError(images_dir, "no .jpg images found")
    return samples
