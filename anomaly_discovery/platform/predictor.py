"""The model interface the review loop and the service call (issue 6 items 3–4), and the predictors behind it.

``RegionPredictor.predict(images, timings=None) -> list[PredictedImage]``: per image an anomaly score, a float
anomaly map and a boolean defect mask at the image's size, and its defect regions, each with a box, an
L2-normalised float32 embedding, and what the model itself says (its novel cluster, confidence, outlier score and
whether that is over its outlier threshold; ``None`` where it says nothing); ``timings`` (a dict) collects the
seconds of each stage. ``embed_boxes(images, boxes)`` describes given boxes the same way (how a newly activated
model re-embeds the regions already stored). ``model_version`` names the weights; ``embedding_dim`` fixes the
index's dimension.

``build_predictor(model_dir)`` reads ``model_dir/predictor.json`` (``{"kind": ..., ...}``):

* ``"pixel-stats"``: :class:`PixelStatsPredictor`, a training-free baseline (colour-deviation map, connected
  components, a fixed random projection of each region's colour/shape/gradient statistics). Used by the tests
  and the load benchmark; ``write_pixel_stats_model`` writes its folder.
* ``"discovery"``: :class:`DiscoveryRegionPredictor`, the real pipeline — a fitted PatchCore detector, the
  discovery run's map scale and binarisation level (``localisation.localise.Localisation``), its object prior,
  anomaly-centred crops, and the trained
  discovery model (embeddings, novel cluster, confidence, k-NN outlier score); ``write_discovery_model`` writes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

from anomaly_discovery.data.images import as_rgb
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.discovery.predict import DiscoveryPredictor
from anomaly_discovery.models.discovery.training import predict_regions
from anomaly_discovery.models.localisation.localise import (Localisation, LocalisedImage, image_regions,
                                                           localise_image)
from anomaly_discovery.models.localisation.mebin import MAX_LEVEL
from anomaly_discovery.models.localisation.regions import crop_region
from anomaly_discovery.models.localisation.priors.base import NoObjectPrior, ObjectPrior
from anomaly_discovery.models.localisation.priors.factory import build_object_prior

MANIFEST = "predictor.json"
Box = tuple[int, int, int, int]


@dataclass
class PredictedRegion:
    """One defect region: ``box`` (x0, y0, x1, y1; x1/y1 exclusive), unit ``embedding``, the region's anomaly
    score, and the model's own novel-class index / confidence / outlier score and outlier flag (``None`` when it
    has none)."""

    box: Box
    embedding: np.ndarray
    anomaly_score: float
    class_index: int | None = None
    confidence: float | None = None
    outlier_score: float | None = None
    is_outlier: bool | None = None


@dataclass
class PredictedImage:
    """Image-level anomaly ``score``, float32 ``anomaly_map`` and bool ``mask`` of the image's (H, W)."""

    score: float
    anomaly_map: np.ndarray
    mask: np.ndarray
    regions: list[PredictedRegion] = field(default_factory=list)


@runtime_checkable
class RegionPredictor(Protocol):
    model_version: str
    embedding_dim: int
    class_names: list[str]

    def predict(self, images: Sequence[np.ndarray], timings: dict[str, float] | None = None
                ) -> list[PredictedImage]: ...

    def embed_boxes(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]]
                    ) -> list[list[PredictedRegion]]: ...


@contextmanager
def timed(timings: dict[str, float] | None, stage: str) -> Iterator[None]:
    """Add the block's wall seconds to ``timings[stage]`` (nothing without a dict)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started


@dataclass(frozen=True)
class PixelStatsConfig:
    """``dim``: embedding size; ``z_scale``: colour deviation (in robust σ) mapped to anomaly 1.0; pixels with
    map ≥ ``mask_level`` are defect; components smaller than ``min_area`` px are dropped, at most
    ``max_regions`` (largest) kept per image; ``seed`` fixes the projection."""

    dim: int = 64
    z_scale: float = 8.0
    mask_level: float = 0.5
    min_area: int = 16
    max_regions: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 2 or self.z_scale <= 0 or not 0 < self.mask_level < 1 or self.min_area < 1 \
                or self.max_regions < 1:
            raise ValueError(f"invalid PixelStatsConfig {self}")


N_STATISTICS = 20


def region_statistics(image: np.ndarray, component: np.ndarray, box: Box) -> np.ndarray:
    """20 numbers describing a region: mean and std RGB of its pixels, mean RGB of its box, fill ratio, log
    aspect ratio, log area, and an 8-bin gradient-orientation histogram of the box (all roughly in [-1, 1])."""
    x0, y0, x1, y1 = box
    pixels = image[component].astype(np.float32) / 255.0
    crop = image[y0:y1, x0:x1].astype(np.float32) / 255.0
    grey = crop.mean(axis=2)
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    magnitude, angle = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), np.pi)
    histogram = np.bincount(np.minimum((angle / np.pi * 8).astype(int), 7).ravel(), magnitude.ravel(), 8)
    histogram = histogram / (histogram.sum() + 1e-6)
    width, height = x1 - x0, y1 - y0
    shape = [component[y0:y1, x0:x1].mean(), np.log(width / height), np.log(component.sum()) / 10.0]
    return np.concatenate([pixels.mean(0) - 0.5, pixels.std(0), crop.reshape(-1, 3).mean(0) - 0.5, shape,
                           histogram - 0.125]).astype(np.float32)


class PixelStatsPredictor:
    """Training-free baseline :class:`RegionPredictor` (see the module docstring); deterministic."""

    class_names: list[str] = []

    def __init__(self, config: PixelStatsConfig = PixelStatsConfig(), name: str | None = None):
        self.config = config
        self.embedding_dim = config.dim
        self.model_version = name or f"pixel-stats-d{config.dim}-s{config.seed}"
        self.projection_ = np.random.default_rng(config.seed).standard_normal((N_STATISTICS, config.dim)).astype(
            np.float32) / np.sqrt(config.dim)

    def anomaly_map(self, image: np.ndarray) -> np.ndarray:
        """|colour − median colour| in robust σ (1.4826 · median absolute deviation), / ``z_scale``, in [0, 1]."""
        pixels = image.reshape(-1, 3).astype(np.float32)
        distance = np.linalg.norm(pixels - np.median(pixels, axis=0), axis=1)
        sigma = 1.4826 * np.median(distance) + 1.0
        return np.clip(distance / (sigma * self.config.z_scale), 0.0, 1.0).reshape(image.shape[:2]).astype(np.float32)

    def embed(self, statistics: np.ndarray) -> np.ndarray:
        vector = statistics @ self.projection_
        return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)

    def _checked(self, image: np.ndarray) -> np.ndarray:
        image = as_rgb(np.asarray(image))
        if image.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {image.dtype}")
        return image

    def _predict_one(self, image: np.ndarray) -> PredictedImage:
        image = self._checked(image)
        anomaly_map = self.anomaly_map(image)
        mask = anomaly_map >= self.config.mask_level
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        order = [c for c in np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1
                 if stats[c, cv2.CC_STAT_AREA] >= self.config.min_area][:self.config.max_regions]
        regions = []
        for c in order:
            x, y, w, h = (int(v) for v in stats[c, :4])
            box, component = (x, y, x + w, y + h), labels == c
            regions.append(PredictedRegion(box, self.embed(region_statistics(image, component, box)),
                                           float(anomaly_map[component].max())))
        return PredictedImage(float(anomaly_map.max()), anomaly_map, mask, regions)

    def predict(self, images: Sequence[np.ndarray], timings: dict[str, float] | None = None
                ) -> list[PredictedImage]:
        with timed(timings, "detector"):
            return [self._predict_one(image) for image in images]

    def embed_boxes(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]]
                    ) -> list[list[PredictedRegion]]:
        """Each box's statistics over its defect pixels (map ≥ ``mask_level`` inside the box; the whole box when
        it holds none)."""
        described = []
        for image, image_boxes in zip(images, boxes):
            image = self._checked(image)
            anomaly_map = self.anomaly_map(image)
            regions = []
            for box in image_boxes:
                x0, y0, x1, y1 = (int(v) for v in box)
                component = np.zeros(anomaly_map.shape, bool)
                inside = anomaly_map[y0:y1, x0:x1] >= self.config.mask_level
                component[y0:y1, x0:x1] = inside if inside.any() else True
                regions.append(PredictedRegion((x0, y0, x1, y1), self.embed(region_statistics(image, component,
                                                                                              (x0, y0, x1, y1))),
                                               float(anomaly_map[component].max())))
            described.append(regions)
        return described


class DiscoveryRegionPredictor:
    """Detector → map → the run's scale and threshold, its object prior and crops (``localise_image``, the
    localisation of the detect job for one image) → discovery model."""

    def __init__(self, detector, discovery, localisation: Localisation, name: str | None = None,
                 object_prior: ObjectPrior | None = None):
        self.detector, self.discovery, self.localisation = detector, discovery, localisation
        self.object_prior = object_prior or NoObjectPrior()
        self.embedding_dim = int(discovery.prototypes.shape[1])
        self.class_names = [f"novel_{i}" for i in range(discovery.prototypes.shape[0] - discovery.n_base)]
        self.model_version = name or "discovery"

    def _localise(self, image: np.ndarray, anomaly_map: np.ndarray) -> LocalisedImage:
        """``localise_image``, except that an image without defect regions skips the object prior (its object
        mask only ever shapes crops, and such an image has none)."""
        binarised = self.localisation.binarise(anomaly_map)
        if binarised.n_regions == 0:
            return LocalisedImage(binarised, np.ones(image.shape[:2], bool), [])
        return localise_image(image, anomaly_map, self.localisation, self.object_prior)

    def _localised(self, images: list[np.ndarray], timings: dict[str, float] | None):
        with timed(timings, "detector"):
            detections = self.detector.predict(images)
        with timed(timings, "localisation"):
            return detections, [self._localise(image, detection.anomaly_map)
                                for image, detection in zip(images, detections)]

    def _described(self, regions: list, images: Sequence[np.ndarray], timings: dict[str, float] | None
                   ) -> list[PredictedRegion]:
        if not regions:
            return []
        with timed(timings, "discovery"):
            predicted = predict_regions(self.discovery, regions,
                                        {f"image{position}": image for position, image in enumerate(images)})
        flags = predicted.is_outlier
        return [PredictedRegion(region.box, predicted.embeddings[i].astype(np.float32), region.score,
                                int(predicted.clusters[i]), float(predicted.confidence[i]),
                                float(predicted.outlier_score[i]), None if flags is None else bool(flags[i]))
                for i, region in enumerate(regions)]

    def predict(self, images: Sequence[np.ndarray], timings: dict[str, float] | None = None
                ) -> list[PredictedImage]:
        images = [as_rgb(np.asarray(image)) for image in images]
        detections, localised = self._localised(images, timings)
        results, regions, owners = [], [], []
        for position, (image, detection, found) in enumerate(zip(images, detections, localised)):
            image_regions_ = image_regions(f"image{position}", image, found)
            regions += image_regions_
            owners += [position] * len(image_regions_)
            results.append(PredictedImage(float(detection.score), detection.anomaly_map.astype(np.float32),
                                          found.mebin.mask))
        for owner, region in zip(owners, self._described(regions, images, timings)):
            results[owner].regions.append(region)
        return results

    def embed_boxes(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]]
                    ) -> list[list[PredictedRegion]]:
        """Each box cropped from its image, the image's map scaled like the run's set (``Localisation``) and its
        object mask, then embedded and assigned by the discovery model."""
        images = [as_rgb(np.asarray(image)) for image in images]
        regions, counts = [], []
        for position, (image, detection, image_boxes) in enumerate(zip(images, self.detector.predict(images), boxes)):
            found = localise_image(image, detection.anomaly_map, self.localisation, self.object_prior)
            values = found.mebin.normalised_map.astype(np.float32) / MAX_LEVEL
            regions += [crop_region(image, box, values, found.object_mask, f"image{position}") for box in image_boxes]
            counts.append(len(image_boxes))
        described, ends = self._described(regions, images, None), np.cumsum(counts)
        return [described[end - count:end] for count, end in zip(counts, ends)]


def write_discovery_model(folder: str | Path, discovery, detector, localisation: Localisation,
                          name: str | None = None, object_prior: dict | None = None) -> Path:
    """Save a serving folder: the discovery model (``discovery/``), the PatchCore bank (``detector.safetensors``)
    and ``predictor.json`` with the localisation settings and the object prior the run used (the keyword
    arguments of ``build_object_prior``; none when not given)."""
    folder = Path(folder)
    discovery.save(folder / "discovery")
    detector.save(folder / "detector.safetensors")
    manifest = {"kind": "discovery", "name": name, "discovery": "discovery", "detector": "detector.safetensors",
                "localisation": localisation.__dict__, "object_prior": object_prior or {"kind": "none"}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def _load_discovery(folder: Path, manifest: dict) -> DiscoveryRegionPredictor:
    discovery = DiscoveryPredictor.load(folder / manifest.get("discovery", "discovery"), device="cpu")
    detector = PatchCoreDetector.load(folder / manifest.get("detector", "detector.safetensors"), device="cpu",
                                      progress=False)
    prior, _ = build_object_prior(**manifest.get("object_prior", {"kind": "none"}))
    return DiscoveryRegionPredictor(detector, discovery, Localisation(**manifest["localisation"]), manifest.get("name"),
                                    prior)


def write_pixel_stats_model(folder: str | Path, config: PixelStatsConfig = PixelStatsConfig(),
                            name: str | None = None) -> Path:
    """Write ``folder/predictor.json`` describing a :class:`PixelStatsPredictor`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"kind": "pixel-stats", "name": name, "config": config.__dict__}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def build_predictor(model_dir: str | Path) -> RegionPredictor:
    """The predictor saved in ``model_dir`` (its ``predictor.json`` names the kind)."""
    folder = Path(model_dir)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {MANIFEST}: not a saved predictor folder")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path} is not valid JSON: {exc}") from exc
    kind = manifest.get("kind")
    if kind == "pixel-stats":
        return PixelStatsPredictor(PixelStatsConfig(**manifest.get("config", {})), manifest.get("name"))
    if kind == "discovery":
        return _load_discovery(folder, manifest)
    raise ValueError(f"{manifest_path} names an unknown predictor kind {kind!r} (known: 'pixel-stats', 'discovery')")
