"""Review-action latency at 100k regions (issue 6 item 6; target: every action < 1 s, no retraining).

Builds a store + index with ``--regions`` regions of ``--dim``-d embeddings: ``--known`` known classes holding
80% of the regions and ``--novel`` novel kinds (the rest) that the loop groups into proposals; then times each
reviewer action ``--repeats`` times (confirm, reject, rename, merge, split, move, undo), each one a full
``DiscoveryLoop`` call: store transaction with the audit row, incremental index update, prototype update,
re-labelling (the atomic index save runs in the loop's background saver and is timed separately).

Usage: python benchmarks/review_actions.py [--regions 100000] [--dim 256] [--store URL] [--repeats 3]
Writes benchmarks/results/review_actions.json (the FAISS add/query scale lives in index_scale.json).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import DiscoveredImage, DiscoveredRegion
from anomaly_discovery.platform.storage.store import Store
from machine_info import cpu_model
from results_file import add_output_arguments, write_results

RESULT_KEYS = ("benchmark", "machine", "store", "dim", "setup", "index_save_s", "peak_rss_mb", "target", "actions",
               "notes")


def clustered_embeddings(n: int, n_kinds: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around ``n_kinds`` random directions (noise about as large as the signal per kind)."""
    centres = rng.standard_normal((n_kinds, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    kinds = np.arange(n) % n_kinds
    vectors = centres[kinds] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), kinds


def build(loop: DiscoveryLoop, n: int, n_known: int, n_novel: int, dim: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    n_known_regions = int(0.8 * n)
    known_vectors, known_kinds = clustered_embeddings(n_known_regions, n_known, dim, rng)
    novel_vectors, _ = clustered_embeddings(n - n_known_regions, n_novel, dim, rng)
    names = [f"known-{k}" for k in range(n_known)]
    images, regions = [], []
    for i, (vector, kind) in enumerate(zip(np.concatenate([known_vectors, novel_vectors]),
                                           np.concatenate([known_kinds, np.full(len(novel_vectors), -1)]))):
        key = f"img{i}"
        images.append(DiscoveredImage(key, f"/bench/{key}.png", f"h{i}"))
        regions.append(DiscoveredRegion(key, (0, 0, 8, 8), 0.9, vector, names[kind] if kind >= 0 else None, 0.9))
    started = time.perf_counter()
    loop.ingest_discovery(images, regions, names, model_version="bench")
    return time.perf_counter() - started


def timed_actions(loop: DiscoveryLoop, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each action (each followed by its undo, itself timed as 'undo')."""
    times: dict[str, list[float]] = {name: [] for name in
                                     ("confirm", "reject", "rename", "merge", "split", "move", "undo")}

    def run(name: str, action) -> None:
        for timed, call in ((name, action), ("undo", loop.undo)):
            started = time.perf_counter()
            call()
            times[timed].append(time.perf_counter() - started)
            loop.flush()

    known = [c.id for c in loop.classes.values() if c.name.startswith("known-")]
    for repeat in range(repeats):
        open_proposals = loop.list_proposals()
        first, second = open_proposals[repeat % len(open_proposals)], open_proposals[-1 - repeat % len(open_proposals)]
        run("confirm", lambda: loop.confirm(first.id, f"confirmed-{repeat}", expected_version=first.version))
        run("reject", lambda: loop.reject(second.id))
        a, b = known[2 * repeat % len(known)], known[(2 * repeat + 1) % len(known)]
        run("rename", lambda: loop.rename(a, f"renamed-{repeat}"))
        run("merge", lambda: loop.merge(a, b))
        run("split", lambda: loop.split(a, 2))
        run("move", lambda: loop.move(loop.mirror.members(a)[:10], b))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--known", type=int, default=20)
    parser.add_argument("--novel", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", default=None, help="SQLAlchemy URL (default: a SQLite file in a temp folder)")
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        url = args.store or f"sqlite:///{folder}/bench.db"
        loop = DiscoveryLoop(Store(url), Path(folder) / "index.npz", args.dim)
        build_s = build(loop, args.regions, args.known, args.novel, args.dim, seed=0)
        loop.flush()
        gc.freeze()
        setup = {"regions": loop.mirror.count(), "reference_regions": loop.index.count("region"),
                 "region_index": loop.index.describe("region"), "classes": len(loop.classes),
                 "open_proposals": len(loop.list_proposals()), "ingest_s": round(build_s, 2)}
        times = timed_actions(loop, args.repeats)
        saves = []
        for _ in range(3):
            started = time.perf_counter()
            loop.save_index()
            saves.append(time.perf_counter() - started)
        loop.close()
        loop.store.dispose()
    rows = {name: {"median_s": round(statistics.median(values), 4), "max_s": round(max(values), 4), "n": len(values),
                   "under_1s": max(values) < 1.0} for name, values in times.items()}
    result = {
        "benchmark": "review_actions",
        "machine": {"processor": cpu_model(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "faiss_threads": args.threads,
                    "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "store": "sqlite (temp file)" if args.store is None else url.split(":")[0],
        "dim": args.dim, "setup": setup, "index_save_s": round(statistics.median(saves), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "target": "each action < 1 s at 100k regions", "actions": rows,
        "notes": "each time is a whole DiscoveryLoop call: store transaction + decision, incremental index and "
                 "prototype update, re-labelling of unknown regions. The index checkpoint (index_save_s) is "
                 "written by the loop's background saver and flushed between actions, outside the timings (a "
                 "reviewer's think time); back-to-back actions can wait for it. gc.freeze() after the build, as "
                 "the service does after start-up. Every action is undone right after (undo timed separately).",
    }
    written = write_results("review_actions", result, RESULT_KEYS, args.tag, args.out)
    print(f"{setup['regions']} regions ({setup['reference_regions']} in the reference index, "
          f"{setup['region_index']['index_type']}), {setup['open_proposals']} open proposals; ingest {build_s:.1f}s")
    print(f"{'action':<10}{'median s':>10}{'max s':>10}{'< 1 s':>8}")
    for name, row in rows.items():
        print(f"{name:<10}{row['median_s']:>10.3f}{row['max_s']:>10.3f}{str(row['under_1s']):>8}")
    print(f"index save alone: {result['index_save_s']:.3f}s; written to {written}")


if __name__ == "__main__":
    main()
