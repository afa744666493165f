"""Loopback load on the Ray Serve API (issue 6 item 6): throughput, p50/p99 latency, errors and peak memory of
``POST /v1/predict`` at 1 / 4 / 16 concurrent clients, p99 at half the saturation throughput (target < 500 ms),
and a replica killed under load (target: ≤ 1% failed requests, the replica replaced).

Every phase is bounded: ``--requests`` per closed-loop phase or ``--max-seconds``, whichever comes first; the
open-loop phases send at a fixed rate for ``--open-seconds``. Clients are asyncio + aiohttp in this process
(keep-alive connections); the server is ``--replicas`` replicas of ``DiscoveryService`` with
``--replica-cpus`` CPUs each, on this machine.

Predictor: the training-free pixel-statistics baseline (``platform/predictor.py``) — the trained discovery model
has no serving folder yet; the JSON says which was used. Data: ``--images`` synthetic metal-plate images
(``data/synthetic``, 256 px) — a discovery run over the defect ones loads the store (three defect kinds known,
three left as proposals) and the requests cycle over all of them.

Usage: python benchmarks/serve_load.py [--requests 300] [--max-seconds 40] [--replicas 2] [--images 60]
Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import ray
from ray import serve

from anomaly_discovery.data import load_image
from anomaly_discovery.data.synthetic import generate_dataset
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import DiscoveredImage, DiscoveredRegion
from anomaly_discovery.platform.predictor import PixelStatsConfig, build_predictor, write_pixel_stats_model
from anomaly_discovery.platform.service.app import ServeSettings, bound_service
from anomaly_discovery.platform.storage.store import Store
from machine_info import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"
TOKEN_VARIABLE = "ADISC_BENCH_TOKEN"
KNOWN = ("scratch", "stain", "hole")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare(folder: Path, n_images: int) -> tuple[dict, list[bytes]]:
    """Synthetic images, the predictor folder, and a store + index loaded with a discovery run over them."""
    data = generate_dataset(folder / "data", n_images=n_images, seed=0, image_size=256, products=("metal_plate",),
                            progress=False)
    model = write_pixel_stats_model(folder / "model", PixelStatsConfig(dim=64), name="pixel-stats-bench")
    predictor = build_predictor(model)
    test = [image for image in data.images if image.split == "test"]
    arrays = [load_image(data.out_dir / image.image_path) for image in test]
    images, regions = [], []
    for image, prediction in zip(test, predictor.predict(arrays)):
        images.append(DiscoveredImage(image.image_path, str(data.out_dir / image.image_path), image.image_path))
        for region in prediction.regions[:1]:
            known = image.label if image.label in KNOWN else None
            regions.append(DiscoveredRegion(image.image_path, region.box, region.anomaly_score, region.embedding,
                                            known, 0.9 if known else None))
    store_url = f"sqlite:///{folder / 'adisc.db'}"
    loop = DiscoveryLoop(Store(store_url), folder / "state" / "index.npz", predictor.embedding_dim)
    loop.ingest_discovery(images, regions, KNOWN, model_version="bench")
    loop.close()
    loop.store.dispose()
    payloads = [(data.out_dir / image.image_path).read_bytes() for image in data.images]
    return {"store": store_url, "index": str(folder / "state" / "index.npz"), "model": str(model),
            "token_env": TOKEN_VARIABLE, "model_poll_s": 0}, payloads


async def send(session: aiohttp.ClientSession, url: str, payload: bytes, latencies: list, failures: list) -> None:
    form = aiohttp.FormData()
    form.add_field("images", payload, filename="plate.png", content_type="image/png")
    started = time.perf_counter()
    try:
        async with session.post(url, data=form) as response:
            await response.read()
            if response.status != 200:
                failures.append(response.status)
                return
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        failures.append(type(exc).__name__)
        return
    latencies.append(time.perf_counter() - started)


def summary(latencies: list[float], failures: list, seconds: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies) + len(failures), "duration_s": round(seconds, 2),
            "throughput": round(len(latencies) / seconds, 2) if seconds else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if ms.size else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if ms.size else None,
            "errors": len(failures), "error_kinds": sorted({str(f) for f in failures})}


async def closed_loop(url: str, payloads: list[bytes], clients: int, n_requests: int, max_seconds: float) -> dict:
    """``clients`` workers, each sending its next request when the previous answer arrives."""
    latencies, failures, counter = [], [], iter(range(n_requests))
    deadline = time.perf_counter() + max_seconds
    timeout = aiohttp.ClientTimeout(total=60)

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            await send(session, url, payloads[i % len(payloads)], latencies, failures)

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    return summary(latencies, failures, time.perf_counter() - started)


async def open_loop(url: str, payloads: list[bytes], rate: float, seconds: float, during=None) -> dict:
    """Requests started at a fixed ``rate`` per second for ``seconds``, whatever the answers do; ``during``
    (a coroutine function) runs alongside."""
    latencies, failures, tasks = [], [], []
    timeout = aiohttp.ClientTimeout(total=60)
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=256)) as session:
        side = asyncio.create_task(during()) if during else None
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(send(session, url, payloads[i % len(payloads)], latencies, failures)))
        await asyncio.gather(*tasks)
        extra = await side if side else None
    result = summary(latencies, failures, time.perf_counter() - started)
    result["offered_rate"] = round(rate, 2)
    if extra:
        result.update(extra)
    return result


def replica_actors() -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if "DiscoveryService" in a["name"] and a["namespace"] == "serve"]


def running_replicas() -> int:
    status = serve.status().applications["adisc"].deployments["DiscoveryService"]
    return int(status.replica_states.get("RUNNING", 0))


async def kill_one_replica(after_s: float, expected: int) -> dict:
    """Kill a replica actor ``after_s`` seconds in; time until a new replica is up and ``expected`` run."""
    await asyncio.sleep(after_s)
    before = {a["name"] for a in replica_actors()}
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed_at = time.perf_counter()
    while True:
        await asyncio.sleep(0.25)
        names = {a["name"] for a in replica_actors()}
        if names - before and victim not in names and running_replicas() >= expected:
            return {"killed_replica": victim, "replacement": sorted(names - before)[0],
                    "recovery_s": round(time.perf_counter() - killed_at, 2)}
        if time.perf_counter() - killed_at > 120:
            return {"killed_replica": victim, "recovery_s": None}


def peak_memory_mb() -> dict:
    """Peak resident memory (VmHWM) of the Serve replica and proxy processes, and of this client process."""
    peaks: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for kind in ("ServeReplica", "ProxyActor", "ServeController"):
            if f"ray::{kind}" in title:
                hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
                peaks[f"{kind}:{pid}"] = round(hwm / 1024, 1)
    peaks["client"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per closed-loop phase")
    parser.add_argument("--max-seconds", type=float, default=40.0, help="bound of each closed-loop phase")
    parser.add_argument("--open-seconds", type=float, default=20.0, help="length of each fixed-rate phase")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        app_args, payloads = prepare(Path(folder), args.images)
        os.environ[TOKEN_VARIABLE] = "bench-token"
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", TOKEN_VARIABLE: "bench-token"}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings.from_args({**app_args, "replica_cpus": args.replica_cpus})
        serve.run(bound_service(settings, args.replicas), name="adisc", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/predict"
        asyncio.run(closed_loop(url, payloads, 4, 40, 20))
        phases = {}
        for clients in args.concurrency:
            phases[str(clients)] = asyncio.run(closed_loop(url, payloads, clients, args.requests, args.max_seconds))
            row = phases[str(clients)]
            print(f"{clients:>3} clients: {row['throughput']:7.1f} req/s  p50 {row['p50_ms']} ms  "
                  f"p99 {row['p99_ms']} ms  errors {row['errors']}", flush=True)
        saturation = max(row["throughput"] for row in phases.values())
        half = asyncio.run(open_loop(url, payloads, saturation / 2, args.open_seconds))
        print(f"half saturation ({saturation / 2:.1f} req/s): p50 {half['p50_ms']} ms p99 {half['p99_ms']} ms "
              f"errors {half['errors']}", flush=True)
        killed = asyncio.run(open_loop(url, payloads, saturation / 2, args.open_seconds,
                                       during=lambda: kill_one_replica(args.open_seconds / 4, args.replicas)))
        killed["failed_fraction"] = round(killed["errors"] / max(1, killed["requests"]), 4)
        print(f"replica killed: {killed['errors']} of {killed['requests']} failed, recovered in "
              f"{killed['recovery_s']} s", flush=True)
        memory = peak_memory_mb()
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "serve_load",
        "machine": {"processor": cpu_model(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "ray": ray.__version__,
                    "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "predictor": "pixel-stats (training-free baseline of platform/predictor.py, 64-d embeddings); the trained "
                     "discovery model has no serving folder yet",
        "endpoint": "POST /v1/predict, one 256 px PNG per request, mask as PNG",
        "server": {"replicas": args.replicas, "replica_cpus": args.replica_cpus, "batch_size": settings.batch_size,
                   "batch_wait_s": settings.batch_wait_s},
        "bounds": {"requests_per_phase": args.requests, "max_seconds_per_phase": args.max_seconds,
                   "open_loop_seconds": args.open_seconds},
        "concurrency": phases,
        "saturation_throughput": saturation,
        "half_saturation": half,
        "targets": {"p99_ms_at_half_saturation_below_500": half["p99_ms"] is not None and half["p99_ms"] < 500,
                    "zero_errors": all(row["errors"] == 0 for row in phases.values()) and half["errors"] == 0,
                    "replica_kill_failed_at_most_1pct": killed["failed_fraction"] <= 0.01,
                    "replica_recovered": killed["recovery_s"] is not None},
        "replica_kill": killed,
        "peak_memory_mb": memory,
        "notes": "clients run on the same 2-core machine as the server, so client CPU counts against throughput.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
