"""DiscoveryConfig in groups (model / optimisation / classes / runtime), and the files written before the grouping
(flat settings files and saved models, in fixtures/) still load."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from anomaly_discovery.config import ConfigError, load_config
from anomaly_discovery.models.discovery.config import (ClassSettings, DiscoveryConfig, ModelSettings,
                                                       OptimisationSettings)
from anomaly_discovery.models.discovery.predict import DiscoveryPredictor
from anomaly_discovery.models.discovery.training import predict_regions
from anomaly_discovery.models.localisation.regions import crop_region

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_regions() -> list:
    """The regions the fixture model was trained on (same generator and seed)."""
    rng = np.random.default_rng(0)
    regions = []
    for i in range(12):
        image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        anomaly_map = np.zeros((48, 48), np.float32)
        anomaly_map[10:30, 10:30] = 0.9
        regions.append(crop_region(image, (0, 0, 48, 48), anomaly_map, None, f"im{i}"))
    return regions


def test_settings_are_grouped_and_named_flat_in_of_and_replace():
    config = DiscoveryConfig.of(epochs=3, k=4, cnn="tiny", seed=7)
    assert isinstance(config.model, ModelSettings) and config.model.cnn == "tiny"
    assert isinstance(config.optimisation, OptimisationSettings) and config.optimisation.epochs == 3
    assert isinstance(config.classes, ClassSettings) and config.classes.k == 4
    assert config.runtime.seed == 7
    changed = config.replace(lr=0.01, k_max=6)
    assert (changed.optimisation.lr, changed.classes.k_max, changed.optimisation.epochs) == (0.01, 6, 3)
    assert config.optimisation.lr == OptimisationSettings().lr


def test_a_file_without_a_kind_is_the_learned_model_unless_it_sets_transformer_fields():
    assert DiscoveryConfig.from_dict({"optimisation": {"epochs": 3}}).model.kind == "learned"
    assert DiscoveryConfig.from_dict({"epochs": 3, "depth": 2}).model.kind == "transformer"
    assert DiscoveryConfig.from_dict({"depth": 2, "kind": "frozen"}).model.kind == "frozen"


def test_an_unknown_or_invalid_setting_is_refused_with_its_name():
    with pytest.raises(ValueError, match="unknown discovery setting.*epoch\\b"):
        DiscoveryConfig.of(epoch=3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        DiscoveryConfig.of(k=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        DiscoveryConfig.of(optimizer="lbfgs")


def test_the_grouped_dict_reads_back_and_the_fingerprint_stays_flat():
    config = DiscoveryConfig.of(epochs=3, k="auto", k_max=7, augment={"scale": [0.4, 1.0]}, device="cpu")
    grouped = config.to_dict()
    assert set(grouped) == {"model", "optimisation", "classes", "runtime"}
    assert "device" not in grouped["runtime"] and grouped["runtime"]["seed"] == 0
    assert DiscoveryConfig.from_dict(grouped) == config.replace(device="auto")
    fingerprint = config.fingerprint()
    assert fingerprint["epochs"] == 3 and fingerprint["k_max"] == 7 and "model" not in fingerprint


def test_a_flat_settings_file_written_before_the_grouping_loads(tmp_path):
    path = FIXTURES / "settings_before_grouping.yaml"
    flat = yaml.safe_load(path.read_text())
    config = load_config(DiscoveryConfig, path)
    assert {name: config.fingerprint()[name] for name in flat} == flat
    assert (config.model.kind, config.model.cnn, config.classes.k, config.optimisation.epochs) == (
        "transformer", "tiny", 3, 1)
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(DiscoveryConfig, grouped) == config


def test_a_settings_file_with_an_unknown_key_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"optimisation": {"epochs": 2, "warmup": 3}}))
    with pytest.raises(ConfigError, match="warmup"):
        load_config(DiscoveryConfig, path)


def test_a_model_saved_before_the_grouping_loads_and_embeds_as_it_did(tmp_path):
    predictor = DiscoveryPredictor.load(FIXTURES / "model_before_grouping")
    assert predictor.config.model.kind == "transformer"
    assert (predictor.config.classes.outlier_score, predictor.config.classes.outlier_k) == ("knn", 5)  # as saved
    assert (predictor.config.model.cnn, predictor.config.model.embed_dim, predictor.config.classes.k) == ("tiny", 24, 3)
    predicted = predict_regions(predictor, fixture_regions())
    assert np.allclose(predicted.embeddings, predictor.reference_embeddings.numpy(), atol=1e-5)
    resaved = DiscoveryPredictor.load(predictor.save(tmp_path / "resaved"))
    assert resaved.config == predictor.config
    assert torch.equal(resaved.prototypes, predictor.prototypes)
