"""One `adisc discover` on MTD from the raw images, timed end to end (issue 4: "the MTD run finishes in under 15
minutes on this 2-core CPU").

Runs ``adisc discover --data MTD --format mtd --detector patchcore --base neu:NEU --k auto`` as a subprocess
(default settings: PatchCore fitted on the 761 normal training images, every test image detected, MEBin crops,
30-epoch AMGA discovery with NEU-DET as the known classes), then scores its output with ``adisc evaluate``'s
function, the only step that reads MTD's labels. The discovered set is every MTD test image, i.e. the ``with-good-6``
protocol. Records the wall time, the seconds of each stage the summary lists, the children's peak memory and
the scores. Writes benchmarks/results/mtd_discover_time.json.

Usage: .venv/bin/python benchmarks/mtd_discover_time.py [--data ../shared/datasets/mtd] [--neu ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anomaly_discovery.platform.jobs.evaluate import evaluate_output
from machine_info import cpu_model

REPOSITORY = Path(__file__).resolve().parents[1]
DATASETS = REPOSITORY.parent / "shared" / "datasets"
RESULTS = REPOSITORY / "benchmarks" / "results" / "mtd_discover_time.json"
TARGET_S = 900.0


def adisc(*arguments: str) -> str:
    """Run one ``adisc`` verb; its stdout, or a RuntimeError with its last output lines."""
    process = subprocess.run([sys.executable, "-m", "anomaly_discovery.cli", *arguments], capture_output=True,
                             text=True)
    if process.returncode != 0:
        raise RuntimeError(f"adisc {arguments[0]} exited {process.returncode}: "
                           f"{(process.stdout + process.stderr).strip()[-2000:]}")
    return process.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS / "mtd")
    parser.add_argument("--neu", type=Path, default=DATASETS / "neu-det")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="adisc-mtd-discover-") as work:
        output = Path(work) / "discover"
        started = time.perf_counter()
        adisc("discover", "--data", str(args.data), "--format", "mtd", "--detector", "patchcore",
              "--base", f"neu:{args.neu}", "--k", "auto", "--out", str(output), "--quiet")
        wall_s = time.perf_counter() - started
        summary = json.loads((output / "summary.json").read_text())
        scores = evaluate_output(output).metrics
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"benchmark": "mtd_discover_time", "protocol": "with-good-6 (every MTD test image), semi (PatchCore)",
              "command": "adisc discover --format mtd --detector patchcore --base neu:NEU --k auto",
              "seconds": round(wall_s, 1), "target_seconds": TARGET_S, "meets_target": wall_s < TARGET_S,
              "stage_seconds": {k: round(v, 1) for k, v in summary.get("seconds", {}).items()},
              "k_estimated": summary.get("k_estimated"), "scores": scores,
              "peak_child_rss_mb": round(peak_mb), "load_average_before": load_before,
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": "none"}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
