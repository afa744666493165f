"""One `adisc discover` on MTD from the raw images, timed end to end, and the frozen floor timed after detection
(issue 14 item 6: "a whole adisc discover on MTD with-good-6 from the raw images ≤ 5 minutes on the 2-core machine;
the frozen mode ≤ 1 minute after detection; peak memory ≤ 3 GB").

Runs ``adisc discover --data MTD --format mtd --detector patchcore --k auto`` as a subprocess (default settings:
PatchCore fitted on the 761 normal training images, every test image detected, MEBin crops, the learned discovery
model with the normal images as its nuisance reference), then ``adisc discover --detections <its detect output>
--model frozen --k auto`` on the same regions, and scores both outputs with ``adisc evaluate``'s function, the only
step that reads MTD's labels. The discovered set is every MTD test image (the ``with-good-6`` protocol). Records the
wall times, the seconds of each stage the summaries list, the children's peak memory and the scores.

Usage: .venv/bin/python benchmarks/mtd_discover_time.py [--data ../shared/datasets/mtd] [--tag NAME]
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
from results_file import add_output_arguments, write_results

REPOSITORY = Path(__file__).resolve().parents[1]
DATASETS = REPOSITORY.parent / "shared" / "datasets"
TARGET_S = 300.0
FROZEN_TARGET_S = 60.0
MEMORY_TARGET_MB = 3072
RESULT_KEYS = ("protocol", "command", "seconds", "target_seconds", "meets_target", "stage_seconds", "k_estimated",
               "scores", "frozen", "peak_child_rss_mb", "memory_target_mb", "load_average_before",
               "load_average_after", "machine")


def adisc(*arguments: str) -> str:
    """Run one ``adisc`` verb; its stdout, or a RuntimeError with its last output lines."""
    process = subprocess.run([sys.executable, "-m", "anomaly_discovery.cli", *arguments], capture_output=True,
                             text=True)
    if process.returncode != 0:
        raise RuntimeError(f"adisc {arguments[0]} exited {process.returncode}: "
                           f"{(process.stdout + process.stderr).strip()[-2000:]}")
    return process.stdout


def timed_discover(*arguments: str) -> tuple[float, dict, dict]:
    """Wall seconds, summary and scores of one ``adisc discover`` (its ``--out`` is the argument after it)."""
    started = time.perf_counter()
    adisc("discover", *arguments, "--quiet")
    seconds = time.perf_counter() - started
    output = Path(arguments[arguments.index("--out") + 1])
    return seconds, json.loads((output / "summary.json").read_text()), evaluate_output(output).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS / "mtd")
    add_output_arguments(parser)
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="adisc-mtd-discover-") as work:
        learned = Path(work) / "discover"
        wall_s, summary, scores = timed_discover("--data", str(args.data), "--format", "mtd", "--detector",
                                                 "patchcore", "--k", "auto", "--out", str(learned))
        frozen_s, frozen_summary, frozen_scores = timed_discover(
            "--data", str(args.data), "--format", "mtd", "--detections", str(learned / "detect"), "--model",
            "frozen", "--k", "auto", "--out", str(Path(work) / "frozen"))
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"protocol": "with-good-6 (every MTD test image), semi (PatchCore)",
              "command": "adisc discover --format mtd --detector patchcore --k auto",
              "seconds": round(wall_s, 1), "target_seconds": TARGET_S, "meets_target": wall_s <= TARGET_S,
              "stage_seconds": {k: round(v, 1) for k, v in summary.get("seconds", {}).items()},
              "k_estimated": summary.get("k_estimated"), "scores": scores,
              "frozen": {"command": "adisc discover --detections DETECT --model frozen --k auto",
                         "seconds": round(frozen_s, 1), "target_seconds": FROZEN_TARGET_S,
                         "meets_target": frozen_s <= FROZEN_TARGET_S,
                         "stage_seconds": {k: round(v, 1) for k, v in frozen_summary.get("seconds", {}).items()},
                         "k_estimated": frozen_summary.get("k_estimated"), "scores": frozen_scores},
              "peak_child_rss_mb": round(peak_mb), "memory_target_mb": MEMORY_TARGET_MB,
              "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": "none"}}
    out = write_results("mtd_discover_time", result, RESULT_KEYS, args.tag, args.out, indent=1)
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
