"""Loopback load on the Ray Serve API with the discovery model ``adisc demo`` publishes (issue 6 item 6, issue 16
item 6): throughput, p50 / p99 latency and errors of ``POST /v1/predict`` at 1 / 4 / 16 concurrent clients, one
request's time split into its stages (the ``Server-Timing`` header: decode, queue, detector, localisation,
discovery, index), p99 at half the saturation throughput, ``@serve.batch`` against one image per model call, and
a replica killed under load. Targets on the 2-core machine: ≥ 20 images/s at 256 px, p99 < 500 ms at half that
load, 0 errors; a killed replica costs ≤ 1% of requests and is replaced.

The model: ``--workdir`` (a work folder ``adisc demo`` filled), else ``adisc demo --no-serve`` runs first into a
temporary folder with its default settings (PatchCore on MobileNetV2 at 320 px, the AMGA discovery model with K
estimated). The requests cycle over the discovered product's test images (256 px PNGs). Every phase is bounded:
``--requests`` per closed-loop phase or ``--max-seconds``, whichever comes first; the open-loop phases send at a
fixed rate for ``--open-seconds``. Clients are asyncio + aiohttp in this process (keep-alive connections), on the
same machine as the server, so their CPU counts against the server's.

Usage: python benchmarks/serve_load.py [--workdir demo_out] [--replicas 2] [--requests 200] [--tag NAME]
Writes benchmarks/results/serve_load.json (``--tag``: serve_load.<tag>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np
import ray
from ray import serve

from anomaly_discovery.platform.service.app import STAGES, ServeSettings, bound_service
from anomaly_discovery.platform.storage.paths import ServicePaths
from machine_info import cpu_model
from results_file import add_output_arguments, write_results

TOKEN_VARIABLE = "ADISC_BENCH_TOKEN"
RESULT_KEYS = ("benchmark", "machine", "predictor", "endpoint", "server", "bounds", "concurrency", "stage_ms",
               "saturation_throughput", "half_saturation", "batching", "replica_kill", "targets", "peak_memory_mb",
               "demo_seconds")
TARGET_IMAGES_PER_S, TARGET_P99_MS = 20.0, 500.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def demo_workdir(folder: Path) -> float:
    """``adisc demo --no-serve`` into ``folder`` with its defaults; returns its wall seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anomaly_discovery.cli", "demo", "--out", str(folder), "--no-serve"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def predictor_description(workdir: Path) -> dict:
    manifest = json.loads((ServicePaths(workdir).model / "predictor.json").read_text())
    config = json.loads((ServicePaths(workdir).model / manifest["discovery"] / "model.json").read_text())["config"]
    return {"kind": manifest["kind"], "model_version": manifest["name"], "serving_folder": "adisc demo's "
            "service/serving_model", "detector": "PatchCore (fitted by adisc demo, library defaults)",
            "discovery": {"kind": config["model"]["kind"], "cnn": config["model"]["cnn"],
                          "view_size": config["model"]["view_size"], "k": config["classes"]["k"],
                          "k_method": config["classes"]["k_method"]},
            "object_prior": manifest.get("object_prior", {}).get("kind")}


def parse_timing(header: str | None) -> dict[str, float]:
    """``Server-Timing`` → stage → milliseconds."""
    stages = {}
    for part in (header or "").split(","):
        name, _, value = part.strip().partition(";dur=")
        if value:
            stages[name] = float(value)
    return stages


async def send(session: aiohttp.ClientSession, url: str, payload: bytes, record: dict) -> None:
    form = aiohttp.FormData()
    form.add_field("images", payload, filename="part.png", content_type="image/png")
    started = time.perf_counter()
    try:
        async with session.post(url, data=form) as response:
            await response.read()
            if response.status != 200:
                record["failures"].append(response.status)
                return
            record["stages"].append(parse_timing(response.headers.get("Server-Timing")))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        record["failures"].append(type(exc).__name__)
        return
    record["latencies"].append(time.perf_counter() - started)


def new_record() -> dict:
    return {"latencies": [], "failures": [], "stages": []}


def summary(record: dict, seconds: float) -> dict:
    ms = np.asarray(record["latencies"]) * 1000
    return {"requests": len(record["latencies"]) + len(record["failures"]), "duration_s": round(seconds, 2),
            "throughput": round(len(record["latencies"]) / seconds, 2) if seconds else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if ms.size else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if ms.size else None,
            "errors": len(record["failures"]), "error_kinds": sorted({str(f) for f in record["failures"]})}


def mean_stages(record: dict) -> dict[str, float]:
    """Mean milliseconds of each stage over the answered requests."""
    names = [s for s in (*STAGES, "total") if any(s in row for row in record["stages"])]
    return {name: round(float(np.mean([row.get(name, 0.0) for row in record["stages"]])), 1) for name in names}


async def closed_loop(url: str, payloads: list[bytes], clients: int, n_requests: int, max_seconds: float
                      ) -> tuple[dict, dict]:
    """``clients`` workers, each sending its next request when the previous answer arrives."""
    record, counter = new_record(), iter(range(n_requests))
    deadline = time.perf_counter() + max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            await send(session, url, payloads[i % len(payloads)], record)

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    return summary(record, time.perf_counter() - started), record


async def open_loop(url: str, payloads: list[bytes], rate: float, seconds: float, during=None) -> dict:
    """Requests started at a fixed ``rate`` per second for ``seconds``, whatever the answers do; ``during``
    (a coroutine function) runs alongside."""
    record, tasks = new_record(), []
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     connector=aiohttp.TCPConnector(limit=256)) as session:
        side = asyncio.create_task(during()) if during else None
        for i in range(max(1, int(rate * seconds))):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(send(session, url, payloads[i % len(payloads)], record)))
        await asyncio.gather(*tasks)
        extra = await side if side else None
    result = summary(record, time.perf_counter() - started) | {"offered_rate": round(rate, 2),
                                                                 "stage_ms": mean_stages(record)}
    return result | (extra or {})


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
    while time.perf_counter() - killed_at < 300:
        await asyncio.sleep(0.25)
        names = {a["name"] for a in replica_actors()}
        if names - before and victim not in names and running_replicas() >= expected:
            return {"killed_replica": victim, "replacement": sorted(names - before)[0],
                    "recovery_s": round(time.perf_counter() - killed_at, 2)}
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


def deploy(settings: ServeSettings, replicas: int) -> None:
    serve.run(bound_service(settings, replicas), name="adisc", route_prefix="/")


def load_phases(url: str, payloads: list[bytes], args) -> tuple[dict, dict]:
    phases, stages = {}, {}
    for clients in args.concurrency:
        phases[str(clients)], record = asyncio.run(closed_loop(url, payloads, clients, args.requests,
                                                               args.max_seconds))
        stages[str(clients)] = mean_stages(record)
        row = phases[str(clients)]
        print(f"{clients:>3} clients: {row['throughput']:6.2f} req/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
              f"errors {row['errors']}  stages {stages[str(clients)]}", flush=True)
    return phases, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="a work folder adisc demo filled (default: run it)")
    parser.add_argument("--requests", type=int, default=200, help="requests per closed-loop phase")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="bound of each closed-loop phase")
    parser.add_argument("--open-seconds", type=float, default=30.0, help="length of each fixed-rate phase")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8, help="@serve.batch: images per model call")
    add_output_arguments(parser)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        workdir, demo_seconds = args.workdir, None
        if workdir is None:
            workdir = Path(folder) / "demo"
            demo_seconds = round(demo_workdir(workdir), 1)
        payloads = [p.read_bytes() for p in sorted((workdir / "data" / "bottle" / "test").glob("*/*.png"))]
        os.environ[TOKEN_VARIABLE] = "bench-token"
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", TOKEN_VARIABLE: "bench-token"}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings.from_args({"workdir": str(workdir), "token_env": TOKEN_VARIABLE, "model_poll_s": 0,
                                            "replica_cpus": args.replica_cpus, "batch_size": args.batch_size})
        deploy(settings, args.replicas)
        url = f"http://127.0.0.1:{port}/v1/predict"
        asyncio.run(closed_loop(url, payloads, 4, 24, 60))
        phases, stages = load_phases(url, payloads, args)
        saturation = max(row["throughput"] for row in phases.values())
        half = asyncio.run(open_loop(url, payloads, saturation / 2, args.open_seconds))
        print(f"half saturation ({saturation / 2:.2f} req/s): p50 {half['p50_ms']} ms p99 {half['p99_ms']} ms "
              f"errors {half['errors']}", flush=True)
        killed = asyncio.run(open_loop(url, payloads, saturation / 2, args.open_seconds,
                                       during=lambda: kill_one_replica(args.open_seconds / 4, args.replicas)))
        killed["failed_fraction"] = round(killed["errors"] / max(1, killed["requests"]), 4)
        print(f"replica killed: {killed['errors']} of {killed['requests']} failed, recovered in "
              f"{killed['recovery_s']} s", flush=True)
        memory = peak_memory_mb()
        deploy(replace(settings, batch_size=1), args.replicas)
        unbatched, record = asyncio.run(closed_loop(url, payloads, max(args.concurrency), args.requests,
                                                    args.max_seconds))
        most = str(max(args.concurrency))
        batching = {"clients": int(most), f"batch_size_{args.batch_size}": phases[most] | {"stage_ms": stages[most]},
                    "batch_size_1": unbatched | {"stage_ms": mean_stages(record)}}
        print(f"batch size 1, {max(args.concurrency)} clients: {unbatched['throughput']} req/s", flush=True)
        description = predictor_description(workdir)
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "serve_load",
        "machine": {"processor": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "ray": ray.__version__, "gpu": "none",
                    "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "predictor": description,
        "endpoint": "POST /v1/predict, one 256 px PNG per request, mask as PNG",
        "server": {"replicas": args.replicas, "replica_cpus": args.replica_cpus, "batch_size": settings.batch_size,
                   "batch_wait_s": settings.batch_wait_s, "omp_num_threads": 1},
        "bounds": {"requests_per_phase": args.requests, "max_seconds_per_phase": args.max_seconds,
                   "open_loop_seconds": args.open_seconds},
        "concurrency": phases, "stage_ms": stages, "saturation_throughput": saturation, "half_saturation": half,
        "batching": batching, "replica_kill": killed,
        "targets": {"images_per_s_at_256px_at_least_20": saturation >= TARGET_IMAGES_PER_S,
                    "p99_ms_at_half_saturation_below_500": half["p99_ms"] is not None
                    and half["p99_ms"] < TARGET_P99_MS,
                    "zero_errors": all(row["errors"] == 0 for row in phases.values()) and half["errors"] == 0,
                    "replica_kill_failed_at_most_1pct": killed["failed_fraction"] <= 0.01,
                    "replica_recovered": killed["recovery_s"] is not None},
        "peak_memory_mb": memory, "demo_seconds": demo_seconds,
    }
    written = write_results("serve_load", result, RESULT_KEYS, args.tag, args.out)
    print(f"written to {written}")


if __name__ == "__main__":
    main()
