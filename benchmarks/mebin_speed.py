"""Speed of MEBin (methods.md §1 step 1) and of the crops (step 2) on one CPU thread, on random blob maps.

Usage: python benchmarks/mebin_speed.py [--n-maps 200] [--size 256] [--repeats 3]
Prints a table and writes benchmarks/results/mebin_speed.json. The target is ≥ 50 maps/s for MEBin.
For scale it also times the literal algorithm (binary erosion and a component count at every threshold).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import cv2
import numpy as np

from anomaly_discovery.models.localisation.crops import anomaly_crops
from anomaly_discovery.models.localisation.mebin import MEBinConfig, mebin, normalise_jointly, select_stable_run
from machine_info import cpu_model
from results_file import add_output_arguments, write_results

RESULT_KEYS = ("benchmark", "machine", "n_maps", "map_size", "config", "repeats", "target_maps_per_s", "results",
               "mean_regions", "maps_without_regions", "n_crops", "literal_loop_agrees")


def blob_maps(n_maps: int, size: int, seed: int) -> list[np.ndarray]:
    """One map in four is defect-free; the rest get 1-5 Gaussian blobs of random width and height."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    maps = []
    for index in range(n_maps):
        anomaly_map = cv2.GaussianBlur(rng.random((size, size), dtype=np.float32), (0, 0), 2) * 0.3
        for _ in range(0 if index % 4 == 0 else int(rng.integers(1, 6))):
            cx, cy = rng.uniform(0, size, 2)
            sigma = rng.uniform(size / 64, size / 16)
            anomaly_map += rng.uniform(0.3, 1.0) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        maps.append(anomaly_map)
    return maps


def literal_mebin_counts(maps: list[np.ndarray], config: MEBinConfig) -> list[int]:
    """The per-threshold loop as the reference writes it (float Ã, binary erosion at every threshold)."""
    kernel = np.ones((config.erosion_size, config.erosion_size), np.uint8)
    peaks = [int(m.max()) for m in maps]
    s_min, s_max = min(peaks), max(peaks)
    estimates = []
    for anomaly_map in maps:
        normalised = np.where(anomaly_map < s_min, 0, (anomaly_map - float(s_min)) / max(s_max - s_min, 1) * 255)
        counts = []
        for threshold in config.thresholds:
            binary = cv2.erode((normalised > threshold).astype(np.uint8), kernel)
            counts.append(cv2.connectedComponents(binary, connectivity=8)[0] - 1)
        run = select_stable_run(counts, config.min_interval_len)
        estimates.append(0 if run is None else run[1])
    return estimates


def best_of(function, repeats: int) -> tuple[object, float]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return value, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-maps", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parser.parse_args()
    cv2.setNumThreads(1)

    config = MEBinConfig()
    raw_maps = blob_maps(args.n_maps, args.size, args.seed)
    images = [np.zeros((args.size, args.size, 3), np.uint8)] * args.n_maps
    maps, normalise_s = best_of(lambda: normalise_jointly(raw_maps), args.repeats)
    results, mebin_s = best_of(lambda: mebin(maps, config), args.repeats)
    crops, crops_s = best_of(lambda: [anomaly_crops(image, r) for image, r in zip(images, results)], args.repeats)
    literal, literal_s = best_of(lambda: literal_mebin_counts(maps, config), 1)
    agree = literal == [r.n_regions for r in results]

    rows = [
        ("normalise_jointly (step 0)", normalise_s),
        ("mebin (step 1)", mebin_s),
        ("anomaly_crops (step 2)", crops_s),
        ("steps 0-2", normalise_s + mebin_s + crops_s),
        ("literal per-threshold MEBin", literal_s),
    ]
    print(f"{args.n_maps} maps of {args.size}x{args.size}, one thread, best of {args.repeats}")
    print(f"{'stage':<30} {'seconds':>8} {'maps/s':>9}")
    for name, seconds in rows:
        print(f"{name:<30} {seconds:>8.3f} {args.n_maps / seconds:>9.1f}")
    n_regions = [r.n_regions for r in results]
    print(f"regions found: mean {np.mean(n_regions):.2f}, images with none {n_regions.count(0)}; "
          f"crops: {sum(len(c) for c in crops)}; literal loop gives the same δ̄: {agree}")

    result = {
        "benchmark": "mebin_speed",
        "machine": {
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "opencv_threads": cv2.getNumThreads(),
            "opencv": cv2.__version__,
            "numpy": np.__version__,
        },
        "n_maps": args.n_maps,
        "map_size": [args.size, args.size],
        "config": vars(config),
        "repeats": args.repeats,
        "target_maps_per_s": 50,
        "results": [
            {"stage": name, "seconds": round(seconds, 4), "maps_per_s": round(args.n_maps / seconds, 1)}
            for name, seconds in rows
        ],
        "mean_regions": round(float(np.mean(n_regions)), 3),
        "maps_without_regions": n_regions.count(0),
        "n_crops": sum(len(c) for c in crops),
        "literal_loop_agrees": agree,
    }
    written = write_results("mebin_speed", result, RESULT_KEYS, args.tag, args.out)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
