"""MTD discovery benchmark: the whole chain (detect → MEBin crops → AMGA discovery → region merging) on
../shared/datasets/mtd, scored against the MTD class folders (the scorer is the only reader of labels).

Protocols (../shared/datasets/README.md): ``defects-5`` (the 392 defect images) and ``with-good-6`` (plus the 191
normal test images). Settings: ``semi`` (PatchCore fitted on the 761 normal training images) and ``zero-shot``
(mutual scoring, no normal images). Known classes: NEU-DET crops (``--neu``). Parts: ``main`` (semi, both
protocols), ``zero-shot``, ``ablations`` (guidance none / hard / amga, object prior none / fallback on semi
defects-5), ``loco`` (leave one class out: unseen-class AUROC and FPR at 95% TPR) and ``k-known`` (semi with the
number of classes given, the protocol of AnomalyNCD's anchors; that count is all it reads from the labels).
Hyper-parameters are the library defaults, chosen on synthetic data and NEU-DET (discovery_selection.py);
nothing here is tuned on MTD.

    .venv/bin/python benchmarks/mtd_discovery.py --parts main
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from anomaly_discovery.data import load_image, read_dataset
from anomaly_discovery.models.detectors.protocol import Detection
from anomaly_discovery.models.discovery.training import DiscoveryConfig, predict_regions, train_discovery
from anomaly_discovery.models.metrics import clustering_report
from anomaly_discovery.models.detectors.mutual_scoring import MutualScoringDetector
from anomaly_discovery.models.discovery.outliers import evaluate_outlier_scores, knn_distance_score
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.localisation.priors.factory import build_object_prior
from anomaly_discovery.models.localisation.localise import image_regions, localise_set
from anomaly_discovery.platform.jobs.discover import neu_base_regions
from machine_info import cpu_model

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("defects-5", "with-good-6")


def protocol_samples(samples, protocol: str):
    test = [s for s in samples if s.split == "test"]
    return test if protocol == "with-good-6" else [s for s in test if not s.is_normal]


def detect_maps(samples, setting: str, normal_train, batch: int = 16):
    """Anomaly maps of ``samples``: PatchCore fitted on normal images (semi) or mutual scoring (zero-shot)."""
    images = [load_image(s.image_path) for s in samples]
    if setting == "semi":
        detector = PatchCoreDetector(progress=False).fit([load_image(s.image_path) for s in normal_train])
        return [d for start in range(0, len(images), batch) for d in detector.predict(images[start:start + batch])]
    return MutualScoringDetector(progress=False).predict(images)


def cached_detections(samples, setting: str, normal_train, cache: Path) -> tuple[list[Detection], float]:
    """``detect_maps`` once per setting; the maps are kept (float16) in ``cache`` so parts can run separately.
    Returns the detections and the seconds detection took when it ran."""
    path = cache / f"{setting}.npz"
    if path.is_file():
        stored = np.load(path)
        maps = [stored[f"map{i}"].astype(np.float32) for i in range(len(samples))]
        return [Detection(float(v), m) for v, m in zip(stored["scores"], maps)], float(stored["seconds"])
    start = time.perf_counter()
    detections = detect_maps(samples, setting, normal_train)
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, scores=np.array([d.score for d in detections]), seconds=seconds,
             **{f"map{i}": d.anomaly_map.astype(np.float16) for i, d in enumerate(detections)})
    return detections, seconds


def regions_for(samples, detections, prior_kind: str):
    """Novel regions of a protocol's images (MEBin over that set) and, for the scorer only, their labels by id.
    Ids carry no label: ``image<N>``."""
    prior, _ = build_object_prior(prior_kind)
    localised = localise_set((load_image(s.image_path) for s in samples), [d.anomaly_map for d in detections], prior)
    regions, truth = [], {}
    for index, (sample, result) in enumerate(zip(samples, localised)):
        image_id = f"image{index}"
        truth[image_id] = sample.label
        regions += image_regions(image_id, load_image(sample.image_path), result)
    return regions, truth


def discover_and_score(regions, truth: dict, base, config: DiscoveryConfig) -> dict:
    start = time.perf_counter()
    artifacts = train_discovery(config, regions, base)
    seconds = time.perf_counter() - start
    ids = sorted(artifacts.images)
    report = clustering_report(np.array([truth[i] for i in ids]), np.array([artifacts.images[i].label for i in ids]))
    return {"nmi": report["nmi"], "ari": report["ari"], "f1": report["f1"], "f1_macro": report["f1_macro"],
            "k_estimated": artifacts.k_estimated if artifacts.k_estimated is not None else artifacts.k,
            "k_true": report["n_classes_true"], "n_images": len(ids), "n_regions": len(regions),
            "epochs": config.optimisation.epochs, "seconds": round(seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def leave_one_class_out(regions, truth: dict, base, config: DiscoveryConfig, seed: int = 0) -> dict:
    """Train without one class (80% of the other classes' images), score the held-out class's crops and the
    other classes' unseen 20% by k-NN distance to the training embeddings; positives = the unseen class."""
    rng = np.random.default_rng(seed)
    per_class = {}
    for held_out in sorted({truth[r.image_id] for r in regions}):
        seen_ids = sorted({r.image_id for r in regions if truth[r.image_id] != held_out})
        known_test = set(rng.choice(seen_ids, size=max(1, len(seen_ids) // 5), replace=False))
        train = [r for r in regions if truth[r.image_id] != held_out and r.image_id not in known_test]
        artifacts = train_discovery(config.replace(k="auto"), train, base)
        reference = torch.as_tensor(artifacts.regions.embeddings)
        scores = {}
        for name, subset in (("known", [r for r in regions if r.image_id in known_test]),
                             ("unseen", [r for r in regions if truth[r.image_id] == held_out])):
            embedded = torch.as_tensor(predict_regions(artifacts, subset).embeddings)
            scores[name] = knn_distance_score(embedded, reference, k=config.classes.outlier_k)
        per_class[held_out] = evaluate_outlier_scores(scores["known"], scores["unseen"])
    return {"auroc": float(np.mean([v["auroc"] for v in per_class.values()])),
            "fpr95": float(np.mean([v["fpr95"] for v in per_class.values()])), "per_class": per_class,
            "epochs": config.optimisation.epochs}


def write_result(path: Path, result: dict) -> None:
    """Write the JSON after every row (temp file + rename), so an interrupted run keeps what it measured."""
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=1))
    temporary.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mtd")
    parser.add_argument("--neu", type=Path, default=ROOT.parent / "shared" / "datasets" / "neu-det")
    parser.add_argument("--parts", default="main",
                        help="comma list of main, zero-shot, ablations, loco, k-known (semi with K given, as "
                             "AnomalyNCD assumes)")
    parser.add_argument("--base-per-class", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None,
                        help="discovery epochs for this run's parts (default: DiscoveryConfig's); each row records it")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/adisc-mtd-discovery-cache"),
                        help="where the anomaly maps of each setting are kept between runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mtd_discovery.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    samples = read_dataset(args.data, "mtd").samples
    normal_train = [s for s in samples if s.split == "train" and s.is_normal]
    base = neu_base_regions(args.neu, args.base_per_class, seed=0, progress=False)
    config = DiscoveryConfig.of(k="auto", progress=False)
    if args.epochs is not None:
        config = config.replace(epochs=args.epochs)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["machine"] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                         "torch_threads": args.threads, "load_average": list(os.getloadavg()), "gpu": "none"}
    result["settings"] = {"detector_semi": "patchcore (mobilenet_v2, defaults)", "detector_zero_shot":
                          "mutual scoring (mobilenet_v2, defaults)", "discovery": "DiscoveryConfig defaults, k=auto",
                          "base": f"NEU-DET, {args.base_per_class} images per class"}
    all_test = protocol_samples(samples, "with-good-6")
    settings = (["semi"] if parts & {"main", "ablations", "loco", "k-known"} else []) + \
               (["zero-shot"] if "zero-shot" in parts else [])
    for setting in settings:
        found, detect_seconds = cached_detections(all_test, setting, normal_train, args.cache)
        detections = dict(zip([s.image_path for s in all_test], found))
        for protocol in PROTOCOLS:
            if setting == "semi" and not parts & {"main", "k-known"} and protocol != "defects-5":
                continue
            chosen = protocol_samples(samples, protocol)
            regions, truth = regions_for(chosen, [detections[s.image_path] for s in chosen], "fallback")
            if setting == "zero-shot" or "main" in parts:
                row = discover_and_score(regions, truth, base, config)
                row["detect_seconds"] = round(detect_seconds, 1)
                result.setdefault(setting, {})[protocol] = row
                print(setting, protocol, row, flush=True)
                write_result(args.out, result)
            if setting == "semi" and "k-known" in parts:
                row = discover_and_score(regions, truth, base, config.replace(k=len(set(truth.values()))))
                result.setdefault("k_known", {}).setdefault(setting, {})[protocol] = row
                print("k known", setting, protocol, row, flush=True)
                write_result(args.out, result)
            if setting == "semi" and protocol == "defects-5" and "ablations" in parts:
                ablations = result.setdefault("ablations", {})
                for guidance in ("none", "hard", "amga"):
                    ablations[f"guidance={guidance}"] = discover_and_score(regions, truth, base,
                                                                           config.replace(guidance=guidance))
                    print("ablation", guidance, ablations[f"guidance={guidance}"], flush=True)
                    write_result(args.out, result)
                prior_free, _ = regions_for(chosen, [detections[s.image_path] for s in chosen], "none")
                ablations["object-prior=none"] = discover_and_score(prior_free, truth, base, config)
                ablations["object-prior=fallback"] = ablations["guidance=amga"]
                print("ablations", ablations, flush=True)
                write_result(args.out, result)
            if setting == "semi" and protocol == "defects-5" and "loco" in parts:
                result["leave_one_class_out"] = leave_one_class_out(regions, truth, base, config)
                print("loco", result["leave_one_class_out"], flush=True)
                write_result(args.out, result)
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
