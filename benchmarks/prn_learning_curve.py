"""PRN's learning curve on MTD's normal images, and the choice of its prototypes, without MTD's test labels.

Usage: python benchmarks/prn_learning_curve.py [--data ../shared/datasets/mtd] [--candidates patch image]
       [--epochs N] [--eval-every 2] [--threads 1] [--tag NAME]

Protocol. MTD's normal TRAINING images are split (seeded, as benchmarks/detector_selection.py does) into a fit
part (80%) and a held-out part (20%). PRN trains on the fit part and on the 10 real anomalies that
benchmarks/mtd_detection.py gives it (``select_real_anomalies(seed=0)`` over MTD's test images; their masks are
what PRN may train on, and they are left out of mtd_detection.py's evaluation). Every ``--eval-every`` epochs
the detector is scored on two held-out sets built from the held-out normals, each normal followed by one
simulated-anomaly copy: ``simulated`` (β ~ U(0, .8)) and ``faint`` (β ~ U(.6, .9)), β being the image's weight in
the blend. Recorded per evaluation: epoch, steps, training seconds (evaluation time not counted), loss, image
AUROC, pixel AUROC and AUPRO on both sets. MTD's test labels and masks are never used for scoring.

Candidates: ``patch`` (PRNConfig's defaults: k-means prototypes of each scale's feature vectors, residual to
each position's nearest one) and ``image`` (the unofficial code's prototypes: ⌊.1·N⌋ centroids of whole maps).

Rule, written before the first run: at the last evaluation, the candidate with the highest mean of image AUROC
and AUPRO over both held-out sets wins; ``image`` (the paper's recipe) stays the choice unless ``patch`` beats it
by more than .005. The default number of epochs is then the smallest evaluated epoch whose score is within .005
of the winner's best, so long as a whole MTD fit (761 images) of that length fits the issue's 30-minute budget
at the measured seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import faiss
import numpy as np
import torch

from anomaly_discovery.data import load_image, load_mask, read_dataset
from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector
from anomaly_discovery.models.detectors.prn_training import PRNTrainHooks, select_real_anomalies
from anomaly_discovery.models.metrics import aupro, image_auroc, pixel_auroc
from detector_selection import HELD_OUT_SETS, held_out_set, normal_split
from machine_info import cpu_model
from results_file import add_output_arguments, results_path, write_results

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
RESULT_KEYS = ("benchmark", "machine", "protocol", "rule", "candidates", "chosen", "default_epochs",
               "load_average_at_start", "load_average_at_end")
CANDIDATES = {"patch": {"prototypes": "patch"}, "image": {"prototypes": "image"}}
MARGIN = 0.005
BUDGET_SECONDS = 30 * 60
MTD_TRAIN_IMAGES = 761


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def score(detector: PRNDetector, held_out: dict) -> dict:
    """Image AUROC, pixel AUROC and AUPRO of the detector on each held-out set."""
    result = {}
    for name, (images, labels, masks) in held_out.items():
        detections = detector.predict(images)
        maps = [d.anomaly_map for d in detections]
        result[name] = {"image_auroc": round(image_auroc(labels, np.array([d.score for d in detections])), 4),
                        "pixel_auroc": round(pixel_auroc(masks, maps), 4), "aupro": round(aupro(masks, maps), 4)}
    return result


def selection_score(scores: dict) -> float:
    """The rule's number: mean of image AUROC and AUPRO over the held-out sets."""
    return round(float(np.mean([[s["image_auroc"], s["aupro"]] for s in scores.values()])), 4)


def run_candidate(config: PRNConfig, normals, real, held_out, eval_every: int) -> dict:
    """Train once, scoring the detector after every ``eval_every`` epochs (and the last)."""
    detector = PRNDetector(config)
    curve = []

    def evaluate(epoch: int, metrics: dict, state: dict) -> None:
        if (epoch + 1) % eval_every and epoch + 1 != config.epochs:
            return
        started = time.perf_counter()
        scores = score(detector, held_out)
        steps = (epoch + 1) * -(-len(normals) // (config.batch_size // 2))
        point = {"epoch": epoch + 1, "steps": steps, "train_seconds": round(metrics["seconds"], 1),
                 "loss": round(metrics["loss"], 5), **scores, "selection_score": selection_score(scores),
                 "eval_seconds": round(time.perf_counter() - started, 1), "load_average": load_average()}
        curve.append(point)
        print(json.dumps(point), flush=True)

    started = time.perf_counter()
    detector.fit(normals, real, hooks=PRNTrainHooks(on_epoch=evaluate))
    fit_seconds = time.perf_counter() - started
    train_seconds = curve[-1]["train_seconds"]
    return {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
            "anomaly_sources": list(detector.sources_), "curve": curve,
            "fit_seconds_without_evaluation": round(fit_seconds - sum(p["eval_seconds"] for p in curve), 1),
            "setup_seconds": round(fit_seconds - sum(p["eval_seconds"] for p in curve) - train_seconds, 1),
            "seconds_per_step": round(train_seconds / curve[-1]["steps"], 3)}


def choose(candidates: dict) -> tuple[str, int | None]:
    """The rule: the winner at the last evaluation (``image`` unless beaten by > MARGIN), then its default
    epochs (the first evaluated epoch within MARGIN of its best that fits the MTD budget)."""
    final = {name: c["curve"][-1]["selection_score"] for name, c in candidates.items()}
    winner = max(final, key=final.get)
    if "image" in final and final[winner] - final["image"] <= MARGIN:
        winner = "image"
    chosen = candidates[winner]
    best = max(p["selection_score"] for p in chosen["curve"])
    per_epoch = chosen["seconds_per_step"] * -(-MTD_TRAIN_IMAGES // (chosen["settings"]["batch_size"] // 2))
    fitting = [p["epoch"] for p in chosen["curve"]
               if p["selection_score"] >= best - MARGIN and chosen["setup_seconds"] + p["epoch"] * per_epoch
               <= BUDGET_SECONDS]
    return winner, (fitting[0] if fitting else None)


def save(results: dict, out: Path) -> None:
    """Write exactly RESULT_KEYS, atomically, through the shared writer."""
    write_results("prn_learning_curve", results, RESULT_KEYS, out=out, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS / "mtd")
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--epochs", type=int, default=None, help="default: PRNConfig's")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--held-out-fraction", type=float, default=0.2)
    parser.add_argument("--limit", type=int, default=None, help="at most N fit images (quick checks only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = args.out or results_path("prn_learning_curve", args.tag)

    samples = read_dataset(args.data, "mtd", check=False).samples
    normals = [s for s in samples if s.is_normal and s.split == "train"]
    fit_images, held_images = normal_split(normals, args.held_out_fraction, args.seed)
    fit_images, n_held_out = fit_images[:args.limit], len(held_images)
    held_out = {name: held_out_set(held_images, *betas, args.seed) for name, betas in HELD_OUT_SETS.items()}
    chosen_real, _ = select_real_anomalies([s for s in samples if s.split == "test"], 10, seed=0)
    real = [(load_image(s.image_path), load_mask(s.mask_path)) for s in chosen_real]

    base = PRNConfig(progress=False) if args.epochs is None else PRNConfig(progress=False, epochs=args.epochs)
    results = {"benchmark": "prn_learning_curve",
               "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads,
                           "torch": torch.__version__, "gpu": "none (CPU only)"},
               "protocol": {"fit_images": len(fit_images), "held_out_normal": n_held_out,
                            "anomalous_copies_per_set": n_held_out,
                            "beta_ranges": {name: list(betas) for name, betas in HELD_OUT_SETS.items()},
                            "real_anomalies": [f"{s.label}/{s.image_path.name}" for s in chosen_real],
                            "eval_every_epochs": args.eval_every, "seed": args.seed,
                            "labels_read": "MTD normal training images; the masks of PRN's 10 real training "
                                           "anomalies (for training only); no test label is used for scoring"},
               "rule": __doc__.split("Rule, written before the first run: ")[1].split("\n\n")[0].replace("\n", " "),
               "candidates": {}, "chosen": None, "default_epochs": None, "load_average_at_start": load_average(),
               "load_average_at_end": None}
    for name in args.candidates:
        print(f"candidate {name}", flush=True)
        config = replace(base, **CANDIDATES[name])
        results["candidates"][name] = run_candidate(config, fit_images, real, held_out, args.eval_every)
        results["load_average_at_end"] = load_average()
        save(results, out)
    results["chosen"], results["default_epochs"] = choose(results["candidates"])
    save(results, out)
    print(f"chosen: {results['chosen']}, default epochs {results['default_epochs']}; wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
