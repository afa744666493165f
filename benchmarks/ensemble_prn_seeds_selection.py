"""Does the ensemble localise better with two PRN seeds than with one? Decided on a product's normal images only.

Usage: python benchmarks/ensemble_prn_seeds_selection.py [--data ../shared/datasets/mtd] [--splits 0 1]
       [--threads 1] [--tag NAME] [--decide-only]

PRN's maps change from one training seed to the next (its learning curve in prn_learning_curve.py rises and falls
by up to .4 AUPRO between evaluations), so averaging two seeds should steady PRN's half of the ensemble, at twice
PRN's training time. Protocol, as benchmarks/ensemble_selection.py: on each split of MTD's normal TRAINING images
(seeded; 80% fit, 20% held out) one ``DetectorEnsemble`` holds PatchCore, PRN with seed 0 and PRN with seed 1,
all fitted on the same fit images (the PRNs also on the 10 real anomalies mtd_detection.py gives PRN) and
standardised on the same held-back normals. Its members' predictions on the three held-out sets (``simulated``,
``faint``: DRAEM-style textures; ``drawn``: the generator's six defect kinds) are combined two ways:
``one PRN`` = PatchCore and PRN seed 0 at equal weight (the default until now) and ``two PRNs`` = PatchCore at
1/2 and each PRN at 1/4 (``DetectorEnsemble(prn_seeds=(0, 1))``). The members alone are scored as well. MTD's test
images other than PRN's 10 training anomalies, and every test mask, are never opened.

Rule, written before the first run: both candidates weigh PRN the same (one half), so the sets PRN trains on
(simulated, faint) favour neither by construction and are ruled on too. Averaged over the two splits, ``two PRNs``
becomes the ensemble's default (``prn_seeds=(0, 1)``) if (a) on the drawn set (kinds neither member trains on) its
mean of image AUROC and AUPRO is not below one PRN's, and (b) its AUPRO averaged over the three held-out sets
exceeds one PRN's by more than .005, and (c) a whole MTD fit (761 normal images) with a second PRN stays within
the issue's 30 minutes, estimated from this run's measured PRN seconds per fit image. Otherwise the ensemble keeps
one PRN.

Writes benchmarks/results/ensemble_prn_seeds_selection.json (``--tag NAME``: ...NAME.json) with exactly
RESULT_KEYS. ``--decide-only`` fits nothing: it reads that file's per-split measurements and applies the rule again
(after a fix to how the rule's numbers are computed from them, not to the rule).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from anomaly_discovery.data import load_image, load_mask, read_dataset
from anomaly_discovery.models.detectors.ensemble import CALIBRATION_FRACTION, DetectorEnsemble, calibration_split
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector
from anomaly_discovery.models.detectors.prn_training import select_real_anomalies
from detector_selection import HELD_OUT_SETS, held_out_set, normal_split
from ensemble_selection import RULED_SET, drawn_set, metrics, set_score
from machine_info import cpu_model
from results_file import add_output_arguments, results_path, write_results

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
RESULT_KEYS = ("benchmark", "machine", "protocol", "rule", "splits", "mean_over_splits", "decision",
               "load_average_at_start", "load_average_at_end")
PRN_SEEDS = (0, 1)
CANDIDATES = {"one PRN": (0.5, 0.5, 0.0), "two PRNs": (0.5, 0.25, 0.25)}
MEMBERS = ("patchcore", "prn seed 0", "prn seed 1")
AUPRO_MARGIN = 0.005
MTD_FIT_IMAGES = 761
FIT_BUDGET_S = 30 * 60


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class TimedFit:
    """A member whose fit is timed (``seconds``); everything else passes through."""

    def __init__(self, member):
        self.member, self.name, self.image_size, self.seconds = member, member.name, member.image_size, 0.0

    def fit(self, *args, **kwargs) -> "TimedFit":
        start = time.perf_counter()
        self.member.fit(*args, **kwargs)
        self.seconds = time.perf_counter() - start
        return self

    def predict(self, images):
        return self.member.predict(images)


def split_sets(normals: list, held_out_fraction: float, split: int, limit: int | None) -> tuple[list, list, dict]:
    """One split of the normal training images: (fit images, held-out images, the three held-out sets)."""
    fit_images, held_images = normal_split(normals, held_out_fraction, split)
    fit_images, held_images = fit_images[:limit], held_images[:limit]
    sets = {name: held_out_set(held_images, *betas, split) for name, betas in HELD_OUT_SETS.items()}
    sets[RULED_SET] = drawn_set(held_images, split)
    return fit_images, held_images, sets


def score_sets(ensemble: DetectorEnsemble, sets: dict, members: tuple, candidates: dict, result: dict,
               split: int) -> None:
    """Each member's and each candidate weighting's metrics on every set, into ``result["scores"]``."""
    for set_name, (test, labels, masks) in sets.items():
        per_member = ensemble.predict_members(test)
        for name, detections in zip(members, per_member):
            result["scores"][name][set_name] = metrics(detections, labels, masks)
        for name, weights in candidates.items():
            result["scores"][name][set_name] = metrics(ensemble.combine(per_member, weights=weights), labels, masks)
        print(f"split {split} {set_name}", {name: s[set_name] for name, s in result["scores"].items()}, flush=True)


def run_split(split: int, normals: list, real: list, held_out_fraction: float, epochs: int | None,
              limit: int | None) -> dict:
    """Fit the three members on one split, score members and both candidates on the three held-out sets."""
    fit_images, held_images, sets = split_sets(normals, held_out_fraction, split, limit)
    length = {} if epochs is None else {"epochs": epochs}
    prns = [TimedFit(PRNDetector(PRNConfig(progress=False, seed=seed, **length))) for seed in PRN_SEEDS]
    ensemble = DetectorEnsemble(members=(PatchCoreDetector(progress=False, seed=split), *prns), seed=split)
    start = time.perf_counter()
    ensemble.fit(fit_images, real_anomalies=real)
    fit_s = time.perf_counter() - start
    n_fitted = len(fit_images) - ensemble.n_calibration_
    prn_s = [round(prn.seconds, 1) for prn in prns]
    result = {"fit_images": n_fitted, "held_out_normal": len(held_images), "fit_seconds": round(fit_s, 1),
              "prn_fit_seconds": prn_s, "scores": {name: {} for name in (*MEMBERS, *CANDIDATES)}}
    score_sets(ensemble, sets, MEMBERS, CANDIDATES, result, split)
    return result


def mean_over_splits(splits: dict) -> dict:
    """Each candidate's and member's metrics averaged over the splits, set by set."""
    first = next(iter(splits.values()))["scores"]
    return {name: {set_name: {metric: round(float(np.mean([s["scores"][name][set_name][metric]
                                                            for s in splits.values()])), 4)
                              for metric in first[name][set_name]}
                   for set_name in first[name]}
            for name in first}


def decide(mean: dict, splits: dict) -> dict:
    """The rule (module docstring): (a) drawn not below, (b) mean AUPRO over the sets above by the margin,
    (c) the estimated whole-MTD fit with a second PRN within the budget."""
    one, two = mean["one PRN"], mean["two PRNs"]
    drawn = {"one PRN": set_score(one[RULED_SET]), "two PRNs": set_score(two[RULED_SET])}
    mean_aupro = {name: round(float(np.mean([scores[s]["aupro"] for s in scores])), 4)
                  for name, scores in (("one PRN", one), ("two PRNs", two))}
    mtd_fit_images = len(calibration_split(MTD_FIT_IMAGES, CALIBRATION_FRACTION, 0)[0])
    per_image = np.mean([max(s["prn_fit_seconds"]) / s["fit_images"] for s in splits.values()])
    rest_per_image = np.mean([(s["fit_seconds"] - sum(s["prn_fit_seconds"])) / s["fit_images"]
                              for s in splits.values()])
    mtd_fit_s = round(float((2 * per_image + rest_per_image) * mtd_fit_images), 1)
    checks = {"drawn_not_below": drawn["two PRNs"] >= drawn["one PRN"],
              "aupro_gain_over_margin": round(mean_aupro["two PRNs"] - mean_aupro["one PRN"], 4) > AUPRO_MARGIN,
              "mtd_fit_within_budget": mtd_fit_s <= FIT_BUDGET_S}
    return {"drawn_score": drawn, "mean_aupro_over_sets": mean_aupro,
            "aupro_gain": round(mean_aupro["two PRNs"] - mean_aupro["one PRN"], 4),
            "estimated_mtd_fit_seconds_two_prns": mtd_fit_s, "checks": checks,
            "adopted": "two PRNs" if all(checks.values()) else "one PRN"}


def run_selection(name: str, doc: str, rule_marker: str, protocol: dict, run_split, decide, save) -> None:
    """The command line both ensemble rules share: fit and score each split (``run_split``), average, apply
    ``decide``, write ``benchmarks/results/<name>.json`` by the script's own ``save(results, out)``;
    ``--decide-only`` applies the rule again to the file's per-split measurements. ``protocol``: the rule's own
    entries (members, candidates)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS / "mtd")
    parser.add_argument("--held-out-fraction", type=float, default=0.2)
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=None, help="PRN epochs (default: PRNConfig's; quick runs)")
    parser.add_argument("--limit", type=int, default=None, help="at most N fit and N held-out images (quick runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decide-only", action="store_true",
                        help="fit nothing: apply the rule again to the results file's per-split measurements")
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = args.out or results_path(name, args.tag)
    if args.decide_only:
        results = json.loads(out.read_text())
    else:
        samples = read_dataset(args.data, "mtd", check=False).samples
        normals = [s for s in samples if s.is_normal and s.split == "train"]
        chosen_real, _ = select_real_anomalies([s for s in samples if s.split == "test"], 10, seed=0)
        real = [(load_image(s.image_path), load_mask(s.mask_path)) for s in chosen_real]
        results = {"benchmark": name,
                   "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads,
                               "torch": torch.__version__, "gpu": "none (CPU only)"},
                   "protocol": {"splits": args.splits, "held_out_fraction": args.held_out_fraction, **protocol,
                                "prn_epochs": args.epochs or PRNConfig().epochs,
                                "beta_ranges": {set_name: list(betas) for set_name, betas in HELD_OUT_SETS.items()},
                                "real_anomalies": [f"{s.label}/{s.image_path.name}" for s in chosen_real],
                                "limit": args.limit,
                                "labels_read": "MTD normal training images; the masks of PRN's 10 real training "
                                               "anomalies (for training only); no test label is used for scoring"},
                   "rule": doc.split(rule_marker)[1].split("\n\n")[0].replace("\n", " "),
                   "splits": {}, "mean_over_splits": None, "decision": None,
                   "load_average_at_start": load_average(), "load_average_at_end": None}
        for split in args.splits:
            results["splits"][str(split)] = run_split(split, normals, real, args.held_out_fraction, args.epochs,
                                                      args.limit)
        results["load_average_at_end"] = load_average()
    results["mean_over_splits"] = mean_over_splits(results["splits"])
    results["decision"] = decide(results["mean_over_splits"], results["splits"])
    save(results, out)
    print(f"decision: {results['decision']}; wrote {out}")


def save(results: dict, out: Path) -> None:
    write_results("ensemble_prn_seeds_selection", results, RESULT_KEYS, out=out, indent=1)


def main() -> None:
    run_selection("ensemble_prn_seeds_selection", __doc__, "Rule, written before the first run: ",
                  {"prn_seeds": list(PRN_SEEDS),
                   "candidates": {name: dict(zip(MEMBERS, weights)) for name, weights in CANDIDATES.items()}},
                  run_split, decide, save)


if __name__ == "__main__":
    sys.exit(main())
