"""Predictors behind the service: the pixel-statistics baseline and the real discovery pipeline (a tiny trained
discovery model + a PatchCore detector on the 'tiny' backbone), both loaded from their folders."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from anomaly_discovery.models.discovery.training import train_discovery
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.localisation.regions import crop_region
from anomaly_discovery.models.localisation.localise import Localisation, fit_localisation
from anomaly_discovery.platform.predictor import (PixelStatsConfig, RegionPredictor, build_predictor,
                                                  write_discovery_model, write_pixel_stats_model)
from tests.platform.serve_world import defect_image

TINY = dict(cnn="tiny", view_size=64, batch_size=16, epochs=1, k=2, progress=False)


def test_pixel_stats_regions_cover_the_defect_with_unit_embeddings(tmp_path):
    predictor = build_predictor(write_pixel_stats_model(tmp_path, PixelStatsConfig(dim=16)))
    assert isinstance(predictor, RegionPredictor)
    image = defect_image("rust", seed=4)
    first, again = predictor.predict([image]), predictor.predict([image])
    region = first[0].regions[0]
    x0, y0, x1, y1 = region.box
    assert (image[y0:y1, x0:x1, 0] == 200).mean() > 0.9
    assert np.linalg.norm(region.embedding) == pytest.approx(1.0, abs=1e-5) and region.embedding.shape == (16,)
    np.testing.assert_array_equal(first[0].regions[0].embedding, again[0].regions[0].embedding)
    assert first[0].mask.shape == image.shape[:2] and first[0].mask[y0:y1, x0:x1].any()


def test_a_folder_without_a_manifest_or_with_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="predictor.json"):
        build_predictor(tmp_path)
    (tmp_path / "predictor.json").write_text('{"kind": "magic"}')
    with pytest.raises(ValueError, match="magic"):
        build_predictor(tmp_path)


def plate(seed: int, defect: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.clip(120 + rng.normal(0, 4, (64, 64, 3)), 0, 255).astype(np.uint8)
    if defect:
        cv2.circle(image, (32, 30), 8, (20, 20, 20), -1)
    return image


def test_the_discovery_pipeline_serves_from_its_folder(tmp_path):
    detector = PatchCoreDetector(backbone="tiny", image_size=64, device="cpu", progress=False)
    detector.fit([plate(s, False) for s in range(4)])
    defects = [plate(10 + s, True) for s in range(6)]
    maps = [d.anomaly_map for d in detector.predict(defects)]
    localisation = fit_localisation(maps, [128])
    regions = [crop_region(image, (16, 14, 48, 46), (m - m.min()) / (m.max() - m.min() + 1e-9), None, f"r{i}")
               for i, (image, m) in enumerate(zip(defects, maps))]
    images = {f"r{i}": image for i, image in enumerate(defects)}
    artifacts = train_discovery(DiscoveryConfig.of(**TINY), regions * 2, images=images)
    folder = write_discovery_model(tmp_path / "serving", artifacts.predictor, detector, localisation, name="disc-1")
    predictor = build_predictor(folder)
    assert predictor.model_version == "disc-1"
    assert predictor.embedding_dim == artifacts.regions.embeddings.shape[1]
    predicted = predictor.predict([defects[0], plate(99, False)])
    assert len(predicted) == 2 and predicted[0].mask.shape == (64, 64)
    assert predicted[0].regions, "the dark hole is found"
    region = predicted[0].regions[0]
    assert np.linalg.norm(region.embedding) == pytest.approx(1.0, abs=1e-4)
    assert region.class_index in (0, 1) and 0 <= region.confidence <= 1 and region.outlier_score >= 0
    with pytest.raises(ValueError, match="high > low"):
        Localisation(1.0, 1.0, 10)
