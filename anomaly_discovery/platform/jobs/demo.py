"""``adisc demo``: the whole loop on freshly generated synthetic data, printing what each stage did.

generate → detect (PatchCore-style, offline MobileNetV2) → discover (AMGA, K estimated, the other product's
labelled defects as known classes) → evaluate (scoring only) → publish (serving model, store, index, proposals)
→ serve (Ray Serve API) with the dashboard command printed.
"""

from __future__ import annotations

import time
from pathlib import Path

from anomaly_discovery.data.synthetic import generate_dataset
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from .detect import DetectConfig, run_detect
from .discover import DiscoverJobConfig, run_discover
from .evaluate import evaluate_output
from ..storage.paths import ServicePaths
from .publish import publish_discovery

DISCOVERED_PRODUCT = "bottle"
BASE_PRODUCT = "metal_plate"


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(started: float) -> None:
    print(f"({time.perf_counter() - started:.1f}s)", flush=True)


def run_demo(out: Path, n_images: int = 240, seed: int = 0, quick: bool = False, serve: bool = True,
             port: int = 8000) -> int:
    out = Path(out)
    started = time.perf_counter()

    t = _stage(f"generate: {n_images} synthetic images, two products, six defect types (seed {seed})")
    data = generate_dataset(out / "data", n_images=n_images, seed=seed, progress=not quick, overwrite=True)
    print(data.summary())
    _done(t)

    t = _stage(f"detect + localise on '{DISCOVERED_PRODUCT}': PatchCore-style kNN, MEBin, object prior, crops")
    detect_config = DetectConfig(data=out / "data" / DISCOVERED_PRODUCT, out=out / "detect", format="mvtec",
                                 detector="patchcore", backbone="tiny" if quick else "mobilenet_v2",
                                 image_size=128 if quick else None, object_prior="fallback", seed=seed,
                                 progress=not quick)
    detection = run_detect(detect_config)
    print(detection.describe())
    print(evaluate_output(out / "detect").describe())
    _done(t)

    t = _stage(f"discover: AMGA model, K estimated, known classes = '{BASE_PRODUCT}' defects")
    discovery_settings = (DiscoveryConfig.of(cnn="tiny", view_size=64, epochs=2) if quick
                          else DiscoveryConfig())
    discovery = run_discover(DiscoverJobConfig(
        data=out / "data" / DISCOVERED_PRODUCT, out=out / "discover", format="mvtec", detections=out / "detect",
        k="auto", base=f"synthetic:{out / 'data'}", base_product=BASE_PRODUCT,
        base_per_class=8 if quick else 40, discovery=discovery_settings, seed=seed, progress=not quick))
    print(discovery.describe())
    print(evaluate_output(out / "discover").describe())
    _done(t)

    t = _stage("publish: serving model, SQL store, FAISS index, new-class proposals")
    published = publish_discovery(detection, discovery, out, replace=True)
    print(published.describe())
    _done(t)

    paths = ServicePaths(out)
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; everything is in {out}")
    print(f"review dashboard: adisc ui --workdir {out}")
    print(f"after review:     adisc export --workdir {out} --format folder --out {out / 'export'}; "
          f"adisc report --workdir {out} --out {out / 'report.html'}")
    if not serve:
        print(f"service:          adisc serve --workdir {out}")
        return 0
    from ..service.app import run_serve

    t = _stage(f"serve: Ray Serve API on http://127.0.0.1:{port} (Ctrl-C stops)")
    return run_serve({"store": paths.store_url, "index": str(paths.index), "model": str(paths.model),
                      "host": "127.0.0.1", "port": port})
