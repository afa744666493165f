"""``adisc evaluate``: score an output folder against the dataset's labels and masks.

This is the only place where ground truth of the images being detected or discovered is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomaly_discovery.data import NORMAL_LABEL, DataError, load_mask, read_dataset
from anomaly_discovery.models.metrics import aupro, clustering_report, image_auroc, pixel_auroc


@dataclass
class EvaluationReport:
    kind: str
    metrics: dict[str, float]
    n_images: int
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        values = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.metrics.items())
        return "\n".join([f"{self.kind} output, {self.n_images} images: {values}", *self.notes])


def read_summary(output: Path) -> dict:
    path = Path(output) / "summary.json"
    if not path.is_file():
        raise DataError(path, "not an adisc output folder: summary.json is missing")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(path, f"summary is not valid JSON ({exc})") from exc


def ground_truth(summary: dict, data: Path | None, format: str | None, split_file: Path | None) -> dict:
    """image path → Sample, from the dataset the output was made from (or the one given)."""
    config = summary.get("config", {})
    root = Path(data or config["data"])
    report = read_dataset(root, format or config.get("format", "auto"), check=False,
                          split_file=split_file or config.get("split_file"), masks_root=config.get("masks"))
    return {str(s.image_path.resolve()): s for s in report.samples}


def evaluate_detection(output: Path, summary: dict, truth: dict) -> EvaluationReport:
    """Image AUROC over every image; pixel AUROC and AUPRO over the images whose ground truth is known (normal
    images, defect images with a mask), with a note naming the defect images left out for lack of a mask."""
    labels, scores, masks, maps, notes = [], [], [], [], []
    without_mask = 0
    for record in summary["images"]:
        sample = truth.get(str(Path(record["image"]).resolve()))
        if sample is None or sample.label is None:
            raise DataError(Path(record["image"]), "no label for this image in the dataset")
        labels.append(sample.label != NORMAL_LABEL)
        scores.append(record["score"])
        map_path = Path(output) / "images" / record["id"] / "anomaly_map.npy"
        if not map_path.is_file():
            continue
        if sample.label != NORMAL_LABEL and sample.mask_path is None:
            without_mask += 1
            continue
        anomaly_map = np.load(map_path).astype(np.float32)
        masks.append(load_mask(sample.mask_path, anomaly_map.shape) if sample.mask_path is not None
                     else np.zeros(anomaly_map.shape, bool))
        maps.append(anomaly_map)
    metrics = {"image_auroc": image_auroc(np.array(labels), np.array(scores))}
    if masks and any(m.any() for m in masks):
        metrics["pixel_auroc"] = pixel_auroc(masks, maps)
        metrics["aupro"] = aupro(masks, maps)
        if without_mask:
            notes.append(f"{without_mask} defect images have no pixel mask: pixel AUROC and AUPRO are computed over "
                         f"the other {len(masks)} images")
    else:
        notes.append(f"no pixel masks available{f' for the {without_mask} defect images' if without_mask else ''}: "
                     "pixel AUROC and AUPRO not computed (image AUROC needs only the labels)")
    return EvaluationReport("detect", metrics, len(labels), notes)


def evaluate_discovery(summary: dict, truth: dict) -> EvaluationReport:
    y_true, y_pred = [], []
    for record in summary["images"]:
        sample = truth.get(str(Path(record["image"]).resolve()))
        if sample is None or sample.label is None:
            raise DataError(Path(record["image"]), "no label for this image in the dataset")
        y_true.append(sample.label)
        y_pred.append(record["class"])
    report = clustering_report(np.array(y_true), np.array(y_pred))
    metrics = {k: report[k] for k in ("nmi", "ari", "f1", "f1_macro")}
    metrics["k_predicted"] = int(report["n_clusters_pred"])
    metrics["k_true"] = int(report["n_classes_true"])
    return EvaluationReport("discover", metrics, len(y_true))


def evaluate_output(output: str | Path, data: Path | None = None, format: str | None = None,
                    split_file: Path | None = None) -> EvaluationReport:
    summary = read_summary(Path(output))
    truth = ground_truth(summary, data, format, split_file)
    if summary.get("kind") == "detect":
        return evaluate_detection(Path(output), summary, truth)
    if summary.get("kind") == "discover":
        return evaluate_discovery(summary, truth)
    raise DataError(Path(output) / "summary.json", f"unknown output kind {summary.get('kind')!r}")
