"""Scaling of discovery training: the single-process loop, then Ray Train with 1 and 2 CPU workers.

Usage: OMP_NUM_THREADS=1 python benchmarks/train_scaling.py [--crops 384] [--image-size 96] [--epochs 4]

Trains the same discovery settings on the same generated crops (random shapes in random colours on gray,
no labels needed): the single-process loop (first and again last, to bracket the drift of the shared
machine's load), the same loop inside a 1-CPU Ray task (on this machine a Ray worker process runs the plain
loop markedly faster than the benchmark's own process; this row separates that from Ray Train's cost),
then Ray Train with 1 and 2 workers. Per way it records: the median epoch time after the first epoch, training
crops per second (the epoch plan's rows, each two views, over the epoch time; with 2 workers each trains
half the plan), the whole wall time, and the peak resident memory of each training process. Also Ray's
start-up overhead: ``ray.init`` of a local 2-CPU Ray and a no-op 1-worker TorchTrainer fit (controller,
worker process, process group). The machine's load average is recorded before and after: the CPU is shared
with other jobs, so every time here is an upper bound.

Target (issue 5): 2 workers >= 1.7x one worker's crops/s on separate devices. Two workers on two shared
cores cannot show that; the JSON says so, and says that no GPU was lent to this run.
Writes benchmarks/results/train_scaling.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from anomaly_discovery.models.discovery.training import DiscoveryConfig, train_discovery
from anomaly_discovery.models.localisation.regions import crop_region
from anomaly_discovery.platform.jobs.discover import DiscoverJobConfig
from anomaly_discovery.platform.ray.cluster import ClusterConfig, EpochEvent
from anomaly_discovery.platform.ray.train import TrainData, run_train
from machine_info import cpu_model
from results_file import add_output_arguments, write_results

RESULT_KEYS = ("benchmark", "machine", "load_average_before", "load_average_after", "settings", "ray_startup", "results",
               "speedup_2_vs_1_workers", "target_speedup_on_separate_devices", "target_met", "note")
TARGET_SPEEDUP = 1.7


def generated_crops(n: int, size: int, seed: int = 0) -> list:
    """``n`` novel regions: a filled disk, bar or dot cluster of a random colour on a noisy gray crop."""
    rng = np.random.default_rng(seed)
    regions = []
    for index in range(n):
        image = np.clip(rng.uniform(90, 160) + rng.normal(0, 6, (size, size, 1)), 0, 255).repeat(3, 2)
        mask = np.zeros((size, size), np.uint8)
        cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        shape = index % 3
        if shape == 0:
            cv2.circle(mask, (cx, cy), int(rng.integers(size // 12, size // 6)), 1, -1)
        elif shape == 1:
            cv2.rectangle(mask, (cx - size // 5, cy - size // 20), (cx + size // 5, cy + size // 20), 1, -1)
        else:
            for _ in range(10):
                offset = rng.integers(-size // 6, size // 6 + 1, 2)
                cv2.circle(mask, (cx + int(offset[0]), cy + int(offset[1])), max(1, size // 32), 1, -1)
        image[mask > 0] = rng.integers(0, 256, 3)
        anomaly = cv2.GaussianBlur(mask.astype(np.float32), (7, 7), 2)
        regions.append(crop_region(image.astype(np.uint8), (0, 0, size, size), anomaly / anomaly.max(), None,
                                   f"crop_{index}"))
    return regions


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RecordWorker:
    """Epoch callback: each worker appends (rank, epoch, epoch seconds, peak RSS MB) to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, event: EpochEvent) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps([event.rank, event.epoch, event.metrics.get("seconds"),
                                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0]) + "\n")


def epoch_time(seconds: list[float]) -> float:
    """Median epoch time after the first (warm-up) epoch."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def single_process(config: DiscoveryConfig, regions: list, when: str) -> dict:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    artifacts = train_discovery(config, regions)
    wall = time.perf_counter() - started
    epoch = epoch_time([h["seconds"] for h in artifacts.history])
    return {"mode": f"single process, {when} (no Ray)", "workers": 1, "epoch_s": epoch,
            "crops_per_s": len(regions) / epoch, "wall_s": wall, "peak_rss_mb_per_worker": [peak_rss_mb()],
            "load_average_1min_at_start": load}


def single_process_in_ray_task(config: DiscoveryConfig, regions: list) -> dict:
    """The same plain loop run inside a 1-CPU Ray task: separates Ray Train's cost from the process's."""
    import ray

    @ray.remote(num_cpus=1)
    def train(config, regions):
        started = time.perf_counter()
        artifacts = train_discovery(config, regions)
        return [h["seconds"] for h in artifacts.history], time.perf_counter() - started, peak_rss_mb()

    load = os.getloadavg()[0]
    seconds, wall, peak = ray.get(train.remote(config, ray.put(regions)))
    epoch = epoch_time(seconds)
    return {"mode": "single process in a Ray task", "workers": 1, "epoch_s": epoch,
            "crops_per_s": len(regions) / epoch, "wall_s": wall, "peak_rss_mb_per_worker": [peak],
            "load_average_1min_at_start": load}


def ray_startup() -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as storage:
        started = time.perf_counter()
        TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(name="noop", storage_path=storage)).fit()
        noop_s = time.perf_counter() - started
    return {"ray_init_s": init_s, "noop_1_worker_fit_s": noop_s}


def ray_train(config: DiscoveryConfig, regions: list, workers: int, folder: Path) -> dict:
    load = os.getloadavg()[0]
    log = folder / f"workers{workers}.jsonl"
    job = DiscoverJobConfig(data=folder, out=folder / f"out{workers}", detections=folder, discovery=config,
                            k=config.classes.k, device="cpu", progress=False)
    data = TrainData(regions, None, {r.image_id: r.image_id for r in regions}, "none", "folder", {})
    started = time.perf_counter()
    run_train(job, ClusterConfig(workers=workers, cpus_per_worker=1, name=f"scaling-{workers}"), data,
              epoch_callbacks=[RecordWorker(str(log))])
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    by_epoch: dict[int, float] = {}
    for _, epoch, seconds, _ in rows:
        by_epoch[epoch] = max(by_epoch.get(epoch, 0.0), seconds)
    epoch = epoch_time([by_epoch[e] for e in sorted(by_epoch)])
    peaks = [max(r[3] for r in rows if r[0] == rank) for rank in range(workers)]
    return {"mode": f"Ray Train, {workers} CPU worker{'s' if workers > 1 else ''} (gloo)", "workers": workers,
            "epoch_s": epoch, "crops_per_s": len(regions) / epoch, "wall_s": wall, "peak_rss_mb_per_worker": peaks,
            "load_average_1min_at_start": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=384)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = DiscoveryConfig.of(kind="transformer", cnn="mobilenet_v2", image_size=args.image_size, depth=2,
                                embed_dim=128, attention_heads=4, projection_hidden=256, projection_dim=128, n_heads=2,
                                batch_size=args.batch_size, epochs=args.epochs, cached_views=4, k=6, progress=False)
    regions = generated_crops(args.crops, args.image_size)
    load_before = os.getloadavg()
    rows = [single_process(config, regions, "first")]
    startup = ray_startup()
    rows.append(single_process_in_ray_task(config, regions))
    with tempfile.TemporaryDirectory() as folder:
        for workers in (1, 2):
            rows.append(ray_train(config, regions, workers, Path(folder)))
    rows.append(single_process(config, regions, "last"))
    load_after = os.getloadavg()
    one = next(r for r in rows if r["mode"].startswith("Ray Train, 1"))
    two = next(r for r in rows if r["workers"] == 2)
    speedup = two["crops_per_s"] / one["crops_per_s"]
    import ray

    result = {
        "benchmark": "train_scaling",
        "machine": {"processor": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "gpu": "none: no GPU was lent to this task, so neither Ray nor the plain PyTorch loop was "
                           "timed on a GPU"},
        "load_average_before": load_before, "load_average_after": load_after,
        "settings": {"crops": args.crops, "image_size": args.image_size, "epochs": args.epochs,
                     "batch_size_per_worker": args.batch_size, "cnn": "mobilenet_v2 (frozen, cached views)",
                     "depth": 2, "embed_dim": 128, "omp_threads_per_process": 1},
        "ray_startup": startup, "results": rows,
        "speedup_2_vs_1_workers": speedup, "target_speedup_on_separate_devices": TARGET_SPEEDUP,
        "target_met": None,
        "note": ("Both workers share the same 2 CPU cores with each other, the driver and other jobs (see the "
                 "load averages), so this run cannot show the target scaling of 2 workers on separate devices; "
                 "target_met is null rather than a verdict. Epoch times include the DDP all-reduce over gloo. "
                 "The view cache (frozen CNN features of every crop) is built in full by every worker before "
                 "the first epoch: it is in wall_s, not in epoch_s. Peak RSS of the single-process rows is the "
                 "benchmark process's peak so far."),
    }
    written = write_results("train_scaling", result, RESULT_KEYS, args.tag, args.out, indent=1)
    print(f"{'mode':<38}{'epoch s':>9}{'crops/s':>10}{'wall s':>9}{'load':>7}  peak RSS MB per worker")
    for row in rows:
        print(f"{row['mode']:<38}{row['epoch_s']:>9.2f}{row['crops_per_s']:>10.1f}{row['wall_s']:>9.1f}"
              f"{row['load_average_1min_at_start']:>7.1f}  "
              + ", ".join(f"{m:.0f}" for m in row["peak_rss_mb_per_worker"]))
    print(f"Ray start-up: init {startup['ray_init_s']:.1f} s, "
          f"no-op 1-worker fit {startup['noop_1_worker_fit_s']:.1f} s")
    print(f"2 vs 1 workers: {speedup:.2f}x (target {TARGET_SPEEDUP}x needs separate devices); load average "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores; written to {written}")


if __name__ == "__main__":
    main()
