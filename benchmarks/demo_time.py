"""The whole `adisc demo` (issue 7 item 3): generate → detect → discover → publish (store, index, proposals) →
serve, with the default settings; target under 5 minutes on the 2-core development machine.

Runs ``adisc demo --out TMP --port FREE`` as a subprocess, reads the seconds each stage prints, and stops the
clock when the service answers ``GET /healthz`` with 200 (the demo is then serving, with proposals waiting for
review); then stops the service. Writes benchmarks/results/demo_time.json (``--tag NAME``: demo_time.NAME.json).

Usage: .venv/bin/python benchmarks/demo_time.py [--timeout 900] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from machine_info import cpu_model
from results_file import add_output_arguments, write_results

REPOSITORY = Path(__file__).resolve().parents[1]
RESULT_KEYS = ("benchmark", "command", "target_s", "seconds_until_serving", "seconds_until_published",
               "stage_seconds", "meets_target", "machine")
TARGET_S = 300.0
STAGE = re.compile(r"^== (\w+)")
STAGE_SECONDS = re.compile(r"^\((\d+(?:\.\d+)?)s\)$")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stage_seconds(lines: list[str]) -> dict[str, float]:
    """``== <stage> ...`` followed later by ``(12.3s)``: the seconds of each finished stage, by its first word."""
    seconds, current = {}, None
    for line in lines:
        if match := STAGE.match(line):
            current = match.group(1)
        elif (match := STAGE_SECONDS.match(line.strip())) and current is not None:
            seconds[current] = float(match.group(1))
            current = None
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    add_output_arguments(parser)
    args = parser.parse_args()
    port = free_port()
    load_before = list(os.getloadavg())
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "anomaly_discovery.cli", "demo", "--out", f"{work}/demo", "--port", str(port)]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
        reader.start()
        serving_s = None
        while time.perf_counter() - started < args.timeout and process.poll() is None:
            if any(line.startswith("== serve") for line in lines) and healthy(port):
                serving_s = time.perf_counter() - started
                break
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=5)
    if serving_s is None:
        sys.stdout.write("".join(lines[-40:]))
        raise SystemExit(f"the demo did not reach a serving state within {args.timeout:.0f} s")
    stages = stage_seconds(lines)
    finished = next((float(m.group(1)) for line in lines if (m := re.search(r"demo finished in (\d+\.\d+)s", line))),
                    None)
    result = {
        "benchmark": "demo_time", "command": "adisc demo (default settings)", "target_s": TARGET_S,
        "seconds_until_serving": round(serving_s, 1), "seconds_until_published": finished,
        "stage_seconds": stages, "meets_target": serving_s < TARGET_S,
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": "none",
                    "load_average_before": load_before, "load_average_after": list(os.getloadavg())},
    }
    written = write_results("demo_time", result, RESULT_KEYS, args.tag, args.out, indent=1)
    print(json.dumps(result, indent=1), f"\nwritten to {written}")


if __name__ == "__main__":
    main()
