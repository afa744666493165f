
import cv2
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from anomaly_discovery.models.discovery.class_count import ClassCountEstimate
from anomaly_discovery.models.discovery.hooks import TrainHooks
from anomaly_discovery.models.discovery.predict import run_notes
from anomaly_discovery.models.discovery.training import predict_regions, train_discovery
from anomaly_discovery.models.discovery.checkpoints import CheckpointError, latest_checkpoint
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.discovery.model import build_model, normalise_images
from anomaly_discovery.models.discovery.predict import DiscoveryPredictor
from anomaly_discovery.models.metrics import clustering_report
from anomaly_discovery.models.localisation.regions import crop_region, regions_to_tensors

TINY = dict(kind="transformer", cnn="tiny", image_size=64, depth=1, embed_dim=32, attention_heads=2,
            projection_hidden=64, projection_dim=32, n_heads=2, batch_size=16, epochs=2, cached_views=3, k=3, progress=False)
KINDS = ("scratch", "hole", "dots")


def draw_defect(kind: int, rng: np.random.Generator, size: int = 64):
    """A gray crop of random brightness with one defect of a kind (scratch, round hole, cluster of dots) of
    random polarity, and its blurred anomaly map: the kinds differ in shape, not in intensity."""
    image = np.clip(rng.uniform(50, 200) + rng.normal(0, 6, (size, size)), 0, 255)
    mask = np.zeros((size, size), np.uint8)
    cx, cy = (int(v) for v in rng.integers(20, 44, 2))
    if kind == 0:
        angle, half = rng.uniform(0, np.pi), rng.uniform(14, 22)
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        cv2.line(mask, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), 1, 2)
    elif kind == 1:
        cv2.circle(mask, (cx, cy), int(rng.integers(6, 10)), 1, -1)
    else:
        for _ in range(12):
            cv2.circle(mask, (cx + int(rng.integers(-12, 13)), cy + int(rng.integers(-12, 13))), 1, 1, -1)
    image = np.clip(image + rng.choice([-1, 1]) * rng.uniform(50, 80) * mask, 0, 255).astype(np.uint8)
    anomaly = cv2.GaussianBlur(mask.astype(np.float32), (7, 7), 2)
    return image, anomaly / anomaly.max()


def make_regions(n_per_kind: int, seed: int, kinds=(0, 1, 2), base: bool = False, prefix: str = "img"):
    rng = np.random.default_rng(seed)
    regions, labels = [], []
    for index in range(n_per_kind):
        for kind in kinds:
            image, anomaly = draw_defect(kind, rng)
            regions.append(crop_region(image, (0, 0, 64, 64), anomaly, None, f"{prefix}_{kind}_{index}",
                                       class_name=f"known_{KINDS[kind]}" if base else None))
            labels.append(kind)
    return regions, np.array(labels)


@pytest.fixture(scope="module")
def novel():
    return make_regions(8, seed=0)[0]


@pytest.fixture(scope="module")
def base():
    return make_regions(6, seed=1, kinds=(0, 1), base=True, prefix="known")[0]


@pytest.mark.parametrize("guidance", ["none", "hard", "amga"])
def test_training_with_a_base_set_gives_every_output_its_shape(novel, base, guidance):
    artifacts = train_discovery(DiscoveryConfig.of(**TINY, guidance=guidance), novel, base)
    n, dim = len(novel), 32
    assert artifacts.regions.embeddings.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(artifacts.regions.embeddings, axis=1), 1.0, atol=1e-5)
    assert artifacts.regions.probs.shape == (n, 3)
    assert set(artifacts.regions.clusters) <= {0, 1, 2}
    assert artifacts.predictor.prototypes.shape == (2 + 3, dim)
    assert artifacts.predictor.base_classes == ["known_hole", "known_scratch"]
    assert list(artifacts.images) == [r.image_id for r in novel]
    assert all(p.region_labels == [p.label] for p in artifacts.images.values())
    assert artifacts.predictor.outlier_threshold is not None
    assert artifacts.metrics["base_val_accept_rate"] >= 0.95
    assert 0 <= artifacts.metrics["base_val_accuracy"] <= 1
    assert len(artifacts.history) == 2


def test_training_without_a_base_set_skips_the_outlier_threshold(novel):
    artifacts = train_discovery(DiscoveryConfig.of(**TINY), novel)
    assert artifacts.predictor.base_classes == []
    assert artifacts.predictor.outlier_threshold is None and artifacts.regions.is_outlier is None
    assert any("no base validation crops" in note for note in artifacts.metrics["notes"])
    assert artifacts.regions.outlier_score.shape == (len(novel),)


def test_an_estimated_k_at_the_k_max_ceiling_is_flagged_and_a_smaller_one_is_not():
    config = DiscoveryConfig.of(k_max=6)
    at_ceiling = run_notes(config, ClassCountEstimate(6, {k: 0.0 for k in range(2, 7)}, "gap"), threshold=0.5)
    assert len(at_ceiling) == 1 and "ceiling k_max = 6" in at_ceiling[0] and "--k" in at_ceiling[0]
    assert run_notes(config, ClassCountEstimate(4, {k: 0.0 for k in range(2, 7)}, "gap"), threshold=0.5) == []
    assert run_notes(config.replace(k=3), None, threshold=0.5) == []


def test_online_augmentation_path_trains_too(novel, base):
    artifacts = train_discovery(DiscoveryConfig.of(**(TINY | {"cached_views": 0})), novel, base)
    assert artifacts.regions.embeddings.shape == (len(novel), 32)


def test_loss_decreases_over_training(novel, base):
    artifacts = train_discovery(DiscoveryConfig.of(**(TINY | {"epochs": 8})), novel, base)
    first, last = artifacts.history[0], artifacts.history[-1]
    assert last["total"] < first["total"]
    assert last["cls_base"] < first["cls_base"]


@pytest.mark.parametrize("k_method, scored", [("gap", range(2, 6)), ("prototype_wins", range(1, 6)),
                                             ("silhouette", range(2, 6))])
def test_k_auto_estimates_the_class_count_and_relabels(novel, k_method, scored):
    """``k_scores``: each prototype's win fraction by rank (prototype wins) or each candidate K's score."""
    artifacts = train_discovery(DiscoveryConfig.of(**(TINY | {"k": "auto", "k_max": 5, "k_method": k_method})), novel)
    assert 2 <= artifacts.k_estimated <= 5
    assert artifacts.k == artifacts.k_estimated
    assert artifacts.regions.probs.shape == (len(novel), artifacts.k)
    assert set(artifacts.k_scores) == set(scored)


def test_same_seed_gives_the_same_assignments(novel, base):
    first = train_discovery(DiscoveryConfig.of(**TINY), novel, base)
    second = train_discovery(DiscoveryConfig.of(**TINY), novel, base)
    np.testing.assert_array_equal(first.regions.clusters, second.regions.clusters)
    np.testing.assert_array_equal(first.regions.embeddings, second.regions.embeddings)
    other = train_discovery(DiscoveryConfig.of(**(TINY | {"seed": 1})), novel, base)
    assert not np.array_equal(first.regions.embeddings, other.regions.embeddings)


def test_resumed_run_equals_an_uninterrupted_run(novel, base, tmp_path):
    settings = TINY | {"epochs": 3}
    whole = train_discovery(DiscoveryConfig.of(**settings, checkpoint_dir=str(tmp_path / "whole")), novel, base)

    def crash_after_second_epoch(epoch, metrics, checkpoint):
        if epoch == 1:
            raise KeyboardInterrupt

    config = DiscoveryConfig.of(**settings, checkpoint_dir=str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        train_discovery(config, novel, base, report_fn=crash_after_second_epoch)
    assert latest_checkpoint(tmp_path / "resumed").name == "epoch_0001"
    resumed = train_discovery(config.replace(resume=True), novel, base)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    np.testing.assert_array_equal(resumed.regions.embeddings, whole.regions.embeddings)
    for key, value in whole.predictor.model.state_dict().items():
        assert torch.equal(value, resumed.predictor.model.state_dict()[key]), key


def test_resume_refuses_a_corrupt_checkpoint(novel, tmp_path):
    config = DiscoveryConfig.of(**TINY, checkpoint_dir=str(tmp_path))
    train_discovery(config, novel)
    weights = latest_checkpoint(tmp_path) / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        train_discovery(config.replace(resume=True), novel)


def test_resume_refuses_a_checkpoint_of_other_settings(novel, tmp_path):
    train_discovery(DiscoveryConfig.of(**TINY, checkpoint_dir=str(tmp_path)), novel)
    changed = DiscoveryConfig.of(**(TINY | {"lr": 0.5}), checkpoint_dir=str(tmp_path), resume=True)
    with pytest.raises(CheckpointError, match="lr"):
        train_discovery(changed, novel)


def test_cached_features_forward_equals_the_full_forward(novel):
    for guidance in ("hard", "amga"):
        config = DiscoveryConfig.of(**TINY, guidance=guidance)
        model = build_model(config.model, 5).eval()
        images, maps, masks = (t.float() / 255 for t in regions_to_tensors(novel[:4], 64))
        with torch.no_grad():
            full = model.backbone(normalise_images(images), maps, masks)
            features = model.backbone.cnn_features(normalise_images(images))
            grid = features.shape[-2:]
            pooled = [torch.nn.functional.adaptive_avg_pool2d(t, grid) for t in (maps, masks)]
            cached = model.backbone.forward_features(features, *pooled)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_predict_regions_reproduces_the_training_assignments(novel, base, tmp_path):
    artifacts = train_discovery(DiscoveryConfig.of(**TINY), novel, base)
    predicted = predict_regions(artifacts, novel)
    np.testing.assert_array_equal(predicted.clusters, artifacts.regions.clusters)
    np.testing.assert_allclose(predicted.embeddings, artifacts.regions.embeddings, atol=1e-5)
    loaded = DiscoveryPredictor.load(artifacts.predictor.save(tmp_path / "model"))
    again = predict_regions(loaded, novel[:5])
    np.testing.assert_allclose(again.probs, predicted.probs[:5], atol=1e-5)
    np.testing.assert_allclose(again.outlier_score, predicted.outlier_score[:5], atol=1e-5)


def test_hooks_wrap_the_model_and_loader_and_report_every_epoch(novel, tmp_path):
    calls = {"model": 0, "loader": 0, "reports": []}

    def wrap_model(model):
        calls["model"] += 1
        return model

    def wrap_loader(loader):
        calls["loader"] += 1
        return loader

    hooks = TrainHooks(wrap_model=wrap_model, wrap_loader=wrap_loader,
                       report=lambda epoch, metrics, folder: calls["reports"].append((epoch, folder.name)))
    train_discovery(DiscoveryConfig.of(**TINY, checkpoint_dir=str(tmp_path)), novel, hooks=hooks)
    assert calls["model"] == 1 and calls["loader"] == 2
    assert calls["reports"] == [(0, "epoch_0000"), (1, "epoch_0001")]


def test_novel_regions_with_a_class_name_are_refused(base):
    with pytest.raises(ValueError, match="novel regions must not carry"):
        train_discovery(DiscoveryConfig.of(**TINY), base)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="k must be"):
        DiscoveryConfig.of(k=0)
    with pytest.raises(ValueError, match="optimizer"):
        DiscoveryConfig.of(optimizer="lbfgs")
    with pytest.raises(ValueError, match="cached_views"):
        DiscoveryConfig.of(cached_views=1)


def test_clustering_beats_raw_pixel_kmeans_on_separable_defects():
    regions, labels = make_regions(20, seed=3)
    pixels = np.stack([r.image[..., 0].ravel() for r in regions]).astype(np.float64)
    raw = clustering_report(labels, KMeans(3, n_init=10, random_state=0).fit_predict(pixels))
    config = DiscoveryConfig.of(**(TINY | {"cnn": "mobilenet_v2", "embed_dim": 64, "projection_hidden": 128,
                                        "projection_dim": 64, "batch_size": 20, "epochs": 30, "cached_views": 6}))
    artifacts = train_discovery(config, regions)
    predicted = np.array([artifacts.images[r.image_id].label for r in regions])
    learned = clustering_report(labels, predicted)
    assert learned["nmi"] > raw["nmi"] + 0.2
    assert learned["f1"] > raw["f1"]
