"""PRN reading each image also flipped (test-time flips)? Decided on a product's normal images only.

Usage: python benchmarks/prn_flip_selection.py [--data ../shared/datasets/mtd] [--splits 0 1]
       [--threads 1] [--tag NAME] [--decide-only]

PRN alone stays below issue 13's targets on MTD (image AUROC .942, AUPRO .814 against .95 and .85); more epochs
(prn_learning_curve.py), a larger input and another encoder (prn_input_selection.py) did not pass their rules.
One fitted PRN gives a slightly different map for an image and for its mirror image: averaging the maps of a few
flipped views, each flipped back (``PRNConfig.test_flips``: 1 the image alone, 2 with its mirror image, 4 with
its vertical and double flips too), averages out part of that noise at 2 or 4 times the prediction cost, with no
retraining. Protocol, as benchmarks/prn_input_selection.py: on each split of MTD's normal TRAINING images (seeded;
80% fit, 20% held out) one PRN (defaults, training seed = split number) is fitted on the fit images and the 10
real anomalies mtd_detection.py gives PRN, then predicts the three held-out sets (``simulated``, ``faint``:
DRAEM-style textures PRN trains on; ``drawn``: the generator's six defect kinds, which PRN never trains on) with
each setting. PatchCore with its defaults, fitted on the same images, is the training-free floor; it is reported,
not ruled on. Prediction speed (images/s over the three sets) is reported per setting. MTD's test images other
than PRN's 10 training anomalies, and every test mask, are never opened.

Rule, written before the first run (7 December, 21:10 UTC): a setting with flips replaces 1 if (a) on the drawn
set its mean of image AUROC and AUPRO, averaged over the two splits, exceeds 1's by more than .005 and is above
1's on each split, and (b) its AUPRO averaged over the three held-out sets and the splits is not below 1's by more
than .005. If both 2 and 4 pass, 4 is adopted only if its drawn score exceeds 2's by more than .005 (it costs
twice the prediction time); otherwise 2. If neither passes, PRN keeps reading the image alone.

Writes benchmarks/results/prn_flip_selection.json (``--tag NAME``: ...NAME.json) with exactly RESULT_KEYS.
``--decide-only`` fits nothing: it reads that file's per-split measurements and applies the rule again.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector
from ensemble_prn_seeds_selection import run_selection, split_sets
from ensemble_selection import RULED_SET, metrics, set_score
from results_file import write_results

RESULT_KEYS = ("benchmark", "machine", "protocol", "rule", "splits", "mean_over_splits", "decision",
               "load_average_at_start", "load_average_at_end")
FLIPS = (1, 2, 4)
INCUMBENT = "flips 1"
CANDIDATES = tuple(f"flips {n}" for n in FLIPS)
SETTINGS = {name: {"test_flips": n} for name, n in zip(CANDIDATES, FLIPS)}
FLOOR = "patchcore (training-free floor)"
DRAWN_MARGIN = 0.005
AUPRO_TOLERANCE = 0.005


def timed_scores(detector, sets: dict) -> tuple[dict, float]:
    """The detector's metrics on every held-out set and its prediction speed (images/s) over them all."""
    scores, seconds, images = {}, 0.0, 0
    for set_name, (test, labels, masks) in sets.items():
        start = time.perf_counter()
        detections = detector.predict(test)
        seconds += time.perf_counter() - start
        images += len(test)
        scores[set_name] = metrics(detections, labels, masks)
    return scores, round(images / seconds, 2)


def fit_and_read(split: int, normals: list, real: list, held_out_fraction: float, epochs: int | None,
                 limit: int | None, settings: dict[str, dict]) -> dict:
    """Fit PatchCore (the floor) and one PRN on a split; score the floor, and PRN predicting with each of
    ``settings`` (name → PRNConfig fields that change only how a fitted PRN predicts)."""
    fit_images, held_images, sets = split_sets(normals, held_out_fraction, split, limit)
    length = {} if epochs is None else {"epochs": epochs}
    result = {"fit_images": len(fit_images), "held_out_normal": len(held_images), "fit_seconds": {}, "scores": {},
              "images_per_s": {}}
    fitted = {FLOOR: PatchCoreDetector(progress=False, seed=split),
              "prn": PRNDetector(PRNConfig(progress=False, seed=split, **length))}
    for name, detector in fitted.items():
        start = time.perf_counter()
        detector.fit(fit_images, **({"real_anomalies": real} if name == "prn" else {}))
        result["fit_seconds"][name] = round(time.perf_counter() - start, 1)
    readers = {FLOOR: fitted[FLOOR]}
    for name, changes in settings.items():
        readers[name] = copy.copy(fitted["prn"])
        readers[name].config = dataclasses.replace(fitted["prn"].config, **changes)
    for name, detector in readers.items():
        result["scores"][name], result["images_per_s"][name] = timed_scores(detector, sets)
        print(f"split {split} {name}: {result['images_per_s'][name]} images/s", result["scores"][name], flush=True)
    return result


def run_split(split: int, normals: list, real: list, held_out_fraction: float, epochs: int | None,
              limit: int | None) -> dict:
    """One split: the floor, and one PRN at every flip setting."""
    return fit_and_read(split, normals, real, held_out_fraction, epochs, limit, SETTINGS)


def rule_checks(mean: dict, splits: dict, candidates: tuple[str, ...], incumbent: str) -> dict:
    """Each candidate's drawn score (on average and per split), AUPRO over the sets, images/s (floor too) and the
    checks (a) drawn score above the incumbent's by the margin on average and on each split, (b) mean AUPRO over
    the sets not below the incumbent's by more than the tolerance."""
    drawn = {name: set_score(mean[name][RULED_SET]) for name in candidates}
    drawn_per_split = {name: [set_score(s["scores"][name][RULED_SET]) for s in splits.values()] for name in candidates}
    mean_aupro = {name: round(float(np.mean([scores["aupro"] for scores in mean[name].values()])), 4)
                  for name in candidates}
    checks = {name: {"drawn_gain_over_margin": round(drawn[name] - drawn[incumbent], 4) > DRAWN_MARGIN,
                     "drawn_above_on_each_split": all(c > i for c, i in zip(drawn_per_split[name],
                                                                            drawn_per_split[incumbent])),
                     "aupro_not_below": round(mean_aupro[name] - mean_aupro[incumbent], 4) >= -AUPRO_TOLERANCE}
              for name in candidates if name != incumbent}
    images_per_s = {name: round(float(np.mean([s["images_per_s"][name] for s in splits.values()])), 2)
                    for name in (*candidates, FLOOR)}
    return {"drawn_score": drawn, "drawn_score_per_split": drawn_per_split, "mean_aupro_over_sets": mean_aupro,
            "images_per_s": images_per_s, "checks": checks}


def decide(mean: dict, splits: dict) -> dict:
    """The rule (module docstring): (a) and (b) of :func:`rule_checks`; 4 over 2 only by the margin."""
    decision = rule_checks(mean, splits, CANDIDATES, INCUMBENT)
    drawn = decision["drawn_score"]
    passing = [name for name, passed in decision["checks"].items() if all(passed.values())]
    adopted = INCUMBENT
    if passing:
        adopted = "flips 2" if "flips 2" in passing else "flips 4"
        if adopted == "flips 2" and "flips 4" in passing and drawn["flips 4"] - drawn["flips 2"] > DRAWN_MARGIN:
            adopted = "flips 4"
    return {**decision, "adopted": adopted}


def save(results: dict, out: Path) -> None:
    write_results("prn_flip_selection", results, RESULT_KEYS, out=out, indent=1)


def main() -> None:
    protocol = {"incumbent": INCUMBENT, "candidates": SETTINGS, "floor": FLOOR}
    run_selection("prn_flip_selection", __doc__, "Rule, written before the first run (7 December, 21:10 UTC): ",
                  protocol, run_split, decide, save)


if __name__ == "__main__":
    sys.exit(main())
