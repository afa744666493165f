"""Magnetic Tile Defect dataset: ``MT_<Class>/Imgs/<name>.jpg`` with its mask ``<name>.png`` beside it (optional).

The split file lists the MT_Free images held out as the normal test set; the other MT_Free images are the
normal training images, and every defect image is a test image. ``MT_Free`` is labelled ``good``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError, LayoutError
from .sample import NORMAL_LABEL, Sample

NORMAL_FOLDER = "MT_Free"


def load_normal_test_names(split_file: str | Path) -> set[str]:
    split_file = Path(split_file)
    try:
        names = json.loads(split_file.read_text())["normal_test"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(split_file, f"not an MTD split file with a 'normal_test' list ({exc})") from exc
    return set(names)


def read_mtd(root: str | Path, split_file: str | Path | None = None) -> list[Sample]:
    """All MTD images. ``split_file`` defaults to ``<root>/../mtd_split.json``."""
    root = Path(root)
    class_dirs = sorted(p for p in root.glob("MT_*") if (p / "Imgs").is_dir()) if root.is_dir() else []
    if not class_dirs:
        raise LayoutError(root, "not an MTD layout: no MT_<Class>/Imgs folders")
    split_file = Path(split_file) if split_file else root.parent / "mtd_split.json"
    normal_test = load_normal_test_names(split_file)
    samples = []
    for class_dir in class_dirs:
        normal = class_dir.name == NORMAL_FOLDER
        label = NORMAL_LABEL if normal else class_dir.name.removeprefix("MT_")
        for image in sorted((class_dir / "Imgs").glob("*.jpg")):
            split = ("test" if image.name in normal_test else "train") if normal else "test"
            mask = None if normal or not image.with_suffix(".png").is_file() else image.with_suffix(".png")
            samples.append(Sample(image_path=image, label=label, mask_path=mask, split=split, product="magnetic_tile"))
    missing = normal_test - {s.image_path.name for s in samples if s.label == NORMAL_LABEL}
    if missing:
        raise DataError(split_file, f"{len(missing)} normal test images of the split file are not in {root}, "
                        f"e.g. {sorted(missing)[0]}")
    return samples
