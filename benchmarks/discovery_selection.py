"""Discovery settings chosen on NEU-DET, a data set we may tune on: MTD's labels are never read.

Usage: python benchmarks/discovery_selection.py [--neu ../shared/datasets/neu-det] [--candidates a,b]
       [--threads 1] [--out benchmarks/results/discovery_selection.json]

The task mirrors the MTD benchmark's zero-shot chain on another metal surface: ``--per-class`` NEU-DET images
of each of its six defect classes are the novel set; mutual scoring (zero-shot: NEU-DET has no defect-free
images) gives their anomaly maps, MEBin their crops, with the offline object prior; the known classes are
generated metal-plate defects (anomaly_discovery.data.synthetic), ``--base-per-class`` images per defect type.
Each candidate trains ``train_discovery`` with k="auto" (so the class-count estimate is part of the score) and
is scored against the NEU-DET class of each image. The crops are cached in ``--cache`` so candidates can run
in parallel processes; each row is merged into ``--out`` holding a lock on its folder.

Rule, fixed before any run: the candidate with the highest mean of NMI, ARI and F1 wins; within .01 of the
baseline (``DiscoveryConfig`` defaults when this ran, pinned in ``BASELINE``: depth was then 4), the
baseline stays. Added after the seed-0 run, as a
stricter check: ``--seed 1`` (another NEU-DET subset and generated base set) reruns the baseline and the winner,
and the library default follows the winner only if it leads there too.

Candidates (overrides of ``DiscoveryConfig``): a stronger frozen CNN (EfficientNet-Lite2), its last stage
trainable, a larger crop input (160 px), a shallower transformer (depth 2), longer training (60 epochs),
pseudo-label correction on, and the prototype-wins class-count criterion.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from anomaly_discovery.data import load_image, read_dataset
from anomaly_discovery.data.synthetic import generate_dataset
from anomaly_discovery.models.discovery.training import DiscoveryConfig, train_discovery
from anomaly_discovery.models.metrics import clustering_report
from anomaly_discovery.models.detectors.mutual_scoring import MutualScoringDetector
from anomaly_discovery.models.localisation.priors.factory import build_object_prior
from anomaly_discovery.models.localisation.localise import image_regions, localise_set
from anomaly_discovery.platform.jobs.discover import subset_by_class, synthetic_base_regions
from machine_info import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "discovery_selection.json"
BASELINE = {"depth": 4}
CANDIDATES = {name: BASELINE | overrides for name, overrides in {
    "baseline": {},
    "cnn=efficientnet_lite2": {"cnn": "efficientnet_lite2"},
    "trainable_cnn_stages=1": {"trainable_cnn_stages": 1},
    "image_size=160": {"image_size": 160},
    "depth=2": {"depth": 2},
    "epochs=60": {"epochs": 60},
    "pseudo_label_correction": {"pseudo_label_correction": True},
    "k_method=prototype_wins": {"k_method": "prototype_wins"},
}.items()}
MARGIN = 0.01


def neu_score(row: dict) -> float:
    """The rule's score: mean of NMI, ARI and F1 against the NEU-DET classes."""
    return float(np.mean([row["nmi"], row["ari"], row["f1"]]))


def neu_task(neu: Path, per_class: int, base_per_class: int, seed: int, cache: Path):
    """Novel NEU-DET regions, their image labels (for the scorer) and generated metal-plate base regions."""
    path = cache / f"neu{per_class}-base{base_per_class}-seed{seed}.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    samples = subset_by_class(read_dataset(neu, "neu", check=False).samples, lambda s: s.label, per_class, seed)
    images = [load_image(s.image_path) for s in samples]
    detections = MutualScoringDetector(progress=False).predict(images)
    prior, _ = build_object_prior("fallback")
    localised = localise_set(images, [d.anomaly_map for d in detections], prior)
    regions, truth = [], {}
    for index, (image, result) in enumerate(zip(images, localised)):
        truth[f"image{index}"] = samples[index].label
        regions += image_regions(f"image{index}", image, result)
    with tempfile.TemporaryDirectory() as folder:
        generate_dataset(folder, n_images=8 * base_per_class * 2, seed=seed, products=("metal_plate",),
                         progress=False)
        base = synthetic_base_regions(Path(folder), neu, base_per_class, seed, progress=False)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps((regions, truth, base)))
    return regions, truth, base


def run_candidate(name: str, regions, truth: dict, base) -> dict:
    config = DiscoveryConfig.of(k="auto", progress=False, **CANDIDATES[name])
    start = time.perf_counter()
    artifacts = train_discovery(config, regions, base)
    ids = sorted(artifacts.images)
    report = clustering_report(np.array([truth[i] for i in ids]), np.array([artifacts.images[i].label for i in ids]))
    row = {key: report[key] for key in ("nmi", "ari", "f1", "f1_macro")}
    return row | {"score": neu_score(row), "k_estimated": artifacts.k, "k_true": report["n_classes_true"],
                  "n_images": len(ids), "n_regions": len(regions), "n_base_regions": len(base),
                  "overrides": CANDIDATES[name], "seconds": round(time.perf_counter() - start, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def decide(candidates: dict) -> dict:
    """The rule: the best score wins unless the baseline is within ``MARGIN`` of it."""
    best = max(candidates, key=lambda name: candidates[name]["score"])
    if "baseline" in candidates and candidates[best]["score"] - candidates["baseline"]["score"] <= MARGIN:
        best = "baseline"
    return {"chosen": best, "complete": set(candidates) == set(CANDIDATES), "margin": MARGIN}


def merge_row(out: Path, name: str, row: dict, protocol: dict, machine: dict) -> dict:
    """Add one candidate's row to the run of its seed in ``out``, holding an exclusive lock on its folder (temp
    file + rename); returns that run."""
    folder = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        result = json.loads(out.read_text()) if out.is_file() else {}
        runs = result.setdefault("runs", {})
        run = runs.get(str(protocol["seed"]))
        if run is None or run["protocol"] != protocol:
            run = runs[str(protocol["seed"])] = {"protocol": protocol, "candidates": {}}
        run["candidates"][name] = row | {"machine": machine}
        run["decision"] = decide(run["candidates"])
        temporary = out.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(result, indent=1))
        temporary.replace(out)
    finally:
        os.close(folder)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neu", type=Path, default=ROOT.parent / "shared" / "datasets" / "neu-det")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--base-per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0,
                        help="the NEU-DET subset and generated base set; seed 0 is the selection run, other seeds "
                             "only confirm it")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "adisc-discovery-selection")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = args.candidates.split(",")
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    torch.set_num_threads(args.threads)
    regions, truth, base = neu_task(args.neu, args.per_class, args.base_per_class, args.seed, args.cache)
    protocol = {"novel": f"NEU-DET, {args.per_class} images per class, zero-shot maps",
                "base": f"generated metal_plate, {args.base_per_class} images per defect type",
                "seed": args.seed, "k": "auto", "rule": "max mean(NMI, ARI, F1); baseline unless beaten by > .01"}
    for name in names:
        machine = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                   "load_average": list(os.getloadavg()), "gpu": "none"}
        row = run_candidate(name, regions, truth, base)
        result = merge_row(args.out, name, row, protocol, machine)
        print(name, {k: row[k] for k in ("nmi", "ari", "f1", "score", "k_estimated", "seconds")},
              "→", result["decision"], flush=True)


if __name__ == "__main__":
    main()
