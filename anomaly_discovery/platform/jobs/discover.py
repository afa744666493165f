"""The discovery job behind ``adisc discover``: regions from detection → discovery training → assignments.

Novel regions come from an ``adisc detect`` output folder (``--detections``: its summary.json, each image's
set-normalised map Ã ``anomaly_map.png`` and ``object_mask.png``) or from running detection first. The known
(base) classes come from ``--base``: ``neu:PATH`` (NEU-DET crops around the labelled boxes), ``synthetic:PATH``
(a generated data set's defect crops around their ground-truth masks, from a product other than the one being
discovered) or ``none``. Labels and masks of the images being discovered are never read here: only the
scorer (``adisc evaluate``) does.

Outputs in ``--out``: ``summary.json`` (kind "discover", read by ``adisc evaluate``), ``assignments.csv`` (one
row per region), ``model/`` (safetensors weights, prototypes, JSON settings) and ``checkpoints/``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from anomaly_discovery.config import config_from_dict, config_to_dict, load_config
from anomaly_discovery.data import DataError, LayoutError, Sample, load_image, read_dataset
from anomaly_discovery.data.readers import detect_format
from anomaly_discovery.models.discovery.training import DiscoveryArtifacts, train_discovery
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.discovery.frozen import region_images
from anomaly_discovery.models.localisation.regions import (Region, base_regions_from_boxes, base_regions_from_mask,
                                                           crop_region, novel_regions)
from .detect import DETECTORS, FITTED_ON_NORMALS, SUMMARY_FILE, DetectConfig, run_detect, split_for_detector

BASE_KINDS = ("neu", "synthetic")


@dataclass
class DiscoverJobConfig:
    """One ``adisc discover`` run. ``k`` is an integer or "auto"; ``base`` is ``neu:PATH``, ``synthetic:PATH``
    or ``none``; ``base_per_class`` caps the base images per class (chosen at random with ``seed``). Without
    ``detections`` the detector runs first with ``detect_backbone``, ``detect_image_size`` and ``object_prior``."""

    data: Path
    out: Path
    format: str = "auto"
    detector: str = "patchcore"
    detect_backbone: str = "mobilenet_v2"
    detect_image_size: int | None = None
    object_prior: str = "auto"
    detections: Path | None = None
    k: int | str = "auto"
    base: str = "none"
    base_per_class: int = 80
    base_product: str | None = None
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    split_file: Path | None = None
    masks: Path | None = None
    skip_bad: bool = False
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.k = parse_k(self.k)
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        parse_base(self.base)
        if self.base_per_class < 1:
            raise ValueError(f"base_per_class must be at least 1, got {self.base_per_class}")


def parse_k(value: int | str) -> int | str:
    """``"auto"`` or a positive integer (also given as a string)."""
    if value == "auto":
        return value
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--k must be a positive integer or auto, got {value!r}") from None
    if k < 1:
        raise ValueError(f"--k must be a positive integer or auto, got {value!r}")
    return k


def parse_base(spec: str) -> tuple[str, Path | None]:
    """``none`` → ("none", None); ``neu:PATH`` / ``synthetic:PATH`` → (kind, PATH)."""
    if spec == "none":
        return "none", None
    kind, _, path = spec.partition(":")
    if kind not in BASE_KINDS or not path:
        raise ValueError(f"--base must be none, neu:PATH or synthetic:PATH, got {spec!r}")
    return kind, Path(path)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(path, f"not valid JSON ({exc})") from exc


def regions_from_detect_output(folder: Path, progress: bool = True) -> tuple[list[Region], dict[str, str], dict]:
    """Novel regions of every image of an ``adisc detect`` output, their image paths by id, and its config."""
    folder = Path(folder)
    summary = _read_json(folder / SUMMARY_FILE)
    if summary.get("kind") != "detect":
        raise DataError(folder / SUMMARY_FILE, f"not an `adisc detect` summary (kind {summary.get('kind')!r})")
    regions, paths = [], {}
    for record in tqdm(summary["images"], desc="reading detections", disable=not progress):
        image_dir = folder / "images" / record["id"]
        map_path = image_dir / "anomaly_map.png"
        if not map_path.is_file():
            raise DataError(map_path, "the normalised anomaly map is missing (was detect run without images?)")
        image = load_image(record["image"])
        normalised = load_image(map_path, mode="L").astype(np.float32) / 255.0
        object_path = image_dir / "object_mask.png"
        objects = load_image(object_path, mode="L") > 0 if object_path.is_file() else None
        paths[record["id"]] = record["image"]
        for entry in record["regions"]:
            regions.append(crop_region(image, entry["box"], normalised, objects, record["id"], entry["score"],
                                       entry["area"]))
    return regions, paths, summary.get("config", {})


def regions_from_detection(config: DiscoverJobConfig) -> tuple[list[Region], dict[str, str], dict]:
    """Run ``adisc detect`` into ``<out>/detect`` and turn its crops into novel regions."""
    detect_config = DetectConfig(data=config.data, out=Path(config.out) / "detect", format=config.format,
                                 detector=config.detector, backbone=config.detect_backbone,
                                 image_size=config.detect_image_size, object_prior=config.object_prior,
                                 device=config.device, seed=config.seed,
                                 split_file=config.split_file, masks=config.masks, skip_bad=config.skip_bad,
                                 progress=config.progress)
    summary = run_detect(detect_config)
    regions, paths = [], {}
    for result in summary.results:
        image = load_image(result.sample.image_path)
        paths[result.image_id] = str(result.sample.image_path)
        regions += novel_regions(result.image_id, image, result.crops, result.mebin.normalised_map,
                                 result.object_mask)
    return regions, paths, config_to_dict(detect_config)


def normal_images_of(detect_config: dict) -> list[str]:
    """The defect-free images the detector learned from (none for a zero-shot detector or external maps): read
    again from the data set the detect run names; discovery removes their main variation from its views."""
    detector = detect_config.get("detector")
    if detector not in FITTED_ON_NORMALS or detect_config.get("data") is None:
        return []
    data = Path(detect_config["data"])
    data_format = detect_config.get("format") or "auto"
    data_format = detect_format(data) if data_format == "auto" else data_format
    split_file = detect_config.get("split_file")
    report = read_dataset(data, data_format, skip_bad=True, split_file=Path(split_file) if split_file else None,
                          masks_root=Path(detect_config["masks"]) if detect_config.get("masks") else None,
                          check=False)
    fit, _ = split_for_detector(report.samples, detector)
    return [str(s.image_path) for s in fit]


def subset_by_class(items: list, label_of, per_class: int, seed: int) -> list:
    """At most ``per_class`` items of each label (``label_of(item)``), chosen at random with ``seed``, in order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted({label_of(item) for item in items}):
        members = [item for item in items if label_of(item) == label]
        chosen += [members[i] for i in sorted(rng.permutation(len(members))[:per_class])]
    return chosen


def neu_base_regions(root: Path, per_class: int, seed: int, progress: bool = True) -> list[Region]:
    """NEU-DET crops around the labelled boxes (≤ 2 per image) of ``per_class`` images per class."""
    samples: list[Sample] = read_dataset(root, "neu", check=False).samples
    regions = []
    for sample in tqdm(subset_by_class(samples, lambda s: s.label, per_class, seed), desc="base crops (NEU-DET)",
                       disable=not progress):
        regions += base_regions_from_boxes(load_image(sample.image_path), sample.boxes, str(sample.image_path))
    return regions


def _discovered_product(data: Path, root: Path, products: list[str]) -> str | None:
    data, root = Path(data).resolve(), Path(root).resolve()
    for product in products:
        if data == root / product or (root / product) in data.parents:
            return product
    return None


def synthetic_base_regions(root: Path, data: Path, per_class: int, seed: int, product: str | None = None,
                           progress: bool = True) -> list[Region]:
    """Generated defect crops around their ground-truth masks (≤ 2 per image) from ``product`` (default: the
    first product that is not the one being discovered), ``per_class`` images per defect type."""
    root = Path(root)
    metadata = _read_json(root / "metadata.json")
    products = list(metadata.get("products", []))
    discovered = _discovered_product(data, root, products)
    if Path(data).resolve() == root.resolve():
        raise ValueError(f"--base synthetic:{root} is the data set being discovered; generate another one")
    if product is None:
        product = next((p for p in products if p != discovered), None)
    if product is None or product not in products:
        raise ValueError(f"no product to take base classes from in {root} (products {products}, discovering "
                         f"{discovered}); pass another generated data set")
    if product == discovered:
        raise ValueError(f"base product {product!r} is the product being discovered ({data})")
    records = [r for r in metadata["images"] if r["product"] == product and r.get("mask_path")]
    regions = []
    for record in tqdm(subset_by_class(records, lambda r: r["label"], per_class, seed),
                       desc=f"base crops ({product})", disable=not progress):
        objects = (load_image(root / record["object_mask_path"], mode="L") > 0
                   if record.get("object_mask_path") else None)
        regions += base_regions_from_mask(load_image(root / record["image_path"]),
                                          load_image(root / record["mask_path"], mode="L") > 0, record["label"],
                                          str(root / record["image_path"]), objects)
    return regions


def build_base(config: DiscoverJobConfig) -> tuple[list[Region] | None, str]:
    kind, path = parse_base(config.base)
    if kind == "none":
        return None, "none"
    if not path.exists():
        raise LayoutError(path, f"--base {kind} data set not found")
    if kind == "neu":
        regions = neu_base_regions(path, config.base_per_class, config.seed, config.progress)
    else:
        regions = synthetic_base_regions(path, config.data, config.base_per_class, config.seed,
                                         config.base_product, config.progress)
    classes = sorted({r.class_name for r in regions})
    return regions, f"{kind} ({len(regions)} crops, {len(classes)} classes: {', '.join(classes)})"


def view_lines(metrics: dict, k_estimated: bool = False) -> list[str]:
    """What the view models chose without labels: the view weights and which variation they removed (and, when the
    run's own images were kept as defect kinds, how to say they are a product's variants)."""
    if "view_weights" not in metrics:
        return []
    weights = ", ".join(f"{name} {w:.2f}" for name, w in metrics["view_weights"].items())
    silhouette = metrics.get("own_images_silhouette")
    measured = ("" if silhouette is None else
                f" (their silhouette at {metrics.get('own_images_groups')} groups: {silhouette:.3f})")
    kept = ("" if silhouette is None else "; the run's own images form tight groups, taken for defect kinds: if they "
            "are the product's variants instead, set `own_projection: always` in --config"
            + (" or give --k" if k_estimated else ""))
    removed = {"normal images": "the normal images' main variation removed",
               "own images": f"no normal images: the run's own images' main variation removed{measured}",
               "none": f"nothing removed{measured}{kept}"}[metrics["nuisance_projection"]]
    return [f"views: {weights}; {removed}"]


@dataclass
class DiscoverSummary:
    config: DiscoverJobConfig
    artifacts: DiscoveryArtifacts
    image_paths: dict[str, str]
    regions: list[Region]
    base_description: str
    data_format: str
    seconds: dict[str, float]

    def describe(self) -> str:
        artifacts = self.artifacts
        votes = artifacts.metrics.get("k_votes")
        criteria = ": " + ", ".join(f"{name} {k}" for name, k in votes.items()) if votes else ""
        k_text = (f"K = {artifacts.k} (estimated, {artifacts.predictor.config.classes.k_method}{criteria})"
                  if artifacts.k_estimated is not None else f"K = {artifacts.k} (given)")
        sizes = np.bincount([p.label for p in artifacts.images.values()], minlength=artifacts.k)
        metrics = artifacts.metrics
        lines = [f"discovered {k_text} novel classes in {len(artifacts.images)} images ({len(self.regions)} regions)",
                 "images per class: " + ", ".join(f"novel_{i} {n}" for i, n in enumerate(sizes)),
                 f"base set: {self.base_description}",
                 f"silhouette {metrics.get('silhouette', float('nan')):.3f}, "
                 + ("no training (frozen views)" if metrics.get("loss") is None else f"final loss {metrics['loss']:.3f}")
                 + (f", base validation accuracy {metrics['base_val_accuracy']:.3f}, outlier threshold "
                    f"{metrics['outlier_threshold']:.3f}" if "base_val_accuracy" in metrics else ""),
                 *view_lines(metrics, artifacts.k_estimated is not None),
                 *metrics.get("notes", []),
                 "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()),
                 f"written to {self.config.out}"]
        return "\n".join(lines)


def _region_rows(summary: DiscoverSummary) -> dict[str, list[dict]]:
    predictions = summary.artifacts.regions
    rows: dict[str, list[dict]] = {}
    for index, region in enumerate(summary.regions):
        flag = predictions.is_outlier
        rows.setdefault(region.image_id, []).append({
            "box": list(region.box), "class": f"novel_{int(predictions.clusters[index])}",
            "confidence": float(predictions.confidence[index]),
            "outlier_score": float(predictions.outlier_score[index]),
            "is_outlier": None if flag is None else bool(flag[index]),
            "energy": float(predictions.energy[index]), "score": region.score, "area": region.area})
    return rows


def write_outputs(summary: DiscoverSummary) -> Path:
    """summary.json, assignments.csv and the model folder under ``config.out``."""
    out = Path(summary.config.out)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = summary.artifacts
    threshold = artifacts.predictor.outlier_threshold
    region_rows = _region_rows(summary)
    images = []
    for image_id, prediction in artifacts.images.items():
        score = artifacts.image_outlier_scores[image_id]
        images.append({"id": image_id, "image": summary.image_paths[image_id], "class": f"novel_{prediction.label}",
                       "confidence": artifacts.image_confidence[image_id], "outlier_score": score,
                       "is_outlier": None if threshold is None else bool(score > threshold),
                       "regions": region_rows[image_id]})
    job = config_to_dict(summary.config) | {"format": summary.data_format,
                                            "discovery": artifacts.predictor.config.fingerprint()}
    payload = {"kind": "discover", "config": job, "k": artifacts.k, "k_estimated": artifacts.k_estimated,
               "k_scores": {str(k): v for k, v in (artifacts.k_scores or {}).items()},
               "base_classes": artifacts.predictor.base_classes, "outlier_threshold": threshold,
               "metrics": artifacts.metrics, "seconds": summary.seconds, "history": artifacts.history,
               "images": images}
    tmp = out / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out / SUMMARY_FILE)
    with open(out / "assignments.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "image", "image_class", "image_confidence", "image_outlier_score", "region",
                         "x0", "y0", "x1", "y1", "region_class", "region_confidence", "region_outlier_score"])
        for record in images:
            for index, region in enumerate(record["regions"]):
                writer.writerow([record["id"], record["image"], record["class"], f"{record['confidence']:.4f}",
                                 f"{record['outlier_score']:.4f}", index, *region["box"], region["class"],
                                 f"{region['confidence']:.4f}", f"{region['outlier_score']:.4f}"])
    artifacts.predictor.save(out / "model")
    return out / SUMMARY_FILE


def run_discover(config: DiscoverJobConfig) -> DiscoverSummary:
    """Regions (from a detect output or a fresh detection), base set, training, outputs."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if config.detections is not None:
        regions, paths, detect_config = regions_from_detect_output(config.detections, config.progress)
    else:
        regions, paths, detect_config = regions_from_detection(config)
    data_format = detect_config.get("format", config.format)
    if data_format in (None, "auto"):
        data_format = detect_format(detect_config.get("data", config.data))
    seconds["regions"] = time.perf_counter() - start
    start = time.perf_counter()
    base, base_description = build_base(config)
    seconds["base"] = time.perf_counter() - start
    discovery = config.discovery.replace(
        k=config.k, seed=config.seed, device=config.device, progress=config.progress,
        checkpoint_dir=config.discovery.runtime.checkpoint_dir or str(Path(config.out) / "checkpoints"))
    start = time.perf_counter()
    artifacts = train_discovery(discovery, regions, base, images=region_images(paths, base or []),
                                normal_images=normal_images_of(detect_config))
    seconds["train"] = time.perf_counter() - start
    summary = DiscoverSummary(config, artifacts, paths, regions, base_description, data_format, seconds)
    write_outputs(summary)
    return summary


def run_discover_cli(args) -> int:
    """``adisc discover``: settings file first (``--config``), then the command line's --k, --seed, --device."""
    discovery = load_config(DiscoveryConfig, args.config) if args.config else DiscoveryConfig()
    if args.model is not None:
        discovery = discovery.replace(kind=args.model)
    config = config_from_dict(DiscoverJobConfig, {
        "data": args.data, "out": args.out, "format": args.format, "detector": args.detector,
        "detections": args.detections, "k": args.k, "base": args.base, "discovery": discovery,
        "split_file": args.split_file, "masks": args.masks, "skip_bad": args.skip_bad, "device": args.device,
        "seed": args.seed, "progress": not args.quiet}, "adisc discover")
    summary = run_discover(config)
    print(summary.describe())
    return 0
