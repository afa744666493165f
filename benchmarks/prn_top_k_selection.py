"""PRN's image score: the mean of how many of its map's highest pixels? Decided on a product's normal images only.

Usage: python benchmarks/prn_top_k_selection.py [--data ../shared/datasets/mtd] [--splits 0 1]
       [--threads 1] [--tag NAME] [--decide-only]

PRN's image AUROC on MTD (.942) is below issue 13's .95 while PatchCore's is .965; PRN scores an image by the mean
of the ``top_k`` = 100 highest pixels of its 256 × 256 map (the paper's step 10, never selected here): 0.15% of the
image, so a tiny defect fills it and a large one is read by its peak alone. Candidates: ``top 25``, ``top 100``
(the incumbent), ``top 400`` and ``top 1600`` (2.4% of the map). Protocol, as benchmarks/prn_flip_selection.py:
on each split of MTD's normal TRAINING images (seeded; 80% fit, 20% held out) one PRN (defaults, training seed =
split number) is fitted on the fit images and the 10 real anomalies mtd_detection.py gives PRN and predicts the
three held-out sets (``simulated``, ``faint``: DRAEM-style textures PRN trains on; ``drawn``: the generator's six
defect kinds, which PRN never trains on) with each ``top_k``; PatchCore with its defaults, fitted on the same
images, is the training-free floor, reported, not ruled on. MTD's test images other than PRN's 10 training
anomalies, and every test mask, are never opened.

Rule, written before the first run (7 December, 22:13 UTC): a ``top_k`` replaces 100 if (a) on the drawn set its
mean of image AUROC and AUPRO, averaged over the two splits, exceeds 100's by more than .005 and is above 100's on
each split (the maps are the same for every ``top_k``, so AUPRO is too: this asks for .01 more image AUROC), and
(b) its AUPRO averaged over the three held-out sets and the splits is not below 100's by more than .005 (true by
construction). Of several that pass, the one with the highest drawn score wins; if none passes, 100 stays.

Writes benchmarks/results/prn_top_k_selection.json (``--tag NAME``: ...NAME.json) with exactly RESULT_KEYS.
``--decide-only`` fits nothing: it reads that file's per-split measurements and applies the rule again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ensemble_prn_seeds_selection import run_selection
from prn_flip_selection import FLOOR, fit_and_read, rule_checks
from results_file import write_results

RESULT_KEYS = ("benchmark", "machine", "protocol", "rule", "splits", "mean_over_splits", "decision",
               "load_average_at_start", "load_average_at_end")
TOP_KS = (25, 100, 400, 1600)
INCUMBENT = "top 100"
SETTINGS = {f"top {k}": {"top_k": k} for k in TOP_KS}


def run_split(split: int, normals: list, real: list, held_out_fraction: float, epochs: int | None,
              limit: int | None) -> dict:
    """One split: the floor, and one PRN scoring images by every ``top_k``."""
    return fit_and_read(split, normals, real, held_out_fraction, epochs, limit, SETTINGS)


def decide(mean: dict, splits: dict) -> dict:
    """The rule (module docstring): (a) and (b) of ``rule_checks``; the passing ``top_k`` of highest drawn score."""
    decision = rule_checks(mean, splits, tuple(SETTINGS), INCUMBENT)
    passing = [name for name, passed in decision["checks"].items() if all(passed.values())]
    adopted = max(passing, key=decision["drawn_score"].get) if passing else INCUMBENT
    return {**decision, "adopted": adopted}


def save(results: dict, out: Path) -> None:
    write_results("prn_top_k_selection", results, RESULT_KEYS, out=out, indent=1)


def main() -> None:
    protocol = {"incumbent": INCUMBENT, "candidates": SETTINGS, "floor": FLOOR}
    run_selection("prn_top_k_selection", __doc__, "Rule, written before the first run (7 December, 22:13 UTC): ",
                  protocol, run_split, decide, save)


if __name__ == "__main__":
    sys.exit(main())
