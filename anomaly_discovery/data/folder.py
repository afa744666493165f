"""A folder per class (``<root>/<class>/<image>``), with an optional parallel masks folder
(``<masks>/<class>/<stem>.png`` or ``<stem>_mask.png``). A class folder named ``good`` holds normal images."""

from __future__ import annotations

from pathlib import Path

from .errors import LayoutError
from .images import is_image_file
from .sample import NORMAL_LABEL, Sample


def _find_mask(masks_root: Path | None, label: str, image: Path) -> Path | None:
    if masks_root is None or label == NORMAL_LABEL:
        return None
    for name in (f"{image.stem}.png", f"{image.stem}_mask.png"):
        candidate = masks_root / label / name
        if candidate.exists():
            return candidate
    return None


def read_folder(root: str | Path, masks_root: str | Path | None = None, split: str = "test",
                product: str | None = None) -> list[Sample]:
    """Every image under ``root/<class>/``, labelled by its folder; masks matched by file stem when given."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(root, "dataset folder not found")
    masks = Path(masks_root) if masks_root else None
    if masks is not None and not masks.is_dir():
        raise LayoutError(masks, "masks folder not found")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [
        Sample(image_path=image, label=class_dir.name, mask_path=_find_mask(masks, class_dir.name, image),
               split=split, product=product or root.name)
        for class_dir in class_dirs
        for image in sorted(p for p in class_dir.iterdir() if is_image_file(p))
    ]
    if not samples:
        raise LayoutError(root, "no images found: expected <root>/<class>/<image> files")
    return samples
