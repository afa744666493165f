"""PatchCore settings chosen on a product's normal images only: no benchmark label is read.

Usage: python benchmarks/detector_selection.py [--data ../shared/datasets/mtd] [--threads 1] [--tag NAME]

MTD's normal TRAINING images are split (seeded) into a fit part (80%) and a held-out part (20%). Two held-out
sets are built from the held-out normals, each with one anomalous copy of every normal image: a DRAEM-style
simulated anomaly (models.anomaly_synthesis: a Perlin mask filled with a procedural texture, image weight
β ~ U(0, .8), DRAEM's range) in ``simulated``, and the same with β ~ U(.6, .9) in ``faint`` (on the simulated
set, image AUROC saturates). The masks are the ground truth. Each candidate setting is fitted on the fit part
and scored on both sets: image AUROC, pixel AUROC, AUPRO. MTD's test images, defect folders and masks are
never opened, so the winner can be compared honestly on the MTD benchmark afterwards (mtd_detection.py).

Rule, fixed before any run: the candidate with the highest mean of image AUROC and AUPRO over both sets wins;
within .005 of the baseline (PatchCore's defaults when this ran: feature_dim 128, border_pad 32, 256 px, k 1),
the baseline stays.

Candidates: per-layer channel handling (``feature_dim`` 128, equal shares; or None, plain concatenation as in
anomalib), border handling (``border_pad`` 32 or 0) and the image score (``k`` 1, the top patch; or 9, the
PatchCore Eq. 7 reweighting anomalib uses); then, on the baseline, a finer input (``image_size`` 320) and a
larger memory bank (``coreset_ratio`` .1). The detector is fitted once per fit setting and scored with each k.
Map search (issue 13, for speed): the defaults (320 px, feature_dim 128, border_pad 32, anomalib's image score)
are fitted once and predicted with the exact nearest-neighbour search and with an inverted file searched in 32
lists (``probes=32``). Rule, written before that run: the inverted file becomes the default if, on both held-out
sets, its image AUROC, pixel AUROC and AUPRO are each within .002 of the exact search's. Fewer probes (issue 13,
item 4: PatchCore's throughput against anomalib's): the same defaults fitted once more and predicted with the exact
search and with 32, 16 and 8 probes. Rule, written before that run (2026-12-07): the default becomes the fewest
probes whose every metric on both sets is within .002 of the exact search's (32 stays if neither 16 nor 8 is).

Candidates already in the results file (same protocol) are kept, not rerun. Every candidate scores images by
the map's top patch (``image_score="map"``, with k 1 or 9 as named): since then PatchCore's default image
score is anomalib's published one, adopted without selection (issue 13), and the map settings chosen here are
unchanged. Writes benchmarks/results/detector_selection.json (``--tag NAME``: detector_selection.NAME.json)
with exactly RESULT_KEYS.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from anomaly_discovery.data import load_image, read_dataset
from anomaly_discovery.models.detectors.anomaly_synthesis import simulate_anomaly
from anomaly_discovery.models.metrics import aupro, image_auroc, pixel_auroc
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from machine_info import cpu_model
from results_file import add_output_arguments, results_path, write_results

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = ("benchmark", "data", "protocol", "machine", "candidates", "chosen", "search", "fewer_probes")
SEARCH_PROBES = 32
FEWER_PROBES = (32, 16, 8)
SEARCH_TOLERANCE = 0.002
BASELINE_FIT = {"feature_dim": 128, "border_pad": 32, "image_size": 256}
FIT_SETTINGS = (BASELINE_FIT, {**BASELINE_FIT, "feature_dim": None}, {**BASELINE_FIT, "border_pad": 0},
                {**BASELINE_FIT, "feature_dim": None, "border_pad": 0}, {**BASELINE_FIT, "image_size": 320},
                {**BASELINE_FIT, "coreset_ratio": 0.1})
IMAGE_SCORES = (1, 9)
HELD_OUT_SETS = {"simulated": (0.0, 0.8), "faint": (0.6, 0.9)}


def normal_split(normals: list, held_out_fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """MTD's normal training samples split (seeded) into (fit images, held-out images), decoded."""
    order = np.random.default_rng(seed).permutation(len(normals))
    n_held_out = int(round(len(normals) * held_out_fraction))
    return ([load_image(normals[i].image_path) for i in order[n_held_out:]],
            [load_image(normals[i].image_path) for i in order[:n_held_out]])


def held_out_set(images: list[np.ndarray], min_beta: float, max_beta: float,
                 seed: int) -> tuple[list, np.ndarray, list]:
    """The held-out normals followed by one simulated-anomaly copy of each: images, labels, masks."""
    rng = np.random.default_rng(seed)
    anomalous = [simulate_anomaly(image, rng, min_beta=min_beta, max_beta=max_beta) for image in images]
    test = images + [image for image, _ in anomalous]
    masks = [np.zeros(image.shape[:2], bool) for image in images] + [mask for _, mask in anomalous]
    return test, np.array([0] * len(images) + [1] * len(images)), masks


def score(detector: PatchCoreDetector, test, labels, masks) -> dict:
    start = time.perf_counter()
    detections = detector.predict(test)
    maps = [d.anomaly_map for d in detections]
    return {"image_auroc": round(image_auroc(labels, np.array([d.score for d in detections])), 4),
            "pixel_auroc": round(pixel_auroc(masks, maps), 4), "aupro": round(aupro(masks, maps), 4),
            "predict_seconds": round(time.perf_counter() - start, 1)}


def selection_score(scores: dict) -> float:
    """The rule's number: mean of image AUROC and AUPRO over the held-out sets."""
    return round(float(np.mean([[s["image_auroc"], s["aupro"]] for s in scores.values()])), 4)


def chosen(candidates: dict, defaults: str, margin: float = 0.005) -> str:
    """The best candidate by selection score, unless the defaults are within ``margin`` of it."""
    best = max(candidates, key=lambda name: candidates[name]["selection_score"])
    if candidates[best]["selection_score"] - candidates[defaults]["selection_score"] <= margin:
        return defaults
    return best


def candidate_name(fit_setting: dict, k: int) -> str:
    return " ".join(f"{key}={value}" for key, value in {**fit_setting, "k": k}.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "mtd")
    parser.add_argument("--held-out-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or results_path("detector_selection", args.tag)
    normals = [s for s in read_dataset(args.data, "mtd", check=False).samples if s.is_normal and s.split == "train"]
    fit_images, held_out = normal_split(normals, args.held_out_fraction, args.seed)
    n_held_out = len(held_out)
    sets = {name: held_out_set(held_out, *betas, args.seed) for name, betas in HELD_OUT_SETS.items()}
    protocol = {"fit_images": len(fit_images), "held_out_normal": n_held_out, "anomalous_copies_per_set": n_held_out,
                "beta_ranges": {name: list(betas) for name, betas in HELD_OUT_SETS.items()}, "seed": args.seed,
                "labels_read": "none: MTD normal training images only"}
    previous = json.loads(out.read_text()) if out.is_file() else {}
    result = {"benchmark": "detector_selection", "data": str(args.data), "protocol": protocol,
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads},
              "candidates": previous.get("candidates", {}) if previous.get("protocol") == protocol else {},
              "chosen": None, "search": previous.get("search") if previous.get("protocol") == protocol else None,
              "fewer_probes": previous.get("fewer_probes") if previous.get("protocol") == protocol else None}
    for fit_setting in FIT_SETTINGS:
        names = {k: candidate_name(fit_setting, k) for k in IMAGE_SCORES}
        if all(name in result["candidates"] for name in names.values()):
            continue
        detector = PatchCoreDetector(**fit_setting, image_score="map", progress=False)
        start = time.perf_counter()
        detector.fit(fit_images)
        fit_seconds = round(time.perf_counter() - start, 1)
        for k, name in names.items():
            detector.k = k
            scores = {set_name: score(detector, *held) for set_name, held in sets.items()}
            result["candidates"][name] = {**fit_setting, "k": k, "fit_seconds": fit_seconds, **scores,
                                          "selection_score": selection_score(scores)}
            print(name, result["candidates"][name], flush=True)
            save(result, out)
    result["chosen"] = chosen(result["candidates"], candidate_name(BASELINE_FIT, 1))
    save(result, out)
    if result["search"] is None:
        result["search"] = search_check(fit_images, sets, (SEARCH_PROBES,))
        result["search"]["adopted"] = result["search"]["within_tolerance"][f"probes={SEARCH_PROBES}"]
        save(result, out)
    if result["fewer_probes"] is None:
        result["fewer_probes"] = search_check(fit_images, sets, FEWER_PROBES)
        passing = [p for p in FEWER_PROBES if result["fewer_probes"]["within_tolerance"][f"probes={p}"]]
        result["fewer_probes"]["chosen_probes"] = min(passing, default=SEARCH_PROBES)
        save(result, out)
    print(f"chosen: {result['chosen']}; inverted file adopted: {result['search']['adopted']}; "
          f"probes chosen: {result['fewer_probes']['chosen_probes']}; wrote {out}")


def search_check(fit_images: list, sets: dict, probes_candidates: tuple[int, ...]) -> dict:
    """The defaults fitted once, scored with the exact map search and with the inverted file at each number of
    probes; each marked within the tolerance or not (every metric on both sets within SEARCH_TOLERANCE of exact)."""
    detector = PatchCoreDetector(progress=False, probes=None)
    start = time.perf_counter()
    detector.fit(fit_images)
    names = ", ".join(f"probes={probes}" for probes in probes_candidates)
    check = {"settings": {"image_size": detector.image_size, "feature_dim": detector.feature_dim,
                          "border_pad": detector.border_pad, "image_score": detector.image_score},
             "fit_seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
             "rule": f"{names}: within tolerance if every metric on both sets is within {SEARCH_TOLERANCE} of the "
                     "exact search's" + ("; the fewest probes within it is chosen" if len(probes_candidates) > 1
                                         else "; adopted if so")}
    for probes in (None, *probes_candidates):
        detector.probes = probes
        detector._set_bank(detector.memory_bank_, detector.score_bank_)
        check["exact" if probes is None else f"probes={probes}"] = {name: score(detector, *held)
                                                                     for name, held in sets.items()}
        print(probes, check, flush=True)
    exact = check["exact"]
    check["within_tolerance"] = {
        f"probes={probes}": all(abs(check[f"probes={probes}"][name][metric] - exact[name][metric]) <= SEARCH_TOLERANCE
                                for name in sets for metric in ("image_auroc", "pixel_auroc", "aupro"))
        for probes in probes_candidates}
    return check


def save(result: dict, out: Path) -> None:
    """Write exactly RESULT_KEYS, atomically, through the shared writer."""
    write_results("detector_selection", result, RESULT_KEYS, out=out, indent=1)


if __name__ == "__main__":
    main()
