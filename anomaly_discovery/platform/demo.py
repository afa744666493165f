"""``adisc demo``: every stage built so far, on freshly generated synthetic data, printing what it did."""

from __future__ import annotations

import time
from pathlib import Path

from ..data.synthetic import generate_dataset
from .detect import DetectConfig, run_detect
from .evaluate import evaluate_output


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(out: Path, n_images: int = 240, seed: int = 0, quick: bool = False) -> int:
    out = Path(out)
    started = time.perf_counter()

    t = _stage(f"generate: {n_images} synthetic images (seed {seed})")
    data = generate_dataset(out / "data", n_images=n_images, seed=seed, progress=not quick, overwrite=True)
    print(data.summary())
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _stage("detect + localise: PatchCore-style kNN (ImageNet MobileNetV2, offline), MEBin, object prior, crops")
    detect_config = DetectConfig(data=out / "data", out=out / "detect", format="mvtec", detector="patchcore",
                                 backbone="tiny" if quick else "mobilenet_v2", image_size=128 if quick else 256,
                                 seed=seed, progress=not quick)
    summary = run_detect(detect_config)
    print(summary.describe())

    t = _stage("evaluate detection against the generator's masks (scoring only)")
    print(evaluate_output(out / "detect").describe())
    print(f"({time.perf_counter() - t:.1f}s)")

    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; outputs in {out}")
    print("not built yet: discovery training on Ray (adisc train/tune), the service (adisc serve), "
          "the review dashboard (adisc ui)")
    return 0
