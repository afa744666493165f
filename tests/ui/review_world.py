"""A small review world laid out like ``adisc demo``'s work folder: labelled images in ``data/<kind>/``, detect-style
``anomaly_map.png`` / ``mebin_mask.png`` per image, and the service state where ``ServicePaths`` puts it (a
pixel-statistics predictor as the serving model, the store and the index) loaded with a discovery run: two known
kinds, two novel kinds waiting as proposals. Used by the dashboard tests and benchmarks/proposals_page.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from anomaly_discovery.data import save_image
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import DiscoveredImage, DiscoveredRegion
from anomaly_discovery.platform.predictor import PixelStatsConfig, build_predictor, write_pixel_stats_model
from anomaly_discovery.platform.storage.paths import ServicePaths
from anomaly_discovery.platform.storage.store import Store
from anomaly_discovery.ui.settings import UISettings
from tests.platform.serve_world import DIM, KINDS, KNOWN_KINDS, defect_image

def build_review_world(folder: Path, per_kind: int = 12) -> Path:
    """Write the world into ``folder`` (see the module docstring) and return it."""
    paths = ServicePaths(folder)
    model_dir = write_pixel_stats_model(paths.model, PixelStatsConfig(dim=DIM), name="pixel-stats-v1")
    predictor = build_predictor(model_dir)
    images, regions = [], []
    for k, kind in enumerate(KINDS):
        arrays = [defect_image(kind, seed=100 * k + i) for i in range(per_kind)]
        for i, (array, prediction) in enumerate(zip(arrays, predictor.predict(arrays))):
            key = f"{kind}_{i}"
            image_path, detect_dir = folder / "data" / kind / f"{key}.png", folder / "detect" / "images" / key
            save_image(image_path, array)
            save_image(detect_dir / "anomaly_map.png", np.uint8(prediction.anomaly_map * 255))
            save_image(detect_dir / "mebin_mask.png", prediction.mask)
            images.append(DiscoveredImage(key, str(image_path), f"hash-{key}"))
            region = prediction.regions[0]
            known = kind if kind in KNOWN_KINDS else None
            regions.append(DiscoveredRegion(key, region.box, region.anomaly_score, region.embedding, known,
                                            0.9 if known else None, str(detect_dir / "mebin_mask.png")))
    store = Store(paths.store_url)
    loop = DiscoveryLoop(store, paths.index, DIM)
    loop.ingest_discovery(images, regions, KNOWN_KINDS, model_version="discovery-1", artifact_path=str(model_dir))
    loop.close()
    store.dispose()
    return folder


def copy_world(template: Path, workdir: Path) -> UISettings:
    """A fresh copy of the template's store and index in ``workdir``; images, model and labels stay shared."""
    shutil.copytree(ServicePaths(template).service, ServicePaths(workdir).service,
                    ignore=shutil.ignore_patterns(ServicePaths(template).model.name))
    return UISettings.for_workdir(workdir, model=ServicePaths(template).model, data=template / "data")
