"""Export and report time at ``--regions`` regions (issue 15; no target was set: this records what it costs).

Builds a store + index like a discovery run: ``--regions`` images of 64 px on disk, one region each with a
whole-image mask file beside it, ``--dim``-d embeddings around 8 known kinds (80% of the regions, assigned by the
model) and 4 novel kinds the loop groups into proposals. Then times, each once, in one process: the store
snapshot with the k-NN outlier scores (``read_snapshot``), the CSV, the COCO JSON, the folder export (links), and
the HTML report; and records the files' sizes and the process's peak memory.

Usage: OMP_NUM_THREADS=1 python benchmarks/export_speed.py [--regions 20000] [--dim 256] [--tag NAME]
Writes benchmarks/results/export_speed.json (``--tag NAME``: export_speed.NAME.json).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from anomaly_discovery.data import save_image
from anomaly_discovery.platform.export.job import write_export
from anomaly_discovery.platform.export.report import render_report
from anomaly_discovery.platform.export.snapshot import read_snapshot
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import DiscoveredImage, DiscoveredRegion, LoopConfig
from anomaly_discovery.platform.storage.store import Store
from machine_info import cpu_model
from results_file import add_output_arguments, write_results
from review_actions import clustered_embeddings

RESULT_KEYS = ("machine", "load_average", "settings", "build_s", "seconds", "output_mb", "peak_rss_mb")
SIZE = 64
KNOWN, NOVEL = 8, 4


def build(folder: Path, n: int, dim: int, seed: int) -> tuple[Store, DiscoveryLoop]:
    """The store, index, images and masks of the module docstring."""
    rng = np.random.default_rng(seed)
    n_known = int(0.8 * n)
    known_vectors, known_kinds = clustered_embeddings(n_known, KNOWN, dim, rng)
    novel_vectors, _ = clustered_embeddings(n - n_known, NOVEL, dim, rng)
    vectors = np.concatenate([known_vectors, novel_vectors])
    names = [f"known-{k}" for k in range(KNOWN)]
    images, regions = [], []
    for i in tqdm(range(n), desc="images", unit="image"):
        key, image = f"img{i}", np.full((SIZE, SIZE, 3), 120, np.uint8)
        x, y = (int(v) for v in rng.integers(8, SIZE - 24, 2))
        image[y:y + 16, x:x + 16] = (200, 60, 40)
        mask = np.zeros((SIZE, SIZE), bool)
        mask[y:y + 16, x:x + 16] = True
        save_image(folder / "images" / f"{key}.png", image)
        save_image(folder / "masks" / key / "mebin_mask.png", mask)
        known = names[known_kinds[i]] if i < n_known else None
        images.append(DiscoveredImage(key, str(folder / "images" / f"{key}.png"), f"h{i}"))
        regions.append(DiscoveredRegion(key, (x, y, x + 16, y + 16), 0.8, vectors[i], known, 0.9 if known else None,
                                        str(folder / "masks" / key / "mebin_mask.png")))
    store = Store(f"sqlite:///{folder / 'adisc.db'}")
    loop = DiscoveryLoop(store, folder / "index" / "regions.faiss", dim, LoopConfig(background_save=False))
    loop.ingest_discovery(images, regions, names, model_version="bench")
    return store, loop


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adisc-export-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        store, loop = build(folder, args.regions, args.dim, args.seed)
        build_s = time.perf_counter() - started
        seconds, output_mb = {}, {}

        started = time.perf_counter()
        snapshot = read_snapshot(store, loop.embeddings)
        seconds["snapshot (store read + outlier scores)"] = time.perf_counter() - started
        for kind in ("csv", "coco", "folder"):
            out = folder / f"export-{kind}"
            out.mkdir()
            started = time.perf_counter()
            write_export(snapshot, out, kind)
            seconds[kind] = time.perf_counter() - started
            output_mb[kind] = folder_mb(out)
        started = time.perf_counter()
        html = render_report(snapshot)
        seconds["report"] = time.perf_counter() - started
        output_mb["report"] = len(html.encode()) / 1e6
        loop.close()
        store.dispose()
    result = {"machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "load_average": [round(v, 2) for v in os.getloadavg()],
              "settings": {"regions": args.regions, "images": args.regions, "dim": args.dim, "image_px": SIZE,
                           "known_kinds": KNOWN, "novel_kinds": NOVEL, "store": "SQLite file"},
              "build_s": round(build_s, 2), "seconds": {k: round(v, 3) for k, v in seconds.items()},
              "output_mb": {k: round(v, 2) for k, v in output_mb.items()},
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    path = write_results("export_speed", result, RESULT_KEYS, args.tag, args.out)
    for name, value in result["seconds"].items():
        print(f"{name:<42}{value:>10.2f} s")
    print(f"written {path}")


if __name__ == "__main__":
    main()
