"""Speed of the pixel metrics: AUPRO (exact and 200 thresholds) and pixel AUROC on random blob masks.

Usage: python benchmarks/metrics_speed.py [--n-images 600] [--height 300] [--width 400] [--repeats 3]
Prints a table and writes benchmarks/results/metrics_speed.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import cv2
import numpy as np

from anomaly_discovery.models.metrics import aupro, pixel_auroc
from machine_info import cpu_model
from results_file import add_output_arguments, write_results

RESULT_KEYS = ("benchmark", "machine", "n_images", "height", "width", "n_pixels", "defect_regions_per_image", "repeats",
               "results")


def blob_masks_and_maps(n_images: int, height: int, width: int, seed: int) -> tuple[list, list]:
    """One image in three is defect-free; the rest get 1-3 random ellipses. Maps: blurred noise + signal."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for index in range(n_images):
        mask = np.zeros((height, width), dtype=np.uint8)
        for _ in range(0 if index % 3 == 0 else int(rng.integers(1, 4))):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(4, width // 8)), int(rng.integers(4, height // 8)))
            cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        noise = cv2.GaussianBlur(rng.random((height, width), dtype=np.float32), (0, 0), 3)
        signal = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 5)
        masks.append(mask.astype(bool))
        maps.append(noise + 0.05 * signal)
    return masks, maps


def timed(function, repeats: int) -> tuple[float, float, float]:
    """(value, first-call seconds, fastest seconds) over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return value, times[0], min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=600)
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parser.parse_args()

    masks, maps = blob_masks_and_maps(args.n_images, args.height, args.width, args.seed)
    cases = {
        "aupro (exact)": lambda: aupro(masks, maps),
        "aupro (n_thresholds=200)": lambda: aupro(masks, maps, n_thresholds=200),
        "pixel_auroc": lambda: pixel_auroc(masks, maps),
    }
    rows = []
    print(f"{args.n_images} maps of {args.height}x{args.width}, {args.repeats} calls each")
    print(f"{'metric':<26} {'value':>8} {'first s':>8} {'best s':>8}")
    for name, function in cases.items():
        value, first, best = timed(function, args.repeats)
        rows.append({"metric": name, "value": round(value, 6), "first_s": round(first, 3), "best_s": round(best, 3)})
        print(f"{name:<26} {value:>8.4f} {first:>8.3f} {best:>8.3f}")

    result = {
        "benchmark": "metrics_speed",
        "machine": {
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "numpy": np.__version__,
        },
        "n_images": args.n_images,
        "height": args.height,
        "width": args.width,
        "n_pixels": args.n_images * args.height * args.width,
        "defect_regions_per_image": "0 (one image in three) or 1-3 ellipses",
        "repeats": args.repeats,
        "results": rows,
    }
    written = write_results("metrics_speed", result, RESULT_KEYS, args.tag, args.out)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
