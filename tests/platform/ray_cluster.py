"""Shared pieces of the Ray tests: ONE session-scoped local Ray (2 CPUs, 200 MB object store, no dashboard)
shut down at the end of the session, and tiny discovery data (coloured defect crops whose kind is known, as
an `adisc detect` output folder).

Import the fixture into a test module with ``from tests.platform.ray_cluster import ray_session``; a
module that imports it later finds Ray running and reuses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly_discovery.models.localisation.regions import Region, crop_region

RAY_CPUS = 2
OBJECT_STORE_BYTES = 200 * 1024 * 1024
KIND_COLOURS = ((220, 40, 40), (40, 60, 220), (40, 200, 60))
KIND_NAMES = ("red_disk", "blue_bar", "green_dots")
TINY_SETTINGS = dict(cnn="mobilenet_v2", view_size=64, batch_size=12, epochs=2, k="auto", k_max=4, progress=False)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session (started once, shut down when the session ends)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # workers import torch and the models; on a shared, overloaded 2-core machine that can pass Ray Train's
    # default 60 s worker-group start timeout
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=RAY_CPUS, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def draw_coloured_defect(kind: int, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A flat gray crop with one defect whose kind sets its shape and colour (disk, bar, dots), and its
    blurred anomaly map in [0, 1]."""
    image = np.clip(rng.uniform(115, 125) + rng.normal(0, 5, (size, size, 1)), 0, 255).repeat(3, 2)
    mask = np.zeros((size, size), np.uint8)
    cx, cy = (int(v) for v in rng.integers(20, 44, 2))
    if kind == 0:
        cv2.circle(mask, (cx, cy), int(rng.integers(6, 10)), 1, -1)
    elif kind == 1:
        cv2.rectangle(mask, (cx - 14, cy - 3), (cx + 14, cy + 3), 1, -1)
    else:
        for _ in range(10):
            cv2.circle(mask, (cx + int(rng.integers(-10, 11)), cy + int(rng.integers(-10, 11))), 2, 1, -1)
    image[mask > 0] = KIND_COLOURS[kind]
    anomaly = cv2.GaussianBlur(mask.astype(np.float32), (7, 7), 2)
    return image.astype(np.uint8), anomaly / anomaly.max()


def coloured_regions(n_per_kind: int, seed: int, kinds=(0, 1, 2), class_names: dict | None = None,
                     prefix: str = "img") -> tuple[list[Region], np.ndarray]:
    """Novel regions (or base ones, named by ``class_names[kind]``) and their kinds."""
    rng = np.random.default_rng(seed)
    regions, kinds_drawn = [], []
    for index in range(n_per_kind):
        for kind in kinds:
            image, anomaly = draw_coloured_defect(kind, rng)
            name = class_names[kind] if class_names else None
            regions.append(crop_region(image, (0, 0, 64, 64), anomaly, None, f"{prefix}_{kind}_{index}",
                                       class_name=name))
            kinds_drawn.append(kind)
    return regions, np.array(kinds_drawn)


def images_of(regions: list[Region]) -> dict[str, np.ndarray]:
    """The whole images of ``coloured_regions`` (each region covers its whole 64 px image)."""
    return {r.image_id: r.image for r in regions}


def write_detect_output(folder: Path, n_per_kind: int, seed: int) -> dict[str, int]:
    """A folder-per-kind data set (``<folder>/data/<kind>/<id>.png``, so `adisc evaluate` can score) and its
    `adisc detect` output (``<folder>/summary.json``, ``images/<id>/anomaly_map.png``), one region per 64 px
    image; returns each image id's kind."""
    folder = Path(folder)
    regions, kinds = coloured_regions(n_per_kind, seed)
    records = []
    for region, kind in zip(regions, kinds):
        image_dir = folder / "images" / region.image_id
        image_dir.mkdir(parents=True)
        image_path = folder / "data" / KIND_NAMES[kind] / f"{region.image_id}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image_path), region.image[..., ::-1])
        cv2.imwrite(str(image_dir / "anomaly_map.png"), np.rint(region.anomaly_map * 255).astype(np.uint8))
        records.append({"id": region.image_id, "image": str(image_path),
                        "regions": [{"box": list(region.box), "score": region.score, "area": region.area}]})
    summary = {"kind": "detect", "config": {"format": "folder", "data": str(folder / "data")}, "images": records}
    (folder / "summary.json").write_text(json.dumps(summary))
    return {r.image_id: int(k) for r, k in zip(regions, kinds)}
