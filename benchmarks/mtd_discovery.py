"""Discovery on MTD and NEU-DET: the training-free floor (``kind="frozen"``) beside the learned model
(``kind="learned"``), on the same regions, with K given and estimated by the same rule (issue 14).

The chain: detector maps → MEBin crops with the offline object prior (``localise_set`` over each protocol's images)
→ discovery → area-weighted region merging, scored at the image level against the class folders, which only the
scorer reads. MTD protocols (``../shared/datasets/README.md``): ``defects-5`` (392 defect images) and
``with-good-6`` (plus the 191 normal test images). Maps: ``semi`` (PatchCore fitted on the 761 normal training
images, which discovery also reads as its normal set) and ``zero-shot`` (mutual scoring, no normal image).
NEU-DET (all 1,800 images, zero-shot maps) is the second data set: ``neu-det`` rows, with the whole-image k-means
baseline of the issue (``model: "whole-image"``: the final MobileNetV2 layer averaged over the 224 px image, K given)
on the same images. No setting here was chosen on MTD: the defaults come from NEU-DET and generated data
(``models/discovery/frozen.py``, ``class_count.py``, ``neighbour_consistency.py`` say how), but for one veto: the
local outlier factor that ``discovery_selection.py``'s part ``open_world_score`` picked was refused on this
file's leave-one-class-out (``--outlier-score lof --tag outlier-lof``), and the k-NN distance, chosen on NEU-DET
and generated data, stays.

Leave one class out (MTD, semi, defects-5): for each class, the learned model is trained (K estimated) on 80% of
the other classes' images; the held-out class's crops and the other classes' unseen 20% are scored by the
model's outlier score (``outlier_score``, ``outlier_k``: the product's, or ``--outlier-score`` / ``--outlier-k`` with
``--tag``) against its training crops; AUROC and FPR at 95% TPR with the unseen class as positives. K is estimated
there too, so the class-count criterion moves these numbers: ``--k-method NAME --tag NAME`` writes a run with
another criterion (the default before, say) to its own file, on the same cached maps.

Without normal images (the zero-shot rows, NEU-DET) discovery may remove the run's own images' main variation
(``own_projection``, chosen on NEU-DET and generated data). ``--own-projection never --tag NAME`` writes the rows
without it to their own file, on the same cached maps, for the side-by-side comparison (the maps, and so every
number here, move with the machine's floating point: compare runs on one machine). ``--image-turns 4 --tag NAME``
does the same for the image view averaged over the whole image's quarter turns (``image_turns_selection.py``).

    .venv/bin/python benchmarks/mtd_discovery.py [--parts mtd,neu,loco] [--maps semi,zero-shot] [--threads 1]
        [--own-projection auto|always|never --tag NAME] [--image-turns 1|4 --tag NAME]
        [--outlier-score knn|lof --outlier-k K --tag NAME] [--k-method METHOD --tag NAME]
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
from anomaly_discovery.models.detectors.mutual_scoring import MutualScoringDetector
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.detectors.protocol import Detection
from anomaly_discovery.models.discovery.config import CLASS_COUNT_METHODS, OWN_PROJECTIONS, DiscoveryConfig
from anomaly_discovery.models.discovery.outliers import OUTLIER_SCORES, DistanceOutlierScorer, evaluate_outlier_scores
from anomaly_discovery.models.discovery.training import predict_regions, train_discovery
from anomaly_discovery.models.discovery.views import IMAGE_TURNS, ViewExtractor, image_features, unit_rows
from anomaly_discovery.models.discovery.frozen import kmeans
from anomaly_discovery.models.localisation.localise import image_regions, localise_set
from anomaly_discovery.models.localisation.priors.factory import build_object_prior
from anomaly_discovery.models.metrics import clustering_report
from machine_info import cpu_model
from results_file import add_output_arguments, results_path, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = ("machine", "settings", "semi", "zero-shot", "leave_one_class_out", "rows", "learning_curve")
PROTOCOLS = ("defects-5", "with-good-6")
MODELS = ("frozen", "learned")


def protocol_samples(samples, protocol: str):
    test = [s for s in samples if s.split == "test"]
    return test if protocol == "with-good-6" else [s for s in test if not s.is_normal]


def detect_maps(samples, setting: str, normal_train, batch: int = 16) -> list[Detection]:
    """PatchCore fitted on the normal training images (semi) or mutual scoring (zero-shot)."""
    if setting == "semi":
        detector = PatchCoreDetector(progress=False).fit([load_image(s.image_path) for s in normal_train])
        return [d for start in range(0, len(samples), batch)
                for d in detector.predict([load_image(s.image_path) for s in samples[start:start + batch]])]
    return MutualScoringDetector(progress=False).predict([load_image(s.image_path) for s in samples])


def cached_maps(samples, setting: str, normal_train, cache: Path, name: str) -> tuple[list[Detection], float]:
    """``detect_maps`` once per data set and setting, kept (float16) in ``cache`` between runs. The maps are read
    back from the file also on the run that writes it, so a first run sees the same (float16) maps as every later
    one (MEBin's regions, and so every discovery number, move with the maps' last bits)."""
    path = cache / f"{name}-{setting}.npz"
    if not path.is_file():
        start = time.perf_counter()
        detections = detect_maps(samples, setting, normal_train)
        seconds = time.perf_counter() - start
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, scores=np.array([d.score for d in detections]), seconds=seconds,
                 **{f"map{i}": d.anomaly_map.astype(np.float16) for i, d in enumerate(detections)})
    stored = np.load(path)
    return ([Detection(float(v), stored[f"map{i}"].astype(np.float32)) for i, v in enumerate(stored["scores"])],
            float(stored["seconds"]))


def regions_for(samples, detections):
    """Novel regions of a set (MEBin over that set; ids ``image<N>``, which carry no label), the image paths by
    id, and, for the scorer only, the labels by id."""
    prior, _ = build_object_prior("fallback")
    localised = localise_set((load_image(s.image_path) for s in samples), [d.anomaly_map for d in detections], prior)
    regions, paths, truth = [], {}, {}
    for index, (sample, result) in enumerate(zip(samples, localised)):
        image_id = f"image{index}"
        paths[image_id], truth[image_id] = str(sample.image_path), sample.label
        regions += image_regions(image_id, load_image(sample.image_path), result)
    return regions, paths, truth


def score(artifacts, truth: dict) -> dict:
    ids = sorted(artifacts.images)
    report = clustering_report(np.array([truth[i] for i in ids]), np.array([artifacts.images[i].label for i in ids]))
    return {"nmi": report["nmi"], "ari": report["ari"], "f1": report["f1"], "k_true": report["n_classes_true"]}


def discover(model: str, k, regions, paths: dict, truth: dict, normals: list[str], **settings) -> tuple[dict, object]:
    config = DiscoveryConfig.of(kind=model, k=k, progress=False, **settings)
    start = time.perf_counter()
    artifacts = train_discovery(config, regions, images=paths, normal_images=normals)
    seconds = time.perf_counter() - start
    row = score(artifacts, truth) | {"k_estimated": artifacts.k, "train_s": round(seconds, 1),
                                     "view_weights": artifacts.metrics["view_weights"],
                                     "nuisance_projection": artifacts.metrics["nuisance_projection"],
                                     "own_images_silhouette": artifacts.metrics["own_images_silhouette"],
                                     "n_regions": len(regions),
                                     "n_images": len(truth),
                                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    return row, artifacts


def whole_image_baseline(paths: dict, truth: dict, k: int) -> dict:
    """k-means (K given) on the final MobileNetV2 layer averaged over each whole 224 px image."""
    ids = sorted(paths)
    extractor = ViewExtractor("mobilenet_v2")
    features = unit_rows(image_features(extractor, (load_image(paths[i]) for i in ids), len(ids))[-1])
    labels = kmeans(features, k, 0).labels_
    report = clustering_report(np.array([truth[i] for i in ids]), labels)
    return {"nmi": report["nmi"], "ari": report["ari"], "f1": report["f1"], "k_true": report["n_classes_true"]}


def leave_one_class_out(regions, paths: dict, truth: dict, normals: list[str], seed: int = 0, **settings) -> dict:
    """Each class held out in turn: the learned model (defaults, but for ``settings``) and its floor
    (``kind="frozen"``) are fitted on the other classes minus a fifth of their images; their outlier scores (the
    product's ``outlier_score`` and ``outlier_k``) of those known test images' crops against the held-out class's.
    The learned model's numbers at the top level, the floor's under ``floor``."""
    rng = np.random.default_rng(seed)
    per_class = {model: {} for model in MODELS}
    for held_out in sorted(set(truth.values())):
        seen_ids = sorted({r.image_id for r in regions if truth[r.image_id] != held_out})
        known_test = set(rng.choice(seen_ids, size=max(1, len(seen_ids) // 5), replace=False))
        train = [r for r in regions if truth[r.image_id] != held_out and r.image_id not in known_test]
        for model in MODELS:
            artifacts = train_discovery(DiscoveryConfig.of(kind=model, progress=False, **settings), train,
                                        images=paths, normal_images=normals)
            classes = artifacts.predictor.config.classes
            scorer = DistanceOutlierScorer(classes.outlier_score, torch.as_tensor(artifacts.regions.embeddings),
                                           classes.outlier_k)
            scores = {}
            for name, subset in (("known", [r for r in regions if r.image_id in known_test]),
                                 ("unseen", [r for r in regions if truth[r.image_id] == held_out])):
                embedded = torch.as_tensor(predict_regions(artifacts, subset, paths).embeddings)
                scores[name] = scorer.score(embedded)
            per_class[model][held_out] = evaluate_outlier_scores(scores["known"], scores["unseen"])
            print("loco", model, held_out, per_class[model][held_out], flush=True)

    def summary(results: dict) -> dict:
        return {"auroc": float(np.mean([v["auroc"] for v in results.values()])),
                "fpr95": float(np.mean([v["fpr95"] for v in results.values()])), "per_class": results}

    return summary(per_class["learned"]) | {"floor": summary(per_class["frozen"])}


def write_result(path: Path, result: dict) -> None:
    """Exactly ``RESULT_KEYS`` (``None`` for a part not run yet), through the shared writer, after every row."""
    unknown = sorted(set(result) - set(RESULT_KEYS))
    if unknown:
        raise ValueError(f"keys {unknown} are not among RESULT_KEYS")
    write_results("mtd_discovery", {key: result.get(key) for key in RESULT_KEYS}, RESULT_KEYS, out=path, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mtd")
    parser.add_argument("--neu", type=Path, default=ROOT.parent / "shared" / "datasets" / "neu-det")
    parser.add_argument("--parts", default="mtd,neu,loco", help="comma list of mtd, neu, loco")
    parser.add_argument("--maps", default="semi,zero-shot", help="comma list of semi, zero-shot (parts mtd, loco)")
    parser.add_argument("--own-projection", choices=OWN_PROJECTIONS, default=None,
                        help="discovery's own_projection for every row (default: the product's); with --tag")
    parser.add_argument("--image-turns", type=int, choices=IMAGE_TURNS, default=None,
                        help="discovery's image_turns for every row (default: the product's); with --tag")
    parser.add_argument("--outlier-score", choices=OUTLIER_SCORES, default=None,
                        help="discovery's outlier_score (part loco; default: the product's); with --tag")
    parser.add_argument("--outlier-k", type=int, default=None,
                        help="discovery's outlier_k (part loco; default: the product's); with --tag")
    parser.add_argument("--k-method", choices=CLASS_COUNT_METHODS, default=None,
                        help="discovery's k_method for every row (default: the product's); with --tag")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/adisc-discovery-maps"),
                        help="where each data set's anomaly maps are kept between runs")
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    out = args.out or results_path("mtd_discovery", args.tag)
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    result = {key: earlier[key] for key in RESULT_KEYS if key in earlier}
    result["machine"] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                         "load_average": list(os.getloadavg()), "gpu": "none"}
    result["settings"] = {"detector_semi": "patchcore (defaults)", "detector_zero_shot": "mutual scoring (defaults)",
                          "discovery": "DiscoveryConfig defaults; kind and k as each row says"
                          + (f"; own_projection {args.own_projection}" if args.own_projection else "")
                          + (f"; image_turns {args.image_turns}" if args.image_turns else ""), "base": "none",
                          "object_prior": "fallback", "k_method": args.k_method or DiscoveryConfig().classes.k_method,
                          "outlier_score": args.outlier_score or DiscoveryConfig().classes.outlier_score,
                          "outlier_k": args.outlier_k or DiscoveryConfig().classes.outlier_k}
    maps = [m for m in ("semi", "zero-shot") if m in args.maps.split(",")]
    rerun = {"neu-det" if part == "neu" else "mtd" for part in parts & {"mtd", "neu"}}

    def recomputed(row: dict) -> bool:  # a row this run writes again (the others are kept as the file holds them)
        return "neu-det" in rerun if row["protocol"] == "neu-det" else "mtd" in rerun and row["maps"] in maps

    rows = [r for r in result.get("rows") or [] if not recomputed(r)]
    samples = read_dataset(args.data, "mtd").samples
    normal_train = [s for s in samples if s.split == "train" and s.is_normal]
    all_test = protocol_samples(samples, "with-good-6")
    settings = {name: value for name, value in (("own_projection", args.own_projection),
                                                 ("image_turns", args.image_turns),
                                                 ("outlier_score", args.outlier_score),
                                                 ("outlier_k", args.outlier_k),
                                                 ("k_method", args.k_method)) if value is not None}
    for setting in maps if parts & {"mtd", "loco"} else ():
        found, detect_seconds = cached_maps(all_test, setting, normal_train, args.cache, "mtd")
        by_path = dict(zip([s.image_path for s in all_test], found))
        normals = [str(s.image_path) for s in normal_train] if setting == "semi" else []
        for protocol in PROTOCOLS:
            chosen = protocol_samples(samples, protocol)
            regions, paths, truth = regions_for(chosen, [by_path[s.image_path] for s in chosen])
            if setting == "semi" and protocol == "defects-5" and "loco" in parts:
                result["leave_one_class_out"] = leave_one_class_out(regions, paths, truth, normals, **settings)
                write_result(out, result)
            if "mtd" not in parts:
                continue
            for model in MODELS:
                for k in ("given", "estimated"):
                    row, artifacts = discover(model, len(set(truth.values())) if k == "given" else "auto", regions,
                                              paths, truth, normals, **settings)
                    rows.append({"model": model, "maps": setting, "protocol": protocol, "k": k} | row)
                    if model == "learned" and k == "estimated":
                        result.setdefault(setting, {})[protocol] = {
                            key: row[key] for key in ("nmi", "ari", "f1", "k_estimated", "k_true", "train_s")}
                        if setting == "semi" and protocol == "with-good-6":
                            result["learning_curve"] = artifacts.history
                    print(rows[-1], flush=True)
                    result["rows"] = rows
                    write_result(out, result)
    if "neu" in parts:
        neu = read_dataset(args.neu, "neu", check=False).samples
        found, _ = cached_maps(neu, "zero-shot", [], args.cache, "neu")
        regions, paths, truth = regions_for(neu, found)
        k_true = len(set(truth.values()))
        rows.append({"model": "whole-image", "maps": "none", "protocol": "neu-det", "k": "given"}
                    | whole_image_baseline(paths, truth, k_true) | {"k_estimated": k_true})
        for model in MODELS:
            for k in ("given", "estimated"):
                row, _ = discover(model, k_true if k == "given" else "auto", regions, paths, truth, [], **settings)
                rows.append({"model": model, "maps": "zero-shot", "protocol": "neu-det", "k": k} | row)
                print(rows[-1], flush=True)
                result["rows"] = rows
                write_result(out, result)
    result["rows"] = rows
    write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
