"""Does averaging PatchCore and PRN localise better than either? Decided on a product's normal images only.

Usage: python benchmarks/ensemble_selection.py [--data ../shared/datasets/mtd] [--threads 1] [--tag NAME]

Protocol. MTD's normal TRAINING images are split (seeded, as benchmarks/detector_selection.py and
prn_learning_curve.py do) into a fit part (80%) and a held-out part (20%). ``DetectorEnsemble`` (defaults:
PatchCore and PRN with their own defaults, 10% of the fit part held back to calibrate their scales) is fitted
on the fit part; PRN also trains on the 10 real anomalies mtd_detection.py gives it (their masks are read for
training only). Three held-out sets, each the held-out normals plus one anomalous copy of every one:
``simulated`` and ``faint`` (DRAEM-style Perlin textures, β in [0, .8] and [.6, .9], as detector_selection.py
builds them) and ``drawn``: the held-out normals at 256 × 256 with one of the generator's six defect kinds
(scratch, crack, hole, stain, missing material, fold; data/synthetic/defects.py) drawn on each, in turn. The
members alone and the ensemble are scored on the same fits: image AUROC, pixel AUROC, AUPRO. MTD's test
images other than PRN's 10 training anomalies, and every test mask, are never opened.

Rule, written before the first run: the simulated and faint sets are the kind of anomaly PRN trains on, so
they are reported, not ruled on. On the drawn set (kinds neither member trains on), the ensemble's mean of
image AUROC and AUPRO must exceed both members' by more than .005; then the ensemble is offered as a detector
(``adisc detect --detector ensemble``) and scored on MTD (mtd_detection.py); otherwise it is not offered.

Writes benchmarks/results/ensemble_selection.json (``--tag NAME``: ensemble_selection.NAME.json) with exactly
RESULT_KEYS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch

from anomaly_discovery.data import load_image, load_mask, read_dataset
from anomaly_discovery.data.synthetic.defects import DEFECT_RENDERERS, DEFECT_TYPES
from anomaly_discovery.data.synthetic.render import MIN_DEFECT_PIXELS
from anomaly_discovery.data.synthetic.textures import Surface
from anomaly_discovery.models.detectors.ensemble import DetectorEnsemble
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector
from anomaly_discovery.models.detectors.prn_training import select_real_anomalies
from anomaly_discovery.models.metrics import aupro, image_auroc, pixel_auroc
from detector_selection import HELD_OUT_SETS, held_out_set, normal_split
from machine_info import cpu_model
from results_file import add_output_arguments, results_path, write_results

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
RESULT_KEYS = ("benchmark", "machine", "protocol", "rule", "fit_seconds", "sets", "candidates", "decision",
               "load_average_at_start", "load_average_at_end")
RULED_SET = "drawn"
MARGIN = 0.005
DRAWN_SIDE = 256
MAX_DRAW_ATTEMPTS = 20


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One generator defect of ``kind`` drawn on a real square image (gray when its channels are equal)."""
    gray = image.ndim == 2 or bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    planes = (image if image.ndim == 2 else image[..., 0])[None] if gray else image.transpose(2, 0, 1)
    planes = planes.astype(np.float32)
    substrate = np.full_like(planes, float(planes.mean()) * 0.5)
    surface = Surface(image=planes, allowed=np.ones(planes.shape[1:], bool), substrate=substrate)
    for _ in range(MAX_DRAW_ATTEMPTS):
        drawn, mask = DEFECT_RENDERERS[kind](rng, surface)
        if np.count_nonzero(mask) >= MIN_DEFECT_PIXELS:
            drawn = np.clip(drawn, 0, 255).round().astype(np.uint8)
            drawn = np.repeat(drawn, 3, axis=0) if gray and image.ndim == 3 else drawn
            return (drawn[0] if image.ndim == 2 else drawn.transpose(1, 2, 0)), mask
    raise RuntimeError(f"could not draw a {kind} of at least {MIN_DEFECT_PIXELS} pixels")


def drawn_set(images: list[np.ndarray], seed: int) -> tuple[list, np.ndarray, list]:
    """The held-out normals at DRAWN_SIDE², then one copy of each with a generator defect (kinds in turn)."""
    rng = np.random.default_rng(seed)
    normals = [cv2.resize(image, (DRAWN_SIDE, DRAWN_SIDE), interpolation=cv2.INTER_AREA) for image in images]
    anomalous = [draw_defect(image, DEFECT_TYPES[i % len(DEFECT_TYPES)], rng) for i, image in enumerate(normals)]
    test = normals + [image for image, _ in anomalous]
    masks = [np.zeros(image.shape[:2], bool) for image in normals] + [mask for _, mask in anomalous]
    return test, np.array([0] * len(normals) + [1] * len(normals)), masks


def metrics(detections, labels, masks) -> dict:
    maps = [d.anomaly_map for d in detections]
    return {"image_auroc": round(image_auroc(labels, np.array([d.score for d in detections])), 4),
            "pixel_auroc": round(pixel_auroc(masks, maps), 4), "aupro": round(aupro(masks, maps), 4)}


def set_score(scores: dict) -> float:
    """The rule's number on one set: mean of image AUROC and AUPRO."""
    return round((scores["image_auroc"] + scores["aupro"]) / 2, 4)


def decide(candidates: dict, members: list[str]) -> dict:
    """The rule: on RULED_SET the ensemble beats every member by more than MARGIN."""
    ruled = {name: set_score(candidates[name][RULED_SET]) for name in candidates}
    best_member = max(members, key=lambda name: ruled[name])
    margin = round(ruled["ensemble"] - ruled[best_member], 4)
    return {"set": RULED_SET, "scores": ruled, "best_member": best_member, "margin_over_best_member": margin,
            "adopted": bool(margin > MARGIN)}


def save(results: dict, out: Path) -> None:
    write_results("ensemble_selection", results, RESULT_KEYS, out=out, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS / "mtd")
    parser.add_argument("--held-out-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=None, help="PRN epochs (default: PRNConfig's; quick runs)")
    parser.add_argument("--limit", type=int, default=None, help="at most N fit and N held-out images (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = args.out or results_path("ensemble_selection", args.tag)

    samples = read_dataset(args.data, "mtd", check=False).samples
    normals = [s for s in samples if s.is_normal and s.split == "train"]
    fit_images, held_images = normal_split(normals, args.held_out_fraction, args.seed)
    fit_images, held_images = fit_images[:args.limit], held_images[:args.limit]
    sets = {name: held_out_set(held_images, *betas, args.seed) for name, betas in HELD_OUT_SETS.items()}
    sets[RULED_SET] = drawn_set(held_images, args.seed)
    chosen_real, _ = select_real_anomalies([s for s in samples if s.split == "test"], 10, seed=0)
    real = [(load_image(s.image_path), load_mask(s.mask_path)) for s in chosen_real]

    prn_config = PRNConfig(progress=False) if args.epochs is None else PRNConfig(progress=False, epochs=args.epochs)
    ensemble = DetectorEnsemble(members=(PatchCoreDetector(progress=False, seed=args.seed), PRNDetector(prn_config)),
                                seed=args.seed)
    results = {"benchmark": "ensemble_selection",
               "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads,
                           "torch": torch.__version__, "gpu": "none (CPU only)"},
               "protocol": {"fit_images": len(fit_images), "held_out_normal": len(held_images),
                            "calibration_fraction": ensemble.calibration_fraction,
                            "beta_ranges": {name: list(betas) for name, betas in HELD_OUT_SETS.items()},
                            "drawn": {"side": DRAWN_SIDE, "kinds": list(DEFECT_TYPES)},
                            "prn_epochs": prn_config.epochs, "seed": args.seed,
                            "real_anomalies": [f"{s.label}/{s.image_path.name}" for s in chosen_real],
                            "labels_read": "MTD normal training images; the masks of PRN's 10 real training "
                                           "anomalies (for training only); no test label is used for scoring"},
               "rule": __doc__.split("Rule, written before the first run: ")[1].split("\n\n")[0].replace("\n", " "),
               "fit_seconds": None, "sets": {name: len(labels) for name, (_, labels, _) in sets.items()},
               "candidates": {}, "decision": None, "load_average_at_start": load_average(),
               "load_average_at_end": None}
    start = time.perf_counter()
    ensemble.fit(fit_images, real_anomalies=real)
    results["fit_seconds"] = round(time.perf_counter() - start, 1)
    print(f"fitted in {results['fit_seconds']} s", flush=True)
    members = [member.name for member in ensemble.members]
    results["candidates"] = {name: {} for name in (*members, "ensemble")}
    for set_name, (test, labels, masks) in sets.items():
        per_member = ensemble.predict_members(test)
        for name, detections in zip(members, per_member):
            results["candidates"][name][set_name] = metrics(detections, labels, masks)
        results["candidates"]["ensemble"][set_name] = metrics(ensemble.combine(per_member), labels, masks)
        print(set_name, {name: scores[set_name] for name, scores in results["candidates"].items()}, flush=True)
    results["decision"] = decide(results["candidates"], members)
    results["load_average_at_end"] = load_average()
    save(results, out)
    print(f"decision: {results['decision']}; wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
