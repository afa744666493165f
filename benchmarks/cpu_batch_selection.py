"""How many images the frozen backbones run at once on the CPU (``backbones.CPU_BATCH_PIXELS``).

Every frozen backbone pass of the product, at its default input and calling batch: the discovery views
(MobileNetV2 taps and head, 224 px, 32 images), PatchCore's map features (MobileNetV2, 320 px reflect-padded to
384, 16 images) and its anomalib embedding (320 px), the ensemble's second PatchCore (EfficientNet-Lite0, 384 px),
PRN's encoder (MobileNetV2, four taps, 256 px) and the zero-shot detector (MobileNetV2, 256 px padded to 320). Each
runs on the same random batch with the whole batch at once and at each candidate budget of input pixels per pass
(``FeatureExtractor.cpu_batch_pixels``: 2^16 to 2^20, i.e. one to twenty images of 224 px).

Rule, fixed before the first run: a budget is eligible when every pass's maps equal the whole batch's (largest
absolute difference ≤ 1e-5 of the largest absolute value). The eligible budget with the highest geometric mean
over the passes of its speed-up over the whole batch (median of ``--repeats`` timed calls each) is adopted when
that mean is ≥ 1.10 and no pass runs slower than 0.95× the whole batch; otherwise the whole batch stays
(``CPU_BATCH_PIXELS = None``). The product's default follows the result by hand (``backbones.py``).

Usage: python benchmarks/cpu_batch_selection.py [--repeats 3] [--threads 2]
Writes benchmarks/results/cpu_batch_selection.json.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from anomaly_discovery.models.detectors.mutual_scoring import MutualScoringDetector
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.detectors.prn import DEFAULT_LAYERS, PRNConfig
from anomaly_discovery.models.discovery.views import ViewExtractor
from anomaly_discovery.models.features.backbones import build_backbone, for_inference
from machine_info import cpu_model
from results_file import add_output_arguments, write_results

RESULT_KEYS = ("benchmark", "machine", "threads", "repeats", "rule", "budgets", "passes", "summary", "chosen")
BUDGETS = (2 ** 16, 2 ** 17, 2 ** 18, 2 ** 19, 2 ** 20)
TOLERANCE = 1e-5
MIN_MEAN_SPEEDUP, MIN_PASS_SPEEDUP = 1.10, 0.95
RULE = ("eligible: every pass's maps within 1e-5 (relative to the largest value) of the whole batch's; among them "
        "the highest geometric-mean speed-up over the whole batch, adopted when ≥ 1.10 with no pass below 0.95×; "
        "else the whole batch")


def product_passes() -> dict[str, tuple]:
    """name → (the extractor whose ``cpu_batch_pixels`` is set, the callable timed, input side, calling batch)."""
    views = ViewExtractor("mobilenet_v2")
    patchcore = PatchCoreDetector(progress=False, device="cpu")
    lite = PatchCoreDetector(backbone="efficientnet_lite0", progress=False, device="cpu")
    zero_shot = MutualScoringDetector(progress=False, device="cpu")
    prn = PRNConfig()
    prn_encoder = for_inference(build_backbone(prn.encoder, None, DEFAULT_LAYERS[prn.encoder]))
    return {
        "views (MobileNetV2, 224 px)": (views.trunk, views, 224, 32),
        "PatchCore maps (MobileNetV2, 384 px)": (patchcore.extractor, patchcore.extractor,
                                                 patchcore.image_size + 2 * patchcore.border_pad, patchcore.batch_size),
        "PatchCore anomalib embedding (MobileNetV2, 320 px)": (patchcore.extractor, patchcore.extractor,
                                                               patchcore.image_size, patchcore.batch_size),
        "ensemble PatchCore maps (EfficientNet-Lite0, 384 px)": (
            lite.extractor, lite.extractor, lite.image_size + 2 * lite.border_pad, lite.batch_size),
        "PRN encoder (MobileNetV2, 256 px)": (prn_encoder, prn_encoder, prn.image_size, prn.predict_batch_size),
        "zero-shot (MobileNetV2, 320 px)": (zero_shot.extractor, zero_shot.extractor,
                                            zero_shot.image_size + 2 * zero_shot.border_pad, zero_shot.batch_size),
    }


@torch.no_grad()
def timed_maps(run, batch: torch.Tensor, repeats: int) -> tuple[list[torch.Tensor], float]:
    """The maps of one call and the median seconds of ``repeats`` calls (after one untimed warm-up)."""
    maps = run(batch)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(batch)
        seconds.append(time.perf_counter() - started)
    return [m.float() for m in maps], float(np.median(seconds))


def measure_pass(extractor, run, side: int, batch_size: int, repeats: int, seed: int) -> dict:
    """Images/s of the whole batch and of every budget, and each budget's largest relative difference."""
    batch = torch.randn(batch_size, 3, side, side, generator=torch.Generator().manual_seed(seed))
    batch = batch.contiguous(memory_format=torch.channels_last)
    extractor.cpu_batch_pixels = None
    whole, whole_s = timed_maps(run, batch, repeats)
    scale = max(float(m.abs().max()) for m in whole)
    row = {"side": side, "batch": batch_size, "whole_images_per_s": round(batch_size / whole_s, 2), "budgets": {}}
    for budget in BUDGETS:
        extractor.cpu_batch_pixels = budget
        maps, seconds = timed_maps(run, batch, repeats)
        difference = max(float((a - b).abs().max()) for a, b in zip(maps, whole)) / scale
        row["budgets"][str(budget)] = {"images_per_pass": max(1, budget // (side * side)),
                                       "images_per_s": round(batch_size / seconds, 2),
                                       "speedup": round(whole_s / seconds, 3), "relative_difference": difference}
    extractor.cpu_batch_pixels = None
    return row


def decide(passes: dict[str, dict]) -> tuple[dict, int | None]:
    summary = {}
    for budget in map(str, BUDGETS):
        rows = [p["budgets"][budget] for p in passes.values()]
        summary[budget] = {
            "equal": all(r["relative_difference"] <= TOLERANCE for r in rows),
            "mean_speedup": round(math.exp(np.mean([math.log(r["speedup"]) for r in rows])), 3),
            "min_speedup": min(r["speedup"] for r in rows)}
    eligible = [b for b in summary if summary[b]["equal"]]
    best = max(eligible, key=lambda b: summary[b]["mean_speedup"], default=None)
    adopted = (best is not None and summary[best]["mean_speedup"] >= MIN_MEAN_SPEEDUP
               and summary[best]["min_speedup"] >= MIN_PASS_SPEEDUP)
    return summary, int(best) if adopted else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    passes = {}
    for name, (extractor, run, side, batch_size) in product_passes().items():
        passes[name] = measure_pass(extractor, run, side, batch_size, args.repeats, args.seed)
        speeds = ", ".join(f"{b['images_per_pass']}: {b['speedup']:.2f}×" for b in passes[name]["budgets"].values())
        print(f"{name}: whole batch {passes[name]['whole_images_per_s']:.1f} images/s; {speeds}", flush=True)
    summary, chosen = decide(passes)
    print(f"chosen: {chosen} pixels per pass" if chosen else "chosen: the whole batch")
    result = {"benchmark": "cpu_batch_selection",
              "machine": {"processor": cpu_model(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
              "threads": args.threads, "repeats": args.repeats, "rule": RULE, "budgets": list(BUDGETS),
              "passes": passes, "summary": summary, "chosen": chosen}
    print(f"written to {write_results('cpu_batch_selection', result, RESULT_KEYS, args.tag, args.out)}")


if __name__ == "__main__":
    main()
