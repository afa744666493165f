"""Active-loop benchmark (issue 6 item 6, issue 16 item 11): image-level F1 on MTD ``defects-5`` after 0, 5, 10,
25, 50 actions of a simulated reviewer, counted two ways: with moves (each touching at most one gallery page of
20 crops) and without moves (confirm / merge / rename / split / reject only). Target: F1 ≥ .90 within 25 actions in
the stricter count, without moves.

Chain: ``benchmarks/mtd_discovery.py`` (cached PatchCore maps, MEBin regions, AMGA discovery with NEU-DET base
classes, library defaults), then the store + index half of ``publish_discovery``: ``ingest_discovery`` of the run
with the discovery model's own assignments (each novel cluster a proposal, its outliers unknown) into a temporary
SQLite store and FAISS index, once per count. The reviewer acts ONLY through DiscoveryLoop's public (the
dashboard's) actions.

Oracle: it reads the true labels (the model and the loop never do: nothing is tuned on them); a class "holds" L
when it is a confirmed class named L. One action per step: (1) a confirmed class named by no label (a split part)
is renamed to its majority label when no class holds it, else merged into the class that does; else (2) the
candidate touching the most regions, ties in this order: review — the queue's head proposal (the dashboard's
order: size, then id) with majority label L (ties: name) is confirmed as L when no class holds L, else merged into
the class that does; move (with moves only) — on one page of a confirmed class's gallery (its members by region
id, 20 per page: the first page that has any), the members whose label another class holds go there together;
split — a confirmed class whose members of another label are a large minority (≥ 3 regions and ≥ 20%) is split
in two by the loop's k-means, at most twice per class (with moves: only for a label no class holds, once per
class, since moves sort the others), and the rules above sort the parts. With nothing left it stops. No rejects: MTD ``defects-5`` has no normal images, so every
proposal is a defect kind.

Score after each action: every region's current class (the unassigned form one ``unknown`` cluster) one-hot,
merged per image by the model's area-weighted ``merge_images``, against the MTD class by ``clustering_report``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/active_loop.py --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/active_loop.py --smoke --out /tmp/smoke.json   # generated data
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from anomaly_discovery.data import read_dataset
from anomaly_discovery.data.synthetic import generate_dataset
from anomaly_discovery.models.discovery.training import DiscoveryConfig, train_discovery
from anomaly_discovery.models.discovery.predict import merge_images
from anomaly_discovery.models.metrics import clustering_report
from anomaly_discovery.platform.jobs.discover import neu_base_regions, synthetic_base_regions
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import DiscoveredImage, DiscoveredRegion
from anomaly_discovery.platform.jobs.publish import file_hash
from anomaly_discovery.platform.storage.store import Store
from anomaly_discovery.platform.storage.models import ClassStatus

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mtd_discovery as chain  # noqa: E402  (benchmarks/ is not a package)
from machine_info import cpu_model  # noqa: E402
from results_file import add_output_arguments, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = (0, 5, 10, 25, 50)
PAGE = 20
MAX_SPLITS = 2  # per class, without moves
TARGET_F1, TARGET_ACTIONS = 0.90, 25
RESULT_KEYS = ("benchmark", "protocol", "target", "f1_after", "nmi_after", "ari_after", "f1_after_without_moves",
               "nmi_after_without_moves", "ari_after_without_moves", "meets_target", "meets_target_with_moves",
               "runs", "setup", "machine")


@dataclass(frozen=True)
class Action:
    """``kind``: confirm / merge (``target`` a proposal id), merge_class / move / split / rename (``target`` a
    class id); ``into``: the class merged or moved into; ``label``: the true label the oracle answered with."""

    kind: str
    target: int
    into: int | None
    label: str
    region_ids: tuple[int, ...] = ()


def majority(labels: list[str]) -> str:
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))


def first_page(members: list[tuple[int, str]], wanted: str, page: int = PAGE) -> tuple[int, ...]:
    """The members labelled ``wanted`` on the first gallery page (members by region id, ``page`` per page) that
    shows any."""
    ordered = sorted(members)
    for start in range(0, len(ordered), page):
        found = tuple(r for r, label in ordered[start:start + page] if label == wanted)
        if found:
            return found
    return ()


def next_action(members: dict[int, list[tuple[int, str]]], confirmed: dict[int, str], queue: list[tuple[int, int]],
                labels: set[str], splits: Counter, moves: bool = True) -> Action | None:
    """The oracle's next action (module docstring). ``members``: live class id → (region id, true label) pairs;
    ``confirmed``: confirmed class id → name; ``queue``: open (proposal id, class id), head first; ``labels``:
    every true label; ``splits``: how often each class was split; ``moves``: whether moves are allowed.
    ``None``: nothing left to do."""
    holder = {name: class_id for class_id, name in confirmed.items() if name in labels}
    for class_id, name in sorted(confirmed.items()):
        top = majority([label for _, label in members[class_id]])
        if name not in labels:
            return Action("merge_class", class_id, holder[top], top) if top in holder else \
                Action("rename", class_id, None, top)
    candidates = []
    if queue:
        proposal_id, class_id = queue[0]
        label = majority([label for _, label in members[class_id]])
        candidates.append((len(members[class_id]), 2, Action("merge" if label in holder else "confirm", proposal_id,
                                                              holder.get(label), label)))
    for class_id, name in sorted(confirmed.items()):
        for label in sorted({label for _, label in members[class_id]} - {name}):
            everyone = tuple(r for r, other in members[class_id] if other == label)
            if label in holder and moves:
                batch = first_page(members[class_id], label)
                candidates.append((len(batch), 1, Action("move", class_id, holder[label], label, batch)))
            elif splits[class_id] < (1 if moves else MAX_SPLITS) and \
                    len(everyone) >= max(3, 0.2 * len(members[class_id])):
                candidates.append((len(everyone), 0, Action("split", class_id, None, label, everyone)))
    return max(candidates, key=lambda c: c[:2])[2] if candidates else None


def discovery_inputs(args, folder: Path) -> tuple[list, dict, list, dict]:
    """Novel regions, their images' labels (scorer and oracle only), base regions and image paths by id;
    ``--smoke`` generates its data (and keeps its maps) in ``folder``."""
    if args.smoke:
        root = folder / "generated"
        generate_dataset(root, 120, seed=0, image_size=96, progress=False)
        data, fmt = root / "metal_plate", "mvtec"
        base = synthetic_base_regions(root, data, per_class=3, seed=0, progress=False)
        cache = root / "maps"
    else:
        data, fmt, cache = args.data, "mtd", args.cache
        base = neu_base_regions(args.neu, args.base_per_class, seed=0, progress=False)
    samples = read_dataset(data, fmt).samples
    normal_train = [s for s in samples if s.split == "train" and s.is_normal]
    every_test = chain.protocol_samples(samples, "with-good-6")
    found, _ = chain.cached_detections(every_test, "semi", normal_train, cache)
    detections = dict(zip([s.image_path for s in every_test], found))
    chosen = chain.protocol_samples(samples, "defects-5")
    regions, truth = chain.regions_for(chosen, [detections[s.image_path] for s in chosen], "fallback")
    return regions, truth, base, {f"image{i}": str(s.image_path) for i, s in enumerate(chosen)}


def publish(loop: DiscoveryLoop, regions: list, artifacts, paths: dict) -> list[int]:
    """The run's images (the model's image classes) and regions (learned embeddings, the model's clusters and
    outlier flags) into the store and index, as ``publish_discovery`` loads them. Returns the store's region ids."""
    keys = sorted({r.image_id for r in regions})
    images = [DiscoveredImage(key, paths[key], file_hash(paths[key]), cluster=int(artifacts.images[key].label))
              for key in keys]
    predictions, flags = artifacts.regions, artifacts.regions.is_outlier
    found = [DiscoveredRegion(r.image_id, tuple(int(v) for v in r.box), float(r.score), predictions.embeddings[i],
                              confidence=float(predictions.confidence[i]), cluster=int(predictions.clusters[i]),
                              is_outlier=bool(flags[i]) if flags is not None else False)
             for i, r in enumerate(regions)]
    return loop.ingest_discovery(images, found, model_version="active-loop-benchmark",
                                 metrics={k: v for k, v in artifacts.metrics.items() if isinstance(v, (int, float))})


def image_scores(loop: DiscoveryLoop, regions: list, region_ids: list[int], truth: dict) -> dict:
    """Each region's current class merged per image (area-weighted), scored against the true labels."""
    current = loop.mirror.class_id[np.asarray(region_ids)]
    codes = {c: i for i, c in enumerate(sorted(set(current.tolist())))}
    one_hot = np.eye(len(codes))[[codes[c] for c in current.tolist()]]
    images = merge_images(regions, one_hot)
    ids = sorted(images)
    report = clustering_report(np.array([truth[i] for i in ids]), np.array([images[i].label for i in ids]))
    return {k: round(float(report[k]), 4) for k in ("f1", "nmi", "ari", "f1_macro")} | {
        "clusters": int(report["n_clusters_pred"])}


def review_state(loop: DiscoveryLoop, region_ids: list[int], labels: list[str]):
    """What the inspector sees: live classes' members (with the labels the oracle knows), names, the queue."""
    current = loop.mirror.class_id[np.asarray(region_ids)]
    members: dict[int, list[tuple[int, str]]] = {}
    for region_id, class_id, label in zip(region_ids, current.tolist(), labels):
        if class_id >= 0:
            members.setdefault(class_id, []).append((region_id, label))
    confirmed = {c.id: c.name for c in loop.classes.values() if c.status == ClassStatus.CONFIRMED and c.id in members}
    queue = [(p.id, p.class_id) for p in sorted(loop.list_proposals(), key=lambda p: (-p.size, p.id))
             if p.class_id in members]
    return members, confirmed, queue


def act(loop: DiscoveryLoop, action: Action):
    """The dashboard's call for ``action``."""
    return {"confirm": lambda: loop.confirm(action.target, action.label, reviewer="oracle"),
            "merge": lambda: loop.merge_proposal(action.target, action.into, reviewer="oracle"),
            "merge_class": lambda: loop.merge(action.target, action.into, reviewer="oracle"),
            "rename": lambda: loop.rename(action.target, action.label, reviewer="oracle"),
            "split": lambda: loop.split(action.target, 2, reviewer="oracle"),
            "move": lambda: loop.move(list(action.region_ids), action.into, reviewer="oracle")}[action.kind]()


def run_loop(loop: DiscoveryLoop, regions: list, region_ids: list[int], truth: dict, max_actions: int,
             moves: bool):
    labels = [truth[r.image_id] for r in regions]
    curve, taken, splits = [{"actions": 0, **image_scores(loop, regions, region_ids, truth)}], [], Counter()
    while len(taken) < max_actions:
        action = next_action(*review_state(loop, region_ids, labels), set(labels), splits, moves)
        if action is None:
            break
        splits[action.target] += action.kind == "split"
        result = act(loop, action)
        loop.flush()
        taken.append({"step": len(taken) + 1, "action": action.kind, "target": action.target, "into": action.into,
                      "true_label": action.label, "regions": result.n_regions, "seconds": round(result.seconds, 4)})
        curve.append({"actions": len(taken), **image_scores(loop, regions, region_ids, truth)})
        print(taken[-1], curve[-1], flush=True)
    return curve, taken


def confusion(loop: DiscoveryLoop, regions: list, region_ids: list[int], truth: dict) -> dict:
    """Regions per true label → final class name (``unknown``: unassigned)."""
    names = {c.id: c.name for c in loop.classes.values()}
    pairs = zip([truth[r.image_id] for r in regions], loop.mirror.class_id[np.asarray(region_ids)].tolist())
    return dict(sorted(Counter(f"{label} -> {names.get(c, 'unknown')}" for label, c in pairs).items()))


def review(regions: list, truth: dict, artifacts, paths: dict, folder: Path, moves: bool) -> dict:
    """Publish the run into a fresh store and index, let the oracle act, and summarise its curve."""
    loop = DiscoveryLoop(Store(f"sqlite:///{folder}/store.db"), folder / "index.npz",
                         dim=artifacts.regions.embeddings.shape[1])
    try:
        region_ids = publish(loop, regions, artifacts, paths)
        n_proposals = len(loop.list_proposals())
        curve, taken = run_loop(loop, regions, region_ids, truth, max(CHECKPOINTS), moves)
        final = confusion(loop, regions, region_ids, truth)
    finally:
        loop.close()
        loop.store.dispose()
    seconds = [a["seconds"] for a in taken]
    return {"proposals_at_start": n_proposals, "actions_taken": len(taken),
            "stopped_early": len(taken) < max(CHECKPOINTS), "curve": curve, "actions": taken,
            "regions_moved": sum(a["regions"] for a in taken if a["action"] == "move"),
            "largest_move": max((a["regions"] for a in taken if a["action"] == "move"), default=0),
            "seconds_per_action": {"median": statistics.median(seconds) if seconds else None,
                                   "max": max(seconds, default=None)},
            "final_confusion_regions": final}


def at_checkpoints(run: dict, key: str) -> dict:
    curve = run["curve"]
    return {str(n): curve[min(n, len(curve) - 1)][key] for n in CHECKPOINTS}


def meets(run: dict) -> bool:
    return any(row["f1"] >= TARGET_F1 for row in run["curve"][:TARGET_ACTIONS + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mtd")
    parser.add_argument("--neu", type=Path, default=ROOT.parent / "shared" / "datasets" / "neu-det")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/adisc-mtd-discovery-cache"),
                        help="anomaly maps kept by mtd_discovery.py (semi.npz)")
    parser.add_argument("--base-per-class", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="120 generated images (96 px), 3 epochs")
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="adisc-active-loop-") as folder:
        regions, truth, base, paths = discovery_inputs(args, Path(folder))
        config = DiscoveryConfig.of(k="auto", progress=False, **({"epochs": 3} if args.smoke else {}))
        started = time.perf_counter()
        artifacts = train_discovery(config, regions, base)
        train_seconds = time.perf_counter() - started
        runs = {}
        for name, moves in (("with_moves", True), ("without_moves", False)):
            (Path(folder) / name).mkdir()
            runs[name] = review(regions, truth, artifacts, paths, Path(folder) / name, moves)
    moved, strict = runs["with_moves"], runs["without_moves"]
    result = {
        "benchmark": "active_loop", "protocol": "smoke (generated)" if args.smoke else "MTD defects-5, semi",
        "target": f"F1 >= {TARGET_F1:.2f} within {TARGET_ACTIONS} reviewer actions without moves (confirm / merge / "
                  f"rename / split / reject); a move touches at most one page of {PAGE} crops",
        **{f"{key}_after": at_checkpoints(moved, key) for key in ("f1", "nmi", "ari")},
        **{f"{key}_after_without_moves": at_checkpoints(strict, key) for key in ("f1", "nmi", "ari")},
        "meets_target": meets(strict), "meets_target_with_moves": meets(moved), "runs": runs,
        "setup": {"images_scored": len({r.image_id for r in regions}), "images_in_protocol": len(paths),
                  "regions": len(regions), "k_estimated": artifacts.k_estimated,
                  "model_outliers": int(np.sum(artifacts.regions.is_outlier))
                  if artifacts.regions.is_outlier is not None else None,
                  "train_seconds": round(train_seconds, 1), "discovery": "DiscoveryConfig defaults, k=auto"
                  + (", epochs=3" if args.smoke else ""), "base": "generated bottle crops" if args.smoke
                  else f"NEU-DET, {args.base_per_class} images per class", "store": "sqlite (temp file)",
                  "page": PAGE, "detector": "PatchCore (library defaults), maps cached by mtd_discovery.py"},
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "torch_threads": args.threads, "load_average": list(os.getloadavg()), "gpu": "none"},
    }
    written = write_results("active_loop", result, RESULT_KEYS, args.tag, args.out, indent=1)
    print("F1 after (with moves)", result["f1_after"], "(without moves)", result["f1_after_without_moves"],
          f"; wrote {written}")


if __name__ == "__main__":
    main()
