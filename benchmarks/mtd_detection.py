"""Detection quality and speed on MTD: image AUROC, pixel AUROC, AUPRO and images/s for each detector.

Usage: python benchmarks/mtd_detection.py [--data ../shared/datasets/mtd]
       [--detectors patchcore zero-shot prn ensemble] [--threads 1] [--neu ../shared/datasets/neu-det]
       [--anomalib-python /tmp/anomalib-venv/bin/python] [--tag NAME]

Protocol (../shared/datasets/README.md): fit on the normal training images of the split file (761), test on
the 392 defect images + the 191 normal test images; normal test images get all-zero masks. Every detector
runs with the defaults its module chose on synthetic data (nothing is tuned on MTD labels).
- ``patchcore``: fit on the normal training images, then predict the test images.
- ``zero-shot``: no fit; ONE predict call over all test images (each is scored against the others).
- ``prn``: fit on the normal training images and 10 real anomalies picked by ``select_real_anomalies``; those
  10 are left out of PRN's evaluation. Every detector is also scored on PRN's evaluation set
  (``on_prn_eval_set``) so all can be compared on the same images.
- ``ensemble``: ``DetectorEnsemble`` (PatchCore + PRN, their defaults, standardised on 10% of the normal
  training images held back from both and averaged; offered after benchmarks/ensemble_selection.py's rule
  passed on normal images only; PatchCore on MobileNetV2 and EfficientNet-Lite0 since the rule of
  benchmarks/ensemble_backbones_selection.py); PRN inside it trains on the same 10 real anomalies, left out as
  for PRN.
images/s times predict alone (images already decoded); fit seconds are reported apart. With
``--anomalib-python`` anomalib's PatchCore runs on the same images in its own virtualenv
(``anomalib_patchcore.py``) and its maps are scored with the same metric functions. Its memory bank holds its
own features at the patch positions our coreset picked, so its image scores must equal our PatchCore's (whose
image score is anomalib's published one): the JSON records the largest difference. Its ``fit_seconds`` is its
measured feature extraction plus its own coreset sampler's measured seconds per step times its steps (the
sampler itself would run for hours here), marked as such.

NEU-DET (zero-shot only, ``--neu``): every image carries a defect, so image AUROC is undefined there.
Reported instead: pixel AUROC with the annotated boxes as coarse masks (pixels inside any box = defect), and
the share of images whose map peak falls inside a box (and, as a check on border artefacts, within 16 px of
the image border). Prints a table and writes benchmarks/results/mtd_detection.json (with ``--tag NAME``:
mtd_detection.NAME.json) holding exactly RESULT_KEYS; each detector's entry records when its run started, so
rows of one run can be told from rows kept from an earlier run of the same protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch

from anomaly_discovery.data import Sample, load_image, load_mask, read_dataset
from anomaly_discovery.models.features.backbones import find_mobilenet_v2_weights
from anomaly_discovery.models.metrics import aupro, image_auroc, pixel_auroc
from anomaly_discovery.models.detectors.ensemble import DetectorEnsemble
from anomaly_discovery.models.detectors.mutual_scoring import MutualScoringDetector
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector
from anomaly_discovery.models.detectors.prn_training import select_real_anomalies
from machine_info import cpu_model
from results_file import add_output_arguments, results_path, write_results

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
RESULT_KEYS = ("benchmark", "machine", "protocol", "run_started", "load_average_at_start", "detectors", "anomalib",
               "neu_det_zero_shot", "load_average_at_end", "notes")
DETECTORS = ("patchcore", "zero-shot", "prn", "ensemble")
TRAINS_ON_REAL_ANOMALIES = ("prn", "ensemble")
N_REAL_ANOMALIES = 10
BORDER_PX = 16
RUN_STARTED = time.strftime("%Y-%m-%dT%H:%M:%S")


def machine(threads: int) -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": threads, "faiss": faiss.__version__, "cuda": torch.cuda.is_available(),
            "gpu": "none in this run (CPU only)" if not torch.cuda.is_available() else torch.cuda.get_device_name()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def evenly(items: list, limit: int | None) -> list:
    """``limit`` items spread over the list (all of them when ``limit`` is None) — for quick runs."""
    if limit is None or len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def read_mtd_protocol(root: Path, split_file: Path | None, limit: int | None) -> tuple[list[Sample], list[Sample]]:
    samples = read_dataset(root, "mtd", check=False, split_file=split_file).samples
    train = [s for s in samples if s.is_normal and s.split == "train"]
    defects = [s for s in samples if not s.is_normal]
    normals = [s for s in samples if s.is_normal and s.split == "test"]
    return evenly(train, limit), evenly(defects, limit) + evenly(normals, limit)


def ground_truth(samples: list[Sample], images: list[np.ndarray]) -> list[np.ndarray]:
    return [load_mask(s.mask_path, im.shape[:2]) if s.mask_path else np.zeros(im.shape[:2], bool)
            for s, im in zip(samples, images)]


def detection_metrics(labels: np.ndarray, scores: np.ndarray, masks: list, maps: list) -> dict:
    return {"image_auroc": round(image_auroc(labels, scores), 4), "pixel_auroc": round(pixel_auroc(masks, maps), 4),
            "aupro": round(aupro(masks, maps), 4), "n_images": len(labels), "n_anomalous": int(labels.sum())}


def score_detector(scores, maps, labels, masks, prn_eval: np.ndarray) -> dict:
    """Metrics on all test images and on PRN's evaluation set (the test images minus PRN's real anomalies)."""
    scores = np.asarray(scores, dtype=np.float64)
    result = detection_metrics(labels, scores, masks, maps)
    keep = np.flatnonzero(prn_eval)
    result["on_prn_eval_set"] = detection_metrics(labels[keep], scores[keep], [masks[i] for i in keep],
                                                  [maps[i] for i in keep])
    return result


def headline(entry: dict) -> str:
    if "image_auroc" not in entry:
        return json.dumps(entry)[:2000]
    return json.dumps({k: entry.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "images_per_s", "fit_seconds")})


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def prn_settings(config: PRNConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def run_detector(name: str, train_images, test_images, real_anomalies, threads: int) -> tuple[dict, list, object]:
    """Fit (timed) and predict (timed) one detector with its default settings."""
    if name == "patchcore":
        detector = PatchCoreDetector()
        layers = getattr(detector.extractor, "taps", detector.layers or [])
        settings = {"backbone": detector.backbone, "layers": list(layers), "image_size": detector.image_size,
                    "coreset_ratio": detector.coreset_ratio, "k": detector.k, "feature_dim": detector.feature_dim,
                    "coreset_projection_dim": detector.coreset_projection_dim, "border_pad": detector.border_pad,
                    "image_score": detector.image_score, "batch_size": detector.batch_size, "probes": detector.probes}
        _, fit_s = timed(lambda: detector.fit(train_images))
        settings["memory_bank"] = list(detector.memory_bank_.shape)
        note = ("fit on the normal training images; map from the map features (feature_dim, border_pad), image "
                "score anomalib's (its own embedding and Eq. 7 over 9 neighbours, same coreset positions)")
    elif name == "zero-shot":
        detector = MutualScoringDetector()
        settings = {"backbone": detector.backbone, "image_size": detector.image_size,
                    "neighbourhoods": list(detector.neighbourhoods), "lowest_fraction": detector.lowest_fraction,
                    "top_fraction": detector.top_fraction, "max_references": detector.max_references,
                    "batch_size": detector.batch_size}
        _, fit_s = timed(lambda: detector.fit(None))
        note = ("no normal images used; one predict call over all test images, each scored against the others "
                f"(in random groups of ≤ {detector.max_references + 1})")
    elif name == "prn":
        config = PRNConfig()
        detector = PRNDetector(config)
        settings = prn_settings(config)
        _, fit_s = timed(lambda: detector.fit(train_images, real_anomalies=real_anomalies))
        settings["anomaly_sources"] = list(detector.sources_)
        settings["loss_per_epoch"] = [round(loss, 5) for loss in detector.loss_history_]
        note = (f"trained with the normal training images and {len(real_anomalies)} real anomalies chosen by "
                "select_real_anomalies(seed=0); those are EXCLUDED from its evaluation (its main numbers are on "
                "the other test images)")
    else:
        detector = DetectorEnsemble()
        _, fit_s = timed(lambda: detector.fit(train_images, real_anomalies=real_anomalies))
        patchcores = [member for member in detector.members if member.name == "patchcore"]
        prns = [member for member in detector.members if member.name == "prn"]
        settings = {"members": [member.name for member in detector.members],
                    "patchcore_backbones": [patchcore.backbone for patchcore in patchcores],
                    "weights": [round(float(w), 4) for w in detector.weights],
                    "calibration_fraction": detector.calibration_fraction, "n_calibration": detector.n_calibration_,
                    "blur_sigma": detector.blur_sigma, "prn_seeds": [prn.config.seed for prn in prns],
                    "patchcore_image_size": patchcores[0].image_size, "prn": prn_settings(prns[0].config),
                    "scales": [asdict(scale) for scale in detector.scales_]}
        note = (f"PatchCore (on {' and '.join(p.backbone for p in patchcores)}, sharing PatchCore's half) and PRN "
                f"(their defaults) fitted on {len(train_images) - detector.n_calibration_} of the "
                f"normal training images (PRN also on the {len(real_anomalies)} real anomalies, EXCLUDED from its "
                f"evaluation as for PRN), standardised on the other {detector.n_calibration_} and averaged")
    load_before = load_average()
    detections, predict_s = timed(lambda: detector.predict(test_images))
    entry = {"fit_seconds": round(fit_s, 1), "predict_seconds": round(predict_s, 1),
             "images_per_s": round(len(test_images) / predict_s, 3), "threads": threads,
             "run_started": RUN_STARTED, "load_average_before_predict": load_before,
             "load_average_after_predict": load_average(), "settings": settings, "notes": note}
    return entry, detections, detector


def run_anomalib(python: str, train: list[Sample], test: list[Sample], threads: int, labels, masks,
                 prn_eval, test_images, ours: PatchCoreDetector, our_scores: np.ndarray) -> dict:
    """anomalib's PatchCore in its own interpreter; its maps scored with our metric functions.

    Its memory bank is its own features at the patch positions our detector's coreset picked on the same
    images (``coreset_indices_``); anomalib's own sampler is only timed on a few steps (see the helper)."""
    with tempfile.TemporaryDirectory(prefix="adisc-anomalib-") as folder:
        manifest = Path(folder) / "manifest.json"
        with open(manifest, "w") as handle:
            json.dump({"train": [str(s.image_path) for s in train], "test": [str(s.image_path) for s in test]},
                      handle)
        command = [python, "-W", "ignore", str(Path(__file__).with_name("anomalib_patchcore.py")),
                   "--manifest", str(manifest), "--maps-dir", str(Path(folder) / "maps"),
                   "--weights", str(find_mobilenet_v2_weights()), "--threads", str(threads)]
        np.save(Path(folder) / "positions.npy", ours.coreset_indices_.numpy())
        command += ["--coreset", "indices", "--coreset-indices", str(Path(folder) / "positions.npy"),
                    "--coreset-ratio", str(ours.coreset_ratio), "--batch-size", str(ours.batch_size),
                    "--image-size", str(ours.image_size)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        load_before = load_average()
        process = subprocess.run(command, capture_output=True, text=True, env=env)
        if process.returncode != 0:
            return {"ran": False, "reason": f"anomalib_patchcore.py exited {process.returncode}: "
                                            f"{process.stderr.strip()[-2000:]}"}
        report = json.loads(process.stdout.strip().splitlines()[-1])
        maps = [np.load(Path(folder) / "maps" / f"{i}.npy") for i in range(len(test))]
    bad = [i for i, (m, im) in enumerate(zip(maps, test_images)) if m.shape != im.shape[:2]]
    if bad:
        return {"ran": False, "reason": f"anomalib maps of the wrong size for test images {bad[:5]}"}
    scores = np.asarray(report.pop("scores"), dtype=np.float64)
    report.update(score_detector(scores, maps, labels, masks, prn_eval))
    report["fit_seconds"] = round(report["feature_extraction_seconds"] + report["anomalib_coreset_estimated_seconds"],
                                  1)
    report["fit_seconds_kind"] = ("estimate: measured feature extraction + anomalib KCenterGreedy's measured "
                                  "seconds per step × its steps (the sampler was not run to the end)")
    report["max_abs_image_score_difference_to_ours"] = float(np.abs(scores - our_scores).max())
    report["load_average_before"], report["load_average_after"] = load_before, load_average()
    report["run_started"] = RUN_STARTED
    report["ran"] = True
    return report


def neu_zero_shot(root: Path, limit: int | None) -> dict:
    """Zero-shot on NEU-DET: box-level pixel AUROC and peak-in-box share (image AUROC is undefined)."""
    samples = evenly(read_dataset(root, "neu", check=False).samples, limit)
    images = [load_image(s.image_path) for s in samples]
    masks = []
    for sample, image in zip(samples, images):
        mask = np.zeros(image.shape[:2], bool)
        for box in sample.boxes:
            mask[box.y0:box.y1, box.x0:box.x1] = True
        masks.append(mask)
    detector = MutualScoringDetector()
    detections, predict_s = timed(lambda: detector.predict(images))
    maps = [d.anomaly_map for d in detections]
    peaks = [np.unravel_index(int(np.argmax(a)), a.shape) for a in maps]
    peak_in_box = np.array([m[p] for m, p in zip(masks, peaks)])
    on_border = np.array([min(y, x, a.shape[0] - 1 - y, a.shape[1] - 1 - x) < BORDER_PX
                          for (y, x), a in zip(peaks, maps)])
    classes = sorted({s.label for s in samples})
    labels = np.array([s.label for s in samples])
    return {
        "n_images": len(samples), "box_pixel_auroc": round(pixel_auroc(masks, maps), 4),
        "peak_in_box_rate": round(float(peak_in_box.mean()), 4),
        "peak_in_box_rate_per_class": {c: round(float(peak_in_box[labels == c].mean()), 4) for c in classes},
        "box_area_fraction": round(float(np.mean([m.mean() for m in masks])), 4),
        f"peak_within_{BORDER_PX}px_of_border_rate": round(float(on_border.mean()), 4),
        "predict_seconds": round(predict_s, 1), "images_per_s": round(len(samples) / predict_s, 3),
        "notes": "every NEU-DET image has a defect, so image AUROC is undefined (no normal images); boxes used "
                 "as coarse masks, so pixel AUROC counts the normal pixels inside a box as defect; AUPRO not "
                 "reported (a box is not a region outline). One predict call over all images (all classes).",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS / "mtd")
    parser.add_argument("--split-file", type=Path, default=None, help="default: <data>/../mtd_split.json")
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    parser.add_argument("--neu", type=Path, default=DATASETS / "neu-det", help="NEU-DET root for zero-shot")
    parser.add_argument("--skip-neu", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anomalib-python", default=None, help="python of a virtualenv with anomalib")
    parser.add_argument("--limit", type=int, default=None, help="at most N images per group (quick runs only)")
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    out = args.out or results_path("mtd_detection", args.tag)

    train, test = read_mtd_protocol(args.data, args.split_file, args.limit)
    log(f"MTD: {len(train)} normal training images, {len(test)} test images; loading")
    train_images = [load_image(s.image_path) for s in train]
    test_images = [load_image(s.image_path) for s in test]
    labels = np.array([0 if s.is_normal else 1 for s in test])
    masks = ground_truth(test, test_images)
    chosen, _ = select_real_anomalies(test, N_REAL_ANOMALIES, seed=0)
    chosen_ids = {id(s) for s in chosen}
    prn_eval = np.array([id(s) not in chosen_ids for s in test])
    real_anomalies = [(test_images[i], masks[i]) for i in np.flatnonzero(~prn_eval)]

    protocol = {"data": str(args.data), "n_train_normal": len(train), "n_test_defect": int(labels.sum()),
                "n_test_normal": int((labels == 0).sum()), "limit": args.limit,
                "prn_real_anomalies": [f"{s.label}/{s.image_path.name}" for s in chosen],
                "metrics": "anomaly_discovery.models.metrics (aupro to FPR 0.3)"}
    previous = json.loads(out.read_text()) if out.is_file() else {}
    kept = previous if previous.get("protocol") == protocol else {}
    results = {key: kept.get(key) for key in RESULT_KEYS}
    results.update({"benchmark": "mtd_detection", "machine": machine(args.threads), "protocol": protocol,
                    "run_started": RUN_STARTED, "load_average_at_start": load_average(),
                    "detectors": kept.get("detectors") or {},
                    "notes": f"this run: {', '.join(args.detectors)}"
                             + (" and anomalib" if args.anomalib_python else "")})
    for name in args.detectors:
        log(f"{name}: fit + predict")
        entry, detections, detector = run_detector(name, train_images, test_images, real_anomalies, args.threads)
        scores = np.array([d.score for d in detections], dtype=np.float64)
        metrics = score_detector(scores, [d.anomaly_map for d in detections], labels, masks, prn_eval)
        if name in TRAINS_ON_REAL_ANOMALIES:
            main_metrics = metrics.pop("on_prn_eval_set")
            main_metrics["evaluated_on"] = "test images minus PRN's 10 real training anomalies"
            main_metrics["on_all_test_images_incl_its_training_anomalies"] = metrics
            metrics = main_metrics
        results["detectors"][name] = {**metrics, **entry}
        log(f"{name}: {headline(results['detectors'][name])}")
        del detections
        if name == "patchcore" and args.anomalib_python:
            log("anomalib PatchCore: fit + predict in its own virtualenv")
            results["anomalib"] = run_anomalib(args.anomalib_python, train, test, args.threads, labels, masks,
                                               prn_eval, test_images, detector, scores)
            results["anomalib"]["comparison"] = compare(results["detectors"]["patchcore"], results["anomalib"])
            log(f"anomalib: {headline(results['anomalib'])}")
        del detector
        save(results, out)
    if results["anomalib"] is None:
        results["anomalib"] = {"ran": False, "reason": "not requested (pass --anomalib-python)"}
    if "zero-shot" in args.detectors and not args.skip_neu:
        log("zero-shot on NEU-DET")
        results["neu_det_zero_shot"] = neu_zero_shot(args.neu, args.limit)
        log(f"NEU-DET: {json.dumps(results['neu_det_zero_shot'])}")
    results["load_average_at_end"] = load_average()
    save(results, out)
    print_table(results)
    print(f"results written to {out}")


def compare(ours: dict, theirs: dict) -> dict:
    """Our PatchCore against anomalib's on the same images: speed ratio and metric differences."""
    if not theirs.get("ran"):
        return {}
    return {"images_per_s_ratio_ours_over_anomalib": round(ours["images_per_s"] / theirs["images_per_s"], 3),
            **{f"{k}_ours_minus_anomalib": round(ours[k] - theirs[k], 4)
               for k in ("image_auroc", "pixel_auroc", "aupro")}}


def save(results: dict, out: Path) -> None:
    """Write exactly RESULT_KEYS, atomically, through the shared writer."""
    write_results("mtd_detection", results, RESULT_KEYS, out=out)


def print_table(results: dict) -> None:
    rows = [(name, r) for name, r in results.get("detectors", {}).items()]
    if results.get("anomalib", {}).get("ran"):
        rows.append(("anomalib patchcore", results["anomalib"]))
    print(f"{'detector':<20}{'images':>7}{'img AUROC':>11}{'px AUROC':>10}{'AUPRO':>8}{'img/s':>8}{'fit s':>8}")
    for name, r in rows:
        print(f"{name:<20}{r['n_images']:>7}{r['image_auroc']:>11.4f}{r['pixel_auroc']:>10.4f}{r['aupro']:>8.4f}"
              f"{r['images_per_s']:>8.2f}{'-' if r['fit_seconds'] is None else round(r['fit_seconds'], 1):>8}")


if __name__ == "__main__":
    main()
