"""External anomaly maps: read the maps another tool wrote, so any detector can feed discovery.

Formats: ``.npy`` (any numeric 2-D array), ``.png`` (8 or 16 bit grayscale; values kept as stored),
``.tif``/``.tiff`` (via tifffile). Singleton axes are dropped, so (1, H, W) and (H, W, 1) are accepted;
anything still not 2-D, NaN/inf values, and a map whose size differs from its image are refused with an
error naming the file. Where one name exists with several suffixes the first of .npy, .tiff, .tif, .png wins.

Layouts (``layout=``):

- ``"flat"``: ``<maps_dir>/<stem>.<ext>`` or ``<maps_dir>/<stem>_anomaly_map.<ext>``, by the image's stem.
- ``"anomalib"``: a tree mirroring the images' folders, as anomalib's predict output does per category and
  defect type: ``<maps_dir>/<category>/<defect_type>/<stem>[_anomaly_map].<ext>``. The map is looked up
  under the image's last parent folders (up to :data:`MIRROR_DEPTH`, longest first), both as they are and
  with split folders (test, train, val, validation) dropped. For ``mvtec/bottle/test/broken_large/000.png``
  that tries ``bottle/test/broken_large/000``, ``bottle/broken_large/000``, ``test/broken_large/000``,
  ``broken_large/000``; for ``mtd/MT_Crack/Imgs/exp1.jpg`` it tries ``mtd/MT_Crack/Imgs/exp1`` …
  ``Imgs/exp1``.

Image score: the map's maximum, unless a scores file is given or found in ``maps_dir`` (``scores.json``:
an object from key to number; ``scores.csv``: columns ``image`` and ``score``). The key of an image is its
map's path relative to ``maps_dir`` without suffix and without ``_anomaly_map`` (``000`` flat,
``bottle/broken_large/000`` mirrored); the same key with the image's suffix (``000.png``) is accepted too.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from anomaly_discovery.data.errors import DataError
from anomaly_discovery.data.images import image_size
from .protocol import Detection

MAP_SUFFIXES = (".npy", ".tiff", ".tif", ".png")
MAP_NAME_SUFFIXES = ("", "_anomaly_map")
SPLIT_FOLDERS = frozenset({"test", "train", "val", "validation"})
MIRROR_DEPTH = 3
LAYOUTS = ("flat", "anomalib")
SCORE_FILES = ("scores.json", "scores.csv")
GRAY_PNG_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "F")


class MapReadError(DataError):
    """An anomaly map that is missing, unreadable, of the wrong size or shape, or not finite."""


def read_map(path: str | Path) -> np.ndarray:
    """A finite float32 2-D map from a .npy, .png or .tif/.tiff file; refuses anything else naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MapReadError(path, "anomaly map file not found")
    readers = {".npy": _read_npy, ".tiff": tifffile.imread, ".tif": tifffile.imread, ".png": _read_png}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise MapReadError(path, f"unsupported map format {path.suffix!r}; expected one of {', '.join(MAP_SUFFIXES)}")
    try:
        array = reader(path)
    except MapReadError:
        raise
    except (OSError, ValueError, UnidentifiedImageError, tifffile.TiffFileError) as exc:
        raise MapReadError(path, f"not a readable anomaly map ({exc})") from exc
    return _checked_map(np.asarray(array), path)


def _read_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        if img.mode not in GRAY_PNG_MODES:
            raise MapReadError(path, f"expected a single-channel (grayscale) map, got PNG mode {img.mode!r}")
        return np.asarray(img)


def _checked_map(array: np.ndarray, path: Path) -> np.ndarray:
    squeezed = array.squeeze() if array.ndim > 2 else array
    if squeezed.ndim != 2 or squeezed.size == 0:
        raise MapReadError(path, f"expected a 2-D anomaly map, got an array of shape {array.shape}")
    if not (np.issubdtype(squeezed.dtype, np.number) or squeezed.dtype == np.bool_):
        raise MapReadError(path, f"expected numeric values, got dtype {squeezed.dtype}")
    result = squeezed.astype(np.float32)
    if not np.isfinite(result).all():
        bad = int((~np.isfinite(result)).sum())
        raise MapReadError(path, f"map contains {bad} NaN or infinite value(s)")
    return result


def load_scores(path: str | Path) -> dict[str, float]:
    """Image scores from ``scores.json`` ({key: number}) or a CSV with ``image`` and ``score`` columns."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise MapReadError(path, f"expected a JSON object from image key to score, got {type(raw).__name__}")
            items = list(raw.items())
        elif path.suffix.lower() == ".csv":
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames is None or not {"image", "score"} <= set(reader.fieldnames):
                    raise MapReadError(path, f"expected CSV columns 'image' and 'score', got {reader.fieldnames}")
                items = [(row["image"], row["score"]) for row in reader]
        else:
            raise MapReadError(path, "scores file must be .json or .csv")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MapReadError(path, f"not a readable scores file ({exc})") from exc
    scores = {}
    for key, value in items:
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise MapReadError(path, f"score of {key!r} is not a finite number: {value!r}")
        scores[str(key)] = score
    return scores


class ExternalMapDetector:
    """A detector whose maps were computed elsewhere: ``fit`` is a no-op, ``predict_paths`` reads the maps."""

    name = "maps"

    def __init__(self, maps_dir: str | Path, layout: str = "flat", scores_file: str | Path | None = None):
        self.maps_dir = Path(maps_dir)
        if not self.maps_dir.is_dir():
            raise DataError(self.maps_dir, "anomaly map folder not found")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        if scores_file is None:
            scores_file = next((self.maps_dir / name for name in SCORE_FILES if (self.maps_dir / name).is_file()), None)
        self.scores_file = None if scores_file is None else Path(scores_file)
        self.scores = None if self.scores_file is None else load_scores(self.scores_file)

    def fit(self, normal_images: Sequence[np.ndarray] | None = None) -> "ExternalMapDetector":
        return self

    def predict(self, images: Sequence[np.ndarray]) -> list[Detection]:
        raise TypeError(
            "ExternalMapDetector looks its maps up by image file, so it cannot predict from pixel arrays: "
            "call predict_paths(image_paths) instead"
        )

    def candidate_keys(self, image_path: str | Path) -> list[str]:
        """Map keys (relative path without suffix) to look for, most specific first."""
        image_path = Path(image_path)
        if self.layout == "flat":
            return [image_path.stem]
        folders = tuple(part for part in image_path.parent.parts if part != image_path.anchor)[-MIRROR_DEPTH:]
        keys: list[str] = []
        for depth in range(len(folders), 0, -1):
            tail = folders[len(folders) - depth:]
            for kept in (tail, tuple(folder for folder in tail if folder.lower() not in SPLIT_FOLDERS)):
                key = "/".join((*kept, image_path.stem))
                if kept and key not in keys:
                    keys.append(key)
        return keys

    def map_path(self, image_path: str | Path) -> Path:
        """The map file of an image; a clear error listing what was looked for when there is none."""
        keys = self.candidate_keys(image_path)
        for key in keys:
            for name_suffix in MAP_NAME_SUFFIXES:
                for suffix in MAP_SUFFIXES:
                    candidate = self.maps_dir / f"{key}{name_suffix}{suffix}"
                    if candidate.is_file():
                        return candidate
        tried = ", ".join(f"{key}[_anomaly_map]{{{','.join(MAP_SUFFIXES)}}}" for key in keys)
        raise MapReadError(
            image_path, f"no anomaly map for this image in {self.maps_dir} ({self.layout} layout; looked for {tried})"
        )

    def predict_paths(self, image_paths: Sequence[str | Path], progress: bool = False) -> list[Detection]:
        """One :class:`Detection` per image: its map (checked against the image's size) and its score."""
        detections = []
        for image_path in tqdm(image_paths, desc="reading maps", disable=not progress):
            image_path = Path(image_path)
            path = self.map_path(image_path)
            anomaly_map = read_map(path)
            height, width = image_size(image_path)
            if anomaly_map.shape != (height, width):
                raise MapReadError(
                    path, f"map size {anomaly_map.shape[1]}x{anomaly_map.shape[0]} (WxH) differs from the size "
                    f"{width}x{height} of its image {image_path}"
                )
            detections.append(Detection(self._score(image_path, path, anomaly_map), anomaly_map))
        return detections

    def _score(self, image_path: Path, path: Path, anomaly_map: np.ndarray) -> float:
        if self.scores is None:
            return float(anomaly_map.max())
        key = path.relative_to(self.maps_dir).with_suffix("").as_posix()
        key = key.removesuffix(MAP_NAME_SUFFIXES[1])
        for candidate in (key, key + image_path.suffix):
            if candidate in self.scores:
                return self.scores[candidate]
        raise MapReadError(self.scores_file, f"no score for key {key!r} (image {image_path})")
