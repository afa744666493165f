"""A small real world for the service tests: synthetic defect images (written to disk, so a new model can
re-embed them), a pixel-statistics predictor folder, and a store + index loaded with a discovery run over them (two
known kinds, two novel kinds waiting as proposals). The discovery-model world is ``discovery_world``."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from anomaly_discovery.data import save_image
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import DiscoveredImage, DiscoveredRegion
from anomaly_discovery.platform.predictor import PixelStatsConfig, build_predictor, write_pixel_stats_model
from anomaly_discovery.platform.storage.store import Store

KINDS = ("rust", "stain", "crack", "hole")
KNOWN_KINDS = ("rust", "stain")
SIZE = 64
DIM = 32


def defect_image(kind: str, seed: int) -> np.ndarray:
    """A grey noisy plate with one defect: rust = red square, stain = blue disc, crack = green line,
    hole = black disc."""
    rng = np.random.default_rng(seed)
    image = np.clip(128 + rng.normal(0, 3, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    x, y = (int(v) for v in rng.integers(16, SIZE - 16, 2))
    radius = int(rng.integers(5, 9))
    if kind == "rust":
        image[y - radius:y + radius, x - radius:x + radius] = (200, 50, 40)
    elif kind == "stain":
        cv2.circle(image, (x, y), radius, (40, 60, 210), -1)
    elif kind == "crack":
        cv2.line(image, (x - 12, y - 3), (x + 12, y + 3), (40, 200, 60), 2)
    else:
        cv2.circle(image, (x, y), radius, (10, 10, 10), -1)
    return image


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class World:
    store_url: str
    index_path: Path
    model_dir: Path
    folder: Path

    def args(self, **extra) -> dict:
        return {"store": self.store_url, "index": str(self.index_path), "model": str(self.model_dir),
                "token_env": "ADISC_TEST_TOKEN", **extra}


def build_world(folder: Path, per_kind: int = 12) -> World:
    """Write the predictor folder and ingest a discovery run of ``per_kind`` images of each kind."""
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = write_pixel_stats_model(folder / "model", PixelStatsConfig(dim=DIM), name="pixel-stats-v1")
    predictor = build_predictor(model_dir)
    images, regions = [], []
    for k, kind in enumerate(KINDS):
        arrays = [defect_image(kind, seed=100 * k + i) for i in range(per_kind)]
        for i, (array, prediction) in enumerate(zip(arrays, predictor.predict(arrays))):
            key = f"{kind}_{i}"
            save_image(folder / f"{key}.png", array)
            images.append(DiscoveredImage(key, f"{folder}/{key}.png", f"hash-{key}"))
            for region in prediction.regions[:1]:
                known = kind if kind in KNOWN_KINDS else None
                regions.append(DiscoveredRegion(key, region.box, region.anomaly_score, region.embedding, known,
                                                0.9 if known else None))
    store_url = f"sqlite:///{folder / 'adisc.db'}"
    store = Store(store_url)
    loop = DiscoveryLoop(store, folder / "state" / "index.npz", DIM)
    loop.ingest_discovery(images, regions, KNOWN_KINDS, model_version="discovery-1",
                          artifact_path=str(folder / "discovery-run"))
    loop.close()
    store.dispose()
    return World(store_url, folder / "state" / "index.npz", model_dir, folder)
