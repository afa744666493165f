"""The detect-and-localise job behind ``adisc detect``: detector → anomaly maps → MEBin → object prior → crops.

Which images a detector learns from follows its kind: PatchCore and PRN fit on the normal training images
(PRN also on at most 10 real anomalies, which are then left out of every output and evaluation); the
zero-shot detector and external maps use no training images. Every test image is predicted. Labels and
ground-truth masks are never read here, except the ≤ 10 anomalies PRN is allowed to train on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from anomaly_discovery.config import config_to_dict
from anomaly_discovery.data import DataError, Sample, load_image, load_mask, read_dataset, save_image
from anomaly_discovery.models.localisation.crops import Crop
from anomaly_discovery.models.detectors.protocol import Detection
from anomaly_discovery.models.localisation.localise import localise_set
from anomaly_discovery.models.localisation.mebin import MEBinResult
from anomaly_discovery.models.localisation.priors.factory import build_object_prior

DETECTORS = ("patchcore", "zero-shot", "prn", "ensemble", "maps")
FITTED_ON_NORMALS = ("patchcore", "prn", "ensemble")
TRAINED_ON_REAL_ANOMALIES = ("prn", "ensemble")
SUMMARY_FILE = "summary.json"


@dataclass
class DetectConfig:
    data: Path
    out: Path
    format: str = "auto"
    detector: str = "patchcore"
    backbone: str = "mobilenet_v2"
    weights: Path | None = None
    maps: Path | None = None
    prn_model: Path | None = None
    object_prior: str = "auto"
    prior_prompt: str = "product"
    sam_checkpoint: Path | None = None
    grounding_config: Path | None = None
    grounding_checkpoint: Path | None = None
    text_encoder: Path | None = None
    image_size: int | None = None
    batch_size: int = 16
    device: str = "auto"
    skip_bad: bool = False
    split_file: Path | None = None
    masks: Path | None = None
    seed: int = 0
    progress: bool = True
    write_images: bool = True

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        if self.detector == "maps" and self.maps is None:
            raise ValueError("--detector maps needs --maps FOLDER (the maps another tool wrote)")
        if self.prn_model is not None and self.detector != "prn":
            raise ValueError(f"--prn-model is a saved PRN detector: use it with --detector prn, not {self.detector}")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")


@dataclass
class ImageResult:
    """Everything detection and localisation learned about one image."""

    image_id: str
    sample: Sample
    detection: Detection
    mebin: MEBinResult
    object_mask: np.ndarray
    crops: list[Crop]


@dataclass
class DetectSummary:
    config: DetectConfig
    results: list[ImageResult]
    n_fit_images: int
    held_out: list[Sample]
    prior_used: str
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    detector: object = None

    @property
    def detector_image_size(self) -> int | None:
        """The input side the detector ran at (its own default unless the config set one; None for maps)."""
        if self.config.image_size is not None:
            return self.config.image_size
        return getattr(self.detector, "image_size", None)

    def describe(self) -> str:
        n_regions = sum(len(r.crops) for r in self.results)
        lines = [
            f"detector {self.config.detector} ({self.config.backbone}) fitted on {self.n_fit_images} normal images; "
            f"{len(self.results)} images scored, {n_regions} regions cropped",
            f"object prior: {self.prior_used}",
            "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()),
        ]
        if self.held_out:
            lines.append(f"{len(self.held_out)} real anomalies used to train PRN are left out of the outputs")
        if self.skipped:
            lines.append(f"{self.skipped} bad files skipped")
        lines.append(f"written to {self.config.out}")
        return "\n".join(lines)


def image_id(sample: Sample, root: Path) -> str:
    """The image's path below the dataset root as given (never resolved: a dataset folder of symlinks keeps
    its own layout), without its suffix, parts joined by ``__``: ``test/crack/000.png`` → ``test__crack__000``."""
    relative = Path(os.path.relpath(sample.image_path, root))
    if relative.parts[:1] == ("..",) or relative.is_absolute():
        raise DataError(sample.image_path, f"image is not inside the dataset folder {root}")
    return "__".join(relative.with_suffix("").parts)


def image_ids(samples: list[Sample], root: Path) -> list[str]:
    """:func:`image_id` of every sample; two images with one id (``a.png`` and ``a.jpg`` side by side, or
    ``a__b/c.png`` and ``a/b__c.png``) are an error naming both, since their outputs would overwrite each other."""
    ids, first = [], {}
    for sample in samples:
        found = image_id(sample, root)
        if found in first:
            raise DataError(sample.image_path, f"its output id {found!r} is also the id of {first[found]}: rename "
                                               "one of the two files (outputs are written per id)")
        first[found] = sample.image_path
        ids.append(found)
    return ids


def split_for_detector(samples: list[Sample], detector: str) -> tuple[list[Sample], list[Sample]]:
    """(images to fit on, images to predict) for a detector kind."""
    test = [s for s in samples if s.split == "test"]
    if detector in FITTED_ON_NORMALS:
        normal_train = [s for s in samples if s.split == "train" and s.is_normal]
        if not normal_train:
            raise ValueError(f"the {detector} detector needs normal training images (train/good); none were "
                             "found: use --detector zero-shot for data without defect-free images")
        return normal_train, test
    return [], test or samples


def ensemble_backbones(config: DetectConfig) -> tuple[str, ...]:
    """The ensemble's PatchCore backbones: its default pair on the default backbone with its own weights, else the
    configured backbone alone (weights given by path belong to one network)."""
    from anomaly_discovery.models.detectors.ensemble import PATCHCORE_BACKBONES

    default = config.backbone == DetectConfig.backbone and config.weights is None
    return PATCHCORE_BACKBONES if default else (config.backbone,)


def build_detector(config: DetectConfig):
    """The configured detector; ``image_size`` None keeps the detector's own default input size."""
    sizing = {} if config.image_size is None else {"image_size": config.image_size}
    if config.detector == "patchcore":
        from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector

        return PatchCoreDetector(backbone=config.backbone, weights=config.weights, batch_size=config.batch_size,
                                 device=config.device, seed=config.seed, progress=config.progress, **sizing)
    if config.detector == "zero-shot":
        from anomaly_discovery.models.detectors.mutual_scoring import MutualScoringDetector

        return MutualScoringDetector(backbone=config.backbone, weights=config.weights, batch_size=config.batch_size,
                                     device=config.device, seed=config.seed, progress=config.progress, **sizing)
    if config.detector in ("prn", "ensemble"):
        from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector

        if config.prn_model is not None:
            return PRNDetector.load(config.prn_model, device=config.device)
        prn = PRNDetector(PRNConfig(encoder=config.backbone, device=config.device, seed=config.seed,
                                    progress=config.progress, **sizing))
        if config.detector == "prn":
            return prn
        from anomaly_discovery.models.detectors.ensemble import DetectorEnsemble, patchcore_member

        patchcores = [patchcore_member(backbone, weights=config.weights, batch_size=config.batch_size,
                                       device=config.device, seed=config.seed, progress=config.progress, **sizing)
                      for backbone in ensemble_backbones(config)]
        return DetectorEnsemble(members=(*patchcores, prn), seed=config.seed)
    from anomaly_discovery.models.detectors.external_maps import ExternalMapDetector

    layout = "anomalib" if any(p.is_dir() for p in Path(config.maps).iterdir()) else "flat"
    return ExternalMapDetector(config.maps, layout=layout)


def _load_all(samples: list[Sample], progress: bool, desc: str) -> list[np.ndarray]:
    return [load_image(s.image_path) for s in tqdm(samples, desc=desc, disable=not progress)]


def fit_detector(detector, config: DetectConfig, fit_samples: list[Sample], test_samples: list[Sample]):
    """Fit; for PRN (alone or in the ensemble) also choose ≤ 10 real anomalies and return the test images left for
    evaluation (a saved PRN is not fitted again: the anomalies it trained on, picked the same way, are left out)."""
    if config.detector in ("zero-shot", "maps"):
        return detector.fit(None), test_samples, []
    if config.prn_model is not None:
        from anomaly_discovery.models.detectors.prn_training import select_real_anomalies

        chosen, rest = select_real_anomalies(test_samples, n=detector.n_real_anomalies_, seed=detector.config.seed)
        return detector, rest, chosen
    normal_images = _load_all(fit_samples, config.progress, "loading normal images")
    if config.detector not in TRAINED_ON_REAL_ANOMALIES:
        return detector.fit(normal_images), test_samples, []
    from anomaly_discovery.models.detectors.prn_training import select_real_anomalies

    chosen, rest = select_real_anomalies(test_samples, seed=config.seed)
    anomalies = [(load_image(s.image_path), load_mask(s.mask_path)) for s in chosen if s.mask_path is not None]
    return detector.fit(normal_images, real_anomalies=anomalies), rest, chosen


def predict_all(detector, config: DetectConfig, samples: list[Sample]) -> list[Detection]:
    """Batched prediction; the zero-shot detector scores each image against the others, so it sees the set."""
    if config.detector == "maps":
        return detector.predict_paths([s.image_path for s in samples], progress=config.progress)
    if config.detector == "zero-shot":
        return detector.predict(_load_all(samples, config.progress, "loading images"))
    detections: list[Detection] = []
    batches = range(0, len(samples), config.batch_size)
    for start in tqdm(batches, desc=f"{config.detector} predict", disable=not config.progress):
        batch = samples[start:start + config.batch_size]
        detections.extend(detector.predict([load_image(s.image_path) for s in batch]))
    return detections


def write_outputs(summary: DetectSummary, data_format: str) -> Path:
    """Per image: map (.npy float16 and a joint-scale .png), MEBin mask, object mask, crops; plus summary.json."""
    out = Path(summary.config.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for result in summary.results:
        folder = out / "images" / result.image_id
        regions = []
        for k, crop in enumerate(result.crops):
            crop_path, mask_path = folder / f"crop_{k}.png", folder / f"crop_{k}_mask.png"
            if summary.config.write_images:
                save_image(crop_path, crop.image)
                save_image(mask_path, crop.mask)
            regions.append({"box": [int(v) for v in crop.box], "score": float(crop.score), "area": int(crop.area),
                            "crop": str(crop_path.relative_to(out)), "mask": str(mask_path.relative_to(out))})
        if summary.config.write_images:
            np.save(folder / "anomaly_map.npy", result.detection.anomaly_map.astype(np.float16))
            save_image(folder / "anomaly_map.png", result.mebin.normalised_map)
            save_image(folder / "mebin_mask.png", result.mebin.mask)
            save_image(folder / "object_mask.png", result.object_mask)
        records.append({"id": result.image_id, "image": str(result.sample.image_path), "split": result.sample.split,
                        "score": float(result.detection.score), "mebin_threshold": int(result.mebin.threshold),
                        "n_regions": int(result.mebin.n_regions), "regions": regions})
    payload = {
        "kind": "detect",
        "config": config_to_dict(summary.config) | {"format": data_format},
        "detector_image_size": summary.detector_image_size,
        "object_prior": summary.prior_used,
        "n_fit_images": summary.n_fit_images,
        "held_out_for_training": [str(s.image_path) for s in summary.held_out],
        "seconds": summary.seconds,
        "images": records,
    }
    tmp = out / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out / SUMMARY_FILE)
    return out / SUMMARY_FILE


def run_detect(config: DetectConfig) -> DetectSummary:
    """Read the dataset, detect, localise, and (with ``write_images``) write everything under ``config.out``."""
    from anomaly_discovery.data.readers import detect_format

    data_format = detect_format(config.data) if config.format == "auto" else config.format
    report = read_dataset(config.data, data_format, skip_bad=config.skip_bad, split_file=config.split_file,
                          masks_root=config.masks)
    fit_samples, test_samples = split_for_detector(report.samples, config.detector)
    id_of = dict(zip([s.image_path for s in test_samples], image_ids(test_samples, Path(config.data))))
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    detector = build_detector(config)
    detector, test_samples, held_out = fit_detector(detector, config, fit_samples, test_samples)
    seconds["fit"] = time.perf_counter() - start

    start = time.perf_counter()
    detections = predict_all(detector, config, test_samples)
    seconds["predict"] = time.perf_counter() - start

    start = time.perf_counter()
    prior, prior_used = build_object_prior(
        config.object_prior, sam_checkpoint=config.sam_checkpoint, grounding_config=config.grounding_config,
        grounding_checkpoint=config.grounding_checkpoint, text_encoder_path=config.text_encoder,
        prompt=config.prior_prompt)
    localised = localise_set((load_image(s.image_path) for s in test_samples), [d.anomaly_map for d in detections],
                             prior, progress=config.progress)
    seconds["localise"] = time.perf_counter() - start

    results = [ImageResult(id_of[s.image_path], s, d, x.mebin, x.object_mask, x.crops)
               for s, d, x in zip(test_samples, detections, localised)]
    summary = DetectSummary(config, results, len(fit_samples), held_out, prior_used, seconds, len(report.skipped),
                            detector)
    start = time.perf_counter()
    write_outputs(summary, data_format)
    seconds["write"] = time.perf_counter() - start
    return summary
