"""How much to blur the ensemble's averaged map, decided on a product's normal images only.

Usage: python benchmarks/ensemble_blur_selection.py [--data ../shared/datasets/mtd] [--threads 1] [--tag NAME]

Protocol: ensemble_selection.py's, on two splits of MTD's normal training images (seeds 0 and 1): the ensemble
(PatchCore + PRN, defaults) is fitted on the fit part of each split (PRN also on mtd_detection.py's 10 real
anomalies, their masks read for training only) and predicts the three held-out sets of that split (``simulated``,
``faint``, ``drawn``). Its averaged map is then blurred by each candidate σ of ``SIGMAS`` (pixels of a 256-pixel
shorter side, scaled to each image's own; ``DetectorEnsemble.blur_sigma``) and scored: image AUROC (the blur does
not touch image scores), pixel AUROC, AUPRO. MTD's test images other than PRN's 10 training anomalies, and every
test mask, are never opened.

Rule, written before the first run: on the drawn set (kinds neither member trains on), averaged over the two
splits, the σ of highest AUPRO becomes the ensemble's default if its AUPRO beats σ = 0's by more than .01 and its
pixel AUROC is not lower than σ = 0's by more than .01; otherwise σ stays 0. The simulated and faint sets are
reported, not ruled on (PRN trains on their kind).

Writes benchmarks/results/ensemble_blur_selection.json (``--tag NAME``: ensemble_blur_selection.NAME.json) with
exactly RESULT_KEYS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from anomaly_discovery.data import load_image, load_mask, read_dataset
from anomaly_discovery.models.detectors.ensemble import DetectorEnsemble
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector
from anomaly_discovery.models.detectors.prn_training import select_real_anomalies
from detector_selection import HELD_OUT_SETS, held_out_set, normal_split
from ensemble_selection import DATASETS, RULED_SET, drawn_set, load_average, metrics
from machine_info import cpu_model
from results_file import add_output_arguments, results_path, write_results

RESULT_KEYS = ("benchmark", "machine", "protocol", "rule", "fit_seconds", "by_seed", "mean", "decision",
               "load_average_at_start", "load_average_at_end")
SIGMAS = (0.0, 2.0, 4.0, 8.0)
SEEDS = (0, 1)
AUPRO_MARGIN = 0.01
PIXEL_AUROC_TOLERANCE = 0.01
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def sigma_key(sigma: float) -> str:
    return f"sigma {sigma:g}"


def mean_over_seeds(by_seed: dict) -> dict:
    """set → σ → metric → mean over the seeds."""
    seeds = list(by_seed)
    first = by_seed[seeds[0]]
    return {set_name: {key: {metric: round(float(np.mean([by_seed[s][set_name][key][metric] for s in seeds])), 4)
                             for metric in METRICS}
                       for key in first[set_name]}
            for set_name in first}


def decide(mean: dict) -> dict:
    """The rule (module docstring) on the seeds' mean over RULED_SET."""
    ruled = mean[RULED_SET]
    base = ruled[sigma_key(0.0)]
    best = max(SIGMAS, key=lambda sigma: ruled[sigma_key(sigma)]["aupro"])
    gain = round(ruled[sigma_key(best)]["aupro"] - base["aupro"], 4)
    pixel_change = round(ruled[sigma_key(best)]["pixel_auroc"] - base["pixel_auroc"], 4)
    adopted = best != 0.0 and gain > AUPRO_MARGIN and pixel_change >= -PIXEL_AUROC_TOLERANCE
    return {"set": RULED_SET, "best_sigma": best, "aupro_gain_over_none": gain,
            "pixel_auroc_change": pixel_change, "adopted": bool(adopted), "chosen_sigma": best if adopted else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS / "mtd")
    parser.add_argument("--held-out-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=None, help="PRN epochs (default: PRNConfig's; quick runs)")
    parser.add_argument("--limit", type=int, default=None, help="at most N fit and N held-out images (quick runs)")
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = args.out or results_path("ensemble_blur_selection", args.tag)

    samples = read_dataset(args.data, "mtd", check=False).samples
    normals = [s for s in samples if s.is_normal and s.split == "train"]
    chosen_real, _ = select_real_anomalies([s for s in samples if s.split == "test"], 10, seed=0)
    real = [(load_image(s.image_path), load_mask(s.mask_path)) for s in chosen_real]
    prn_config = PRNConfig(progress=False) if args.epochs is None else PRNConfig(progress=False, epochs=args.epochs)
    results = {"benchmark": "ensemble_blur_selection",
               "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads,
                           "torch": torch.__version__, "gpu": "none (CPU only)"},
               "protocol": {"seeds": list(SEEDS), "sigmas": list(SIGMAS), "held_out_fraction": args.held_out_fraction,
                            "limit": args.limit, "prn_epochs": prn_config.epochs,
                            "beta_ranges": {name: list(betas) for name, betas in HELD_OUT_SETS.items()},
                            "real_anomalies": [f"{s.label}/{s.image_path.name}" for s in chosen_real],
                            "labels_read": "MTD normal training images; the masks of PRN's 10 real training "
                                           "anomalies (for training only); no test label is used for scoring"},
               "rule": __doc__.split("Rule, written before the first run: ")[1].split("\n\n")[0].replace("\n", " "),
               "fit_seconds": {}, "by_seed": {}, "mean": None, "decision": None,
               "load_average_at_start": load_average(), "load_average_at_end": None}
    for seed in SEEDS:
        fit_images, held_images = normal_split(normals, args.held_out_fraction, seed)
        fit_images, held_images = fit_images[:args.limit], held_images[:args.limit]
        sets = {name: held_out_set(held_images, *betas, seed) for name, betas in HELD_OUT_SETS.items()}
        sets[RULED_SET] = drawn_set(held_images, seed)
        ensemble = DetectorEnsemble(members=(PatchCoreDetector(progress=False, seed=seed), PRNDetector(prn_config)),
                                    seed=seed)
        start = time.perf_counter()
        ensemble.fit(fit_images, real_anomalies=real)
        results["fit_seconds"][str(seed)] = round(time.perf_counter() - start, 1)
        by_set = {}
        for set_name, (test, labels, masks) in sets.items():
            per_member = ensemble.predict_members(test)
            by_set[set_name] = {sigma_key(sigma): metrics(ensemble.combine(per_member, sigma), labels, masks)
                                for sigma in SIGMAS}
            print(f"seed {seed}", set_name, by_set[set_name], flush=True)
        results["by_seed"][str(seed)] = by_set
    results["mean"] = mean_over_seeds(results["by_seed"])
    results["decision"] = decide(results["mean"])
    results["load_average_at_end"] = load_average()
    write_results("ensemble_blur_selection", results, RESULT_KEYS, out=out, indent=1)
    print(f"decision: {results['decision']}; wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
