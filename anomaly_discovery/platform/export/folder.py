"""Folder-per-class export of the reviewed state (issue 15), a layout torchvision's ``ImageFolder`` and anomalib's
``Folder`` datamodule read as it is::

    OUT/
      export.json                                what it reflects: model version, newest decision, counts, folders
      regions.csv                                the CSV export plus ``file`` and ``mask_file`` (paths inside OUT)
      images/classes/<class>/<image id>_<name>   known and confirmed classes: ImageFolder(OUT/images/classes)
      masks/classes/<class>/<image id>_<stem>.png
      images/proposed/<class>/...   masks/proposed/<class>/...    proposals still waiting for review
      images/unknown/...            masks/unknown/...             no class, as the model left them
      images/rejected/...           masks/rejected/...            no class, by a reviewer's decision
      images/normal/...                                           images in which the detector found no region

An image goes once into each folder its regions fall in; its mask there is the union of those regions' masks
(0 / 255 PNG at the image's size, see ``coco.region_mask``), named by the image's stem, so anomalib pairs them
(``Folder(root=OUT, normal_dir="images/normal", abnormal_dir="images/classes/<class>",
mask_dir="masks/classes/<class>")``). Images are symbolic links to the stored files unless ``copy``. Class names
become folder names with path separators and control characters replaced; two classes that would share a folder
get their class id appended.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from anomaly_discovery.data import save_image
from anomaly_discovery.platform.export.coco import image_shapes, region_mask
from anomaly_discovery.platform.export.output import ExportError
from anomaly_discovery.platform.export.snapshot import CLASS_STATUSES, ExportSnapshot, regions_csv

UNSAFE = re.compile(r"[\x00-\x1f/\\]")
GROUP_OF_STATUS = {"known": "classes", "confirmed": "classes", "proposed": "proposed", "unknown": "unknown",
                   "rejected": "rejected"}


@dataclass(frozen=True)
class FolderSummary:
    """Files written per folder (relative to the export root) and images left out as unreadable."""

    images: dict[str, int]
    class_folders: dict[str, str]
    skipped_images: list[str]


def folder_name(name: str) -> str:
    """A class name as one path component (see the module docstring)."""
    cleaned = UNSAFE.sub("_", name).strip()
    return "_" + cleaned if cleaned in ("", ".", "..") else cleaned


def class_folders(snapshot: ExportSnapshot) -> dict[int, str]:
    """Folder (relative to ``images/``) of each class holding regions: ``classes/<name>`` or ``proposed/<name>``."""
    folders: dict[int, str] = {}
    for defect_class in snapshot.classes:
        if defect_class.regions == 0:
            continue
        group = GROUP_OF_STATUS[defect_class.status]
        folder = f"{group}/{folder_name(defect_class.name)}"
        if folder.lower() in {f.lower() for f in folders.values()}:
            folder = f"{folder}-{defect_class.id}"
        folders[defect_class.id] = folder
    return folders


def _place(source: Path, target: Path, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if copy:
            shutil.copy2(source, target)
        else:
            target.symlink_to(source)
    except OSError as exc:
        raise ExportError(f"cannot {'copy' if copy else 'link'} {source} to {target}: {exc.strerror or exc}"
                          f"{'' if copy else ' (pass --copy on a file system without symbolic links)'}") from exc


def _folder_of(row, folders: dict[int, str]) -> str:
    return folders[int(row.class_id)] if row.status in (*CLASS_STATUSES, "proposed") else row.status


def write_folder(snapshot: ExportSnapshot, root: Path, copy: bool = False, skip_missing: bool = False,
                 progress: bool = False) -> FolderSummary:
    """Write the layout of the module docstring under ``root`` (an empty folder); returns what was written."""
    shapes = image_shapes(snapshot.images["image_path"], skip_missing, progress)
    folders = class_folders(snapshot)
    regions = snapshot.regions[snapshot.regions["image_path"].isin(shapes)]
    rows = list(regions.itertuples(index=False))
    placement = [(int(row.image_id), _folder_of(row, folders)) for row in rows]
    groups: dict[tuple[int, str], list] = {}
    for row, key in zip(rows, placement):
        groups.setdefault(key, []).append(row)
    counts: dict[str, int] = {}
    files: dict[tuple[int, str], tuple[str, str]] = {}
    for (image_id, folder), members in tqdm(sorted(groups.items()), desc="export images", disable=not progress,
                                            unit="image"):
        source, shape = Path(members[0].image_path).absolute(), shapes[members[0].image_path]
        name = f"{image_id}_{source.name}"
        mask, mask_files = np.zeros(shape, bool), {}
        for row in members:
            box = (int(row.x0), int(row.y0), int(row.x1), int(row.y1))
            mask |= region_mask(row.mask_path, shape, box, mask_files)[0]
        image_file, mask_file = f"images/{folder}/{name}", f"masks/{folder}/{Path(name).stem}.png"
        _place(source, root / image_file, copy)
        save_image(root / mask_file, mask)
        files[(image_id, folder)] = (image_file, mask_file)
        counts[folder] = counts.get(folder, 0) + 1
    with_regions = {image_id for image_id, _ in groups}
    for image_id, path in zip(snapshot.images["image_id"], snapshot.images["image_path"]):
        if image_id not in with_regions and path in shapes:
            source = Path(path).absolute()
            _place(source, root / "images" / "normal" / f"{image_id}_{source.name}", copy)
            counts["normal"] = counts.get("normal", 0) + 1
    table = regions.assign(file=[files[key][0] for key in placement], mask_file=[files[key][1] for key in placement])
    (root / "regions.csv").write_bytes(regions_csv(table))
    skipped = sorted(set(snapshot.images["image_path"]) - set(shapes))
    return FolderSummary(dict(sorted(counts.items())), {str(k): v for k, v in folders.items()}, skipped)
