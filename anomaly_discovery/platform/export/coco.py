"""COCO-style JSON of the reviewed state (issue 15): images, categories = the classes, annotations = regions.

* ``images``: every image of the store (``file_name`` = its path as stored, ``width`` / ``height`` from its header),
  with or without regions (an image without one is a negative).
* ``categories``: each class holding regions (``id`` = the store's class id, ``status`` known / confirmed /
  proposed) and, when regions are in them, two pseudo-categories ``unknown`` and ``rejected`` (ids after the
  largest class id) for regions without a class, so every region is an annotation and nothing is dropped silently;
  train on the categories whose ``status`` you accept.
* ``annotations``: one per region (``id`` = region id): ``bbox`` [x, y, w, h], ``segmentation`` an uncompressed
  RLE (``counts`` column-major, starting with background, ``size`` [h, w]; pycocotools' ``frPyObjects`` reads it),
  ``area`` its pixels, ``iscrowd`` 0, ``score`` the assignment's confidence (null where the model gave none), and
  the review fields: ``status``, ``confidence``, ``outlier_score``, ``anomaly_score``, ``decided_by``,
  ``decided_at``, ``mask_source``.

A region's mask is its ``mask_path`` file (the image's whole defect mask, resized to the image when its size
differs) inside the region's box; ``mask_source`` is ``box`` when there is no mask file (API arrivals) or nothing
of it lies in the box, and the box itself is the mask then.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from anomaly_discovery.data import DataError, load_image
from anomaly_discovery.data.images import image_size
from anomaly_discovery.platform.export.output import ExportError
from anomaly_discovery.platform.export.snapshot import ExportSnapshot

PSEUDO_CATEGORIES = ("unknown", "rejected")
COCO_VERSION = "1.0"


def whole_mask(mask_path: str | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The image's defect mask file as an H × W boolean array at the image's size; ``None`` without one."""
    if not mask_path or not Path(mask_path).is_file():
        return None
    whole = load_image(mask_path, mode="L")
    if whole.shape != shape:
        whole = cv2.resize(whole, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return whole > 0


def region_mask(mask_path: str | None, shape: tuple[int, int], box: tuple[int, int, int, int],
                files: dict | None = None) -> tuple[np.ndarray, str]:
    """(H × W boolean mask of the region, ``"mask"`` or ``"box"``): see the module docstring. ``files`` keeps the
    mask files read so far, for the other regions of the same image."""
    files = {} if files is None else files
    if (mask_path, shape) not in files:
        files[(mask_path, shape)] = whole_mask(mask_path, shape)
    whole = files[(mask_path, shape)]
    x0, y0, x1, y1 = box
    mask = np.zeros(shape, bool)
    if whole is not None:
        mask[y0:y1, x0:x1] = whole[y0:y1, x0:x1]
        if mask.any():
            return mask, "mask"
    mask[y0:y1, x0:x1] = True
    return mask, "box"


def coco_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a boolean mask: run lengths in column-major order, background first."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def image_shapes(paths: Iterable[str], skip_missing: bool, progress: bool = False) -> dict[str, tuple[int, int]]:
    """(H, W) of each image from its header; a missing or unreadable one is an ``ExportError`` naming it, or left
    out with ``skip_missing``."""
    shapes, bad = {}, []
    for path in tqdm(list(dict.fromkeys(paths)), desc="image sizes", disable=not progress, unit="image"):
        try:
            shapes[path] = image_size(path)
        except (DataError, OSError) as exc:
            bad.append(f"{path} ({exc.reason if isinstance(exc, DataError) else exc})")
    if bad and not skip_missing:
        raise ExportError(f"{len(bad)} image file(s) of the store cannot be read, first {bad[0]}: restore them, or "
                          "pass --skip-missing to leave them out")
    return shapes


def _number(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _categories(snapshot: ExportSnapshot) -> tuple[list[dict], dict[str, int]]:
    """COCO categories and the category id of each pseudo status."""
    holding = [c for c in snapshot.classes if c.regions > 0]
    categories = [{"id": c.id, "name": c.name, "supercategory": "defect", "status": c.status} for c in holding]
    next_id = max([c.id for c in snapshot.classes] or [0]) + 1
    present = set(snapshot.regions["status"])
    pseudo = {}
    for status in PSEUDO_CATEGORIES:
        if status in present:
            pseudo[status] = next_id
            categories.append({"id": next_id, "name": status, "supercategory": "review", "status": status})
            next_id += 1
    return categories, pseudo


def coco_document(snapshot: ExportSnapshot, skip_missing: bool = False, progress: bool = False) -> dict:
    """The COCO dictionary of ``snapshot`` (see the module docstring); ``info`` names the model version and the
    newest decision it reflects, ``skipped_images`` the unreadable images left out with ``skip_missing``."""
    shapes = image_shapes(snapshot.images["image_path"], skip_missing, progress)
    kept = snapshot.images[snapshot.images["image_path"].isin(shapes)]
    images = [{"id": int(row.image_id), "file_name": row.image_path, "width": shapes[row.image_path][1],
               "height": shapes[row.image_path][0], "dataset": row.dataset,
               "arrived_at": row.arrived_at.isoformat()} for row in kept.itertuples()]
    categories, pseudo = _categories(snapshot)
    annotations, files, image_id = [], {}, None
    regions = snapshot.regions[snapshot.regions["image_path"].isin(shapes)].sort_values(["image_id", "region_id"])
    for row in tqdm(regions.itertuples(), total=len(regions), desc="region masks", disable=not progress,
                    unit="region"):
        if row.image_id != image_id:
            files, image_id = {}, row.image_id
        box = (int(row.x0), int(row.y0), int(row.x1), int(row.y1))
        mask, source = region_mask(row.mask_path, shapes[row.image_path], box, files)
        category = pseudo[row.status] if row.status in pseudo else int(row.class_id)
        annotations.append({
            "id": int(row.region_id), "image_id": int(row.image_id), "category_id": category,
            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area": int(mask.sum()), "iscrowd": 0,
            "segmentation": coco_rle(mask), "score": _number(row.confidence), "status": row.status,
            "confidence": _number(row.confidence), "outlier_score": _number(row.outlier_score),
            "anomaly_score": _number(row.anomaly_score), "decided_by": row.decided_by,
            "decided_at": None if pd.isna(row.decided_at) else row.decided_at.isoformat(), "mask_source": source})
    info = {"description": "anomaly-discovery: reviewed defect classes", "version": COCO_VERSION,
            "date_created": snapshot.created_at.isoformat(), **snapshot.describe()}
    skipped = sorted(set(snapshot.images["image_path"]) - set(shapes))
    return {"info": info, "images": images, "categories": categories, "annotations": annotations,
            "skipped_images": skipped}


def coco_json(document: dict) -> bytes:
    """The document as UTF-8 JSON; a NaN left anywhere is an error (missing numbers are written as null)."""
    return json.dumps(document, allow_nan=False, ensure_ascii=False).encode()
