"""MVTec AD layout: ``<product>/train/good``, ``<product>/test/<type>``, and optionally
``<product>/ground_truth/<type>/<name>_mask.png``. The synthetic generator writes this layout too."""

from __future__ import annotations

from pathlib import Path

from .errors import LayoutError
from .images import is_image_file
from .sample import NORMAL_LABEL, Sample


def is_mvtec_product(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def product_folders(root: Path) -> list[Path]:
    """``root`` itself when it is one product, else its product sub-folders."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(root, "dataset folder not found")
    if is_mvtec_product(root):
        return [root]
    products = sorted(p for p in root.iterdir() if p.is_dir() and is_mvtec_product(p))
    if not products:
        raise LayoutError(root, "not an MVTec AD layout: no <product>/train or <product>/test folder")
    return products


def _mask_for(product: Path, defect: str, image: Path) -> Path | None:
    """``ground_truth/<type>/<stem>_mask.png`` (or ``<stem>.png``); ``None`` for normal images and for defect
    images without a mask (masks are optional: they are only read to score results)."""
    if defect == NORMAL_LABEL:
        return None
    folder = product / "ground_truth" / defect
    return next((folder / name for name in (f"{image.stem}_mask.png", f"{image.stem}.png")
                 if (folder / name).is_file()), None)


def read_mvtec(root: str | Path, products: list[str] | None = None) -> list[Sample]:
    """Every train and test image of each product, with its defect type and mask path (``None`` where the
    product has no ``ground_truth/`` mask for it)."""
    samples: list[Sample] = []
    for product in product_folders(Path(root)):
        if products and product.name not in products:
            continue
        for split in ("train", "test"):
            split_dir = product / split
            if not split_dir.is_dir():
                continue
            for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                for image in sorted(p for p in type_dir.iterdir() if is_image_file(p)):
                    samples.append(Sample(image_path=image, label=type_dir.name,
                                          mask_path=_mask_for(product, type_dir.name, image),
                                          split=split, product=product.name))
    if not samples:
        raise LayoutError(Path(root), "no images found in the MVTec AD layout")
    return samples
