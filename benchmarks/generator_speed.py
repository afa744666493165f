"""Speed of the synthetic defect generator on one core: 1,000 images of 256 px written as PNG.

Usage: OMP_NUM_THREADS=1 python benchmarks/generator_speed.py [--images 1000] [--image-size 256] [--keep DIR]
Runs single-threaded (one worker, OpenCV on one thread) and times ``generate_dataset`` (render + PNG
writing) and, for the same images, rendering alone. Wall time depends on what else the machine runs; CPU
seconds do not, so both are recorded and checked against the target (under 30 s for 1,000 images of
256 px), with the load average before the run. Prints a table and writes
benchmarks/results/generator_speed.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from anomaly_discovery.data.synthetic import generate_dataset, render_image
from anomaly_discovery.data.synthetic.generate import plan_jobs
from machine_info import cpu_model
from results_file import add_output_arguments, write_results

RESULT_KEYS = ("benchmark", "images", "image_size", "workers", "seconds", "images_per_s", "cpu_seconds",
               "render_only_seconds", "render_only_cpu_seconds", "writing_cpu_seconds", "megabytes_written",
               "target_seconds", "meets_target_wall", "meets_target_cpu", "machine")
TARGET_SECONDS = 30.0


def use_one_thread() -> None:
    """OpenCV to one thread; the generator itself is single-threaded with ``workers=1``."""
    cv2.setNumThreads(1)


def time_rendering_only(n_images: int, seed: int, image_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds to render the same images without writing them."""
    jobs, _ = plan_jobs(n_images, seed, image_size, ("metal_plate", "bottle"), 0.45)
    wall, cpu = time.perf_counter(), time.process_time()
    for job in jobs:
        render_image(job.product, job.label, job.image_size, job.seed_key)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write the dataset here and keep it")
    add_output_arguments(parser)
    args = parser.parse_args()

    use_one_thread()
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = args.keep or Path(scratch) / "generated"
        cpu_start = time.process_time()
        dataset = generate_dataset(out_dir, args.images, seed=args.seed, image_size=args.image_size,
                                   workers=1, progress=False)
        cpu_seconds = time.process_time() - cpu_start
        disk_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    render_seconds, render_cpu_seconds = time_rendering_only(args.images, args.seed, args.image_size)

    result = {
        "benchmark": "generator_speed",
        "images": dataset.n_images,
        "image_size": args.image_size,
        "workers": 1,
        "seconds": round(dataset.seconds, 3),
        "images_per_s": round(dataset.n_images / dataset.seconds, 1),
        "cpu_seconds": round(cpu_seconds, 3),
        "render_only_seconds": round(render_seconds, 3),
        "render_only_cpu_seconds": round(render_cpu_seconds, 3),
        "writing_cpu_seconds": round(cpu_seconds - render_cpu_seconds, 3),
        "megabytes_written": round(disk_bytes / 1e6, 1),
        "target_seconds": TARGET_SECONDS,
        "meets_target_wall": dataset.seconds < TARGET_SECONDS,
        "meets_target_cpu": cpu_seconds < TARGET_SECONDS,
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_before": load_before,
            "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
        },
    }
    rows = [("images", result["images"]), ("seconds (render + write)", result["seconds"]),
            ("images/s", result["images_per_s"]), ("cpu seconds", result["cpu_seconds"]),
            ("render only (s / cpu s)", f"{render_seconds:.2f} / {render_cpu_seconds:.2f}"),
            ("PNG writing (cpu s)", result["writing_cpu_seconds"]),
            ("MB written", result["megabytes_written"]),
            (f"under {TARGET_SECONDS:.0f} s (wall / cpu)",
             f"{result['meets_target_wall']} / {result['meets_target_cpu']}"),
            ("load average before", load_before)]
    print(f"generator speed, {args.image_size} px, 1 worker, 1 thread")
    for name, value in rows:
        print(f"  {name:<26}{value}")
    written = write_results("generator_speed", result, RESULT_KEYS, args.tag, args.out)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
