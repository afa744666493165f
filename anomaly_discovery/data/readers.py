"""One entry point for every supported layout: ``read_dataset(root, format)``."""

from __future__ import annotations

from pathlib import Path

from .errors import LayoutError
from .folder import read_folder
from .mtd import read_mtd
from .mvtec import is_mvtec_product, read_mvtec
from .neu import read_neu
from .validation import ReadReport, check_samples

DATASET_FORMATS = ("mvtec", "mtd", "folder", "neu")


def detect_format(root: str | Path) -> str:
    """Guess the layout of ``root`` from its folders; LayoutError when none fits."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(root, "dataset folder not found")
    children = [p for p in root.iterdir() if p.is_dir()]
    if (root / "IMAGES").is_dir() and (root / "ANNOTATIONS").is_dir():
        return "neu"
    if any(p.name.startswith("MT_") and (p / "Imgs").is_dir() for p in children):
        return "mtd"
    if is_mvtec_product(root) or any(is_mvtec_product(p) for p in children):
        return "mvtec"
    if children:
        return "folder"
    raise LayoutError(root, f"unknown layout: none of {', '.join(DATASET_FORMATS)} fits (no sub-folders)")


def read_dataset(root: str | Path, format: str = "auto", *, skip_bad: bool = False, check: bool = True,
                 split_file: str | Path | None = None, masks_root: str | Path | None = None) -> ReadReport:
    """Read a dataset in one of :data:`DATASET_FORMATS` (or ``auto``) and check its files.

    With ``check`` every image and mask is decoded once: a bad file raises an error naming it, or with
    ``skip_bad`` is skipped and counted in the report.
    """
    fmt = detect_format(root) if format == "auto" else format
    if fmt == "mvtec":
        samples = read_mvtec(root)
    elif fmt == "mtd":
        samples = read_mtd(root, split_file)
    elif fmt == "folder":
        samples = read_folder(root, masks_root)
    elif fmt == "neu":
        samples = read_neu(root)
    else:
        raise ValueError(f"unknown dataset format {format!r}: use one of {', '.join(DATASET_FORMATS)} or auto")
    if not check:
        return ReadReport(samples=samples)
    return check_samples(samples, skip_bad=skip_bad)
