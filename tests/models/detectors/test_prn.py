import copy
import dataclasses

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from anomaly_discovery.data.images import save_image
from anomaly_discovery.data.sample import Sample
from anomaly_discovery.models.detectors.protocol import Detection, Detector
from anomaly_discovery.models.detectors.prn import (CheckpointError, MultiScaleFusion, MultiSizeSelfAttention,
                                                    PRNConfig, PRNDetector, PRNHead)
from anomaly_discovery.models.detectors.prn_training import (cell_targets, fit_prototypes, focal_loss,
                                                             nearest_prototypes, prn_loss, prototype_residuals,
                                                             select_real_anomalies)

SIZE = 64


def toy_texture(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Gray stripes plus noise: a toy 'product surface'."""
    xx = np.arange(SIZE)[None, :]
    return [np.clip(100 + 20 * np.sin(xx * 0.8 + rng.uniform(0, 6)) + rng.normal(0, 6, (SIZE, SIZE)), 0, 255)
            .astype(np.uint8) for _ in range(n)]


def with_bright_blob(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y, x = rng.integers(12, SIZE - 12, size=2)
    radius = rng.integers(4, 8)
    yy, xx = np.ogrid[:SIZE, :SIZE]
    mask = (yy - y) ** 2 + (xx - x) ** 2 < radius ** 2
    out = image.copy()
    out[mask] = 230
    return out, mask


def tiny_config(**overrides) -> PRNConfig:
    settings = dict(encoder="tiny", image_size=SIZE, epochs=1, steps_per_epoch=1, batch_size=4, lr=2e-3,
                    n_prototypes=32, anomaly_pool=24, progress=False, device="cpu")
    settings.update(overrides)
    return PRNConfig(**settings)


@pytest.fixture(scope="module")
def toy_data():
    rng = np.random.default_rng(0)
    normals = toy_texture(rng, 20)
    real = [with_bright_blob(image, rng) for image in toy_texture(rng, 4)]
    held_out = [with_bright_blob(image, rng) for image in toy_texture(rng, 6)]
    return normals, real, held_out


@pytest.fixture(scope="module")
def trained(toy_data):
    normals, real, _ = toy_data
    return PRNDetector(tiny_config(epochs=10, steps_per_epoch=5, batch_size=8)).fit(normals, real)


def test_head_gives_one_logit_map_on_the_finest_grid():
    channels, strides = (16, 24, 32), (2, 4, 8)
    head = PRNHead(channels, strides, coarse_channels=48, widths=(8, 12, 16), n_msa=2)
    features = [torch.randn(2, c, SIZE // s, SIZE // s) for c, s in zip(channels, strides)]
    logits = head(features, [f ** 2 for f in features], torch.randn(2, 48, SIZE // 16, SIZE // 16))
    assert logits.shape == (2, 1, SIZE // 2, SIZE // 2)


def test_fusion_and_attention_keep_each_scale_shape():
    maps = [torch.randn(2, 8, 16, 16), torch.randn(2, 12, 8, 8), torch.randn(2, 16, 4, 4)]
    fused = MultiScaleFusion((8, 12, 16), (4, 8, 16))(maps)
    assert [f.shape for f in fused] == [m.shape for m in maps]
    assert MultiSizeSelfAttention(8)(maps[0]).shape == maps[0].shape
    assert MultiSizeSelfAttention.patch_sizes(16) == [16, 8, 4, 2]


def attention_by_convolution(attention: MultiSizeSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The MSA block as methods step 5 writes it: Q, K, V by each size's grouped 1×1 convolution, every patch
    flattened to a token, softmax(Q Kᵀ / D) V, the patches put back, the four sizes merged."""
    batch, channels, height, width = x.shape
    outputs = []
    for qkv, p in zip(attention.qkv, attention.patch_sizes(height)):
        by_channel = qkv(x).view(batch, channels, 3, height, width).unbind(2)
        q, k, v = (t.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
                   .reshape(batch, -1, channels * p * p) for t in by_channel)
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1], dim=-1)
        outputs.append((weights @ v).reshape(batch, height // p, width // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)
                       .reshape(batch, channels, height, width))
    return attention.merge(torch.cat(outputs, dim=1))


@pytest.mark.parametrize("shape", [(2, 6, 8, 8), (2, 6, 8, 16)])
def test_attention_equals_its_grouped_convolutions_and_softmax_in_values_and_gradients(shape):
    """The per-channel affine maps on the patches, and V alone where one patch is the whole map (square maps),
    give the numbers and gradients of the written-out block, the query and key weights of that size included."""
    torch.manual_seed(0)
    attention = MultiSizeSelfAttention(shape[1]).eval()
    for qkv in attention.qkv:
        torch.nn.init.normal_(qkv.weight)
        torch.nn.init.normal_(qkv.bias)
    x = torch.randn(shape, requires_grad=True)
    ours, written = attention(x), attention_by_convolution(attention, x)
    torch.testing.assert_close(ours, written)
    parameters = [x, *attention.parameters()]
    for mine, reference in zip(torch.autograd.grad(ours.square().sum(), parameters),
                               torch.autograd.grad(written.square().sum(), parameters)):
        torch.testing.assert_close(mine, reference)


def test_image_prototype_count_is_a_tenth_of_the_normal_images_and_at_least_one():
    assert fit_prototypes(torch.randn(25, 4, 3, 3), "image", seed=0).shape == (2, 4, 3, 3)
    assert fit_prototypes(torch.randn(5, 4, 3, 3), "image", seed=0).shape == (1, 4, 3, 3)


def test_patch_prototypes_are_feature_vectors_that_find_each_cluster():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    rng = torch.Generator().manual_seed(0)
    labels = torch.randint(3, (6, 5, 5), generator=rng)
    features = (centres[labels] + 0.1 * torch.randn(6, 5, 5, 2, generator=rng)).permute(0, 3, 1, 2)
    prototypes = fit_prototypes(features, "patch", count=3, seed=0)
    assert prototypes.shape == (3, 2)
    assert torch.cdist(centres, prototypes).amin(1).max() < 0.2
    nearest = nearest_prototypes(features, prototypes)
    assert nearest.shape == (6, 5, 5)
    assert torch.equal(prototypes[nearest].permute(0, 3, 1, 2).round(), centres[labels].permute(0, 3, 1, 2))


def test_patch_residual_is_the_squared_difference_to_each_positions_nearest_prototype():
    prototypes = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    features = torch.tensor([[[[1.0, 9.0]], [[2.0, 12.0]]]])  # 1×2×1×2: positions (1, 2) and (9, 12)
    residuals = prototype_residuals(features, prototypes)
    assert torch.equal(residuals, torch.tensor([[[[1.0, 1.0]], [[4.0, 4.0]]]]))


def test_residual_is_the_squared_difference_to_the_nearest_prototype():
    prototypes = torch.stack([torch.zeros(2, 3, 3), torch.full((2, 3, 3), 10.0)])
    features = torch.full((1, 2, 3, 3), 9.0)
    assert torch.allclose(prototype_residuals(features, prototypes), torch.ones(1, 2, 3, 3))


def test_focal_loss_matches_its_formula_at_one_point():
    value = focal_loss(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), alpha=0.5, gamma=4.0)
    assert value.item() == pytest.approx(0.5 * 0.5 ** 4 * np.log(2), rel=1e-5)
    confident = prn_loss(torch.full((1, 1, 2, 2), -20.0), torch.zeros(1, 1, 2, 2))
    assert confident.item() < 1e-6


def test_focal_loss_with_a_soft_target_weighs_both_terms_by_it():
    logits = torch.full((1, 1, 1, 1), 0.7)
    mixed = focal_loss(logits, torch.full((1, 1, 1, 1), 0.25))
    ends = [focal_loss(logits, torch.full((1, 1, 1, 1), t)) for t in (1.0, 0.0)]
    assert mixed.item() == pytest.approx(0.25 * ends[0].item() + 0.75 * ends[1].item(), rel=1e-6)


def test_cell_targets_are_the_defect_fraction_of_each_finest_grid_cell():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, :4, :2] = True
    targets = cell_targets(masks, stride=4)
    assert targets.shape == (1, 1, 2, 2) and targets.dtype == torch.float16
    assert targets[0, 0].tolist() == [[0.5, 0.0], [0.0, 0.0]]


def test_predict_gives_a_map_at_each_image_own_size(trained):
    images = [np.zeros((50, 70), np.uint8), np.full((80, 64, 3), 90, np.uint8)]
    detections = trained.predict(images)
    assert isinstance(trained, Detector)
    assert all(isinstance(d, Detection) for d in detections)
    assert [d.anomaly_map.shape for d in detections] == [(50, 70), (80, 64)]
    assert all(0.0 <= d.score <= 1.0 and d.anomaly_map.dtype == np.float32 for d in detections)


@pytest.mark.parametrize("flips, views", [(2, [(), (1,)]), (4, [(), (1,), (0,), (0, 1)])])
def test_test_flips_average_the_maps_of_the_flipped_images_flipped_back(toy_data, trained, flips, views):
    image = toy_data[2][0][0]
    plain = trained.predict([np.flip(image, axes) for axes in views])
    expected = np.mean([np.flip(d.anomaly_map, axes) for d, axes in zip(plain, views)], axis=0)
    flipped = copy.copy(trained)
    flipped.config = dataclasses.replace(trained.config, test_flips=flips)
    assert not np.allclose(plain[0].anomaly_map, plain[1].anomaly_map[:, ::-1], atol=1e-4)
    np.testing.assert_allclose(flipped.predict([image])[0].anomaly_map, expected, atol=1e-5)


def test_training_loss_decreases_on_a_toy_set(trained):
    history = trained.loss_history_
    assert len(history) == 10
    assert history[-1] < 0.5 * history[0]


def test_defect_pixels_score_higher_than_normal_pixels_on_held_out_images(toy_data, trained):
    _, _, held_out = toy_data
    detections = trained.predict([image for image, _ in held_out])
    maps = np.stack([d.anomaly_map for d in detections])
    masks = np.stack([mask for _, mask in held_out])
    assert maps[masks].mean() > maps[~masks].mean() + 0.1
    assert roc_auc_score(masks.ravel(), maps.ravel()) > 0.95
    normal_scores = [d.score for d in trained.predict(toy_texture(np.random.default_rng(5), 6))]
    assert min(d.score for d in detections) > max(normal_scores)


def test_more_than_ten_real_anomalies_are_refused(toy_data):
    normals, real, _ = toy_data
    with pytest.raises(ValueError, match="11 real anomalies.*max_real_anomalies=10"):
        PRNDetector(tiny_config()).fit(normals, real * 2 + real[:3])


def test_without_real_anomalies_it_trains_on_simulated_ones_only(toy_data, caplog):
    normals, _, _ = toy_data
    detector = PRNDetector(tiny_config()).fit(normals[:5])
    assert detector.sources_ == ("simulated",)
    assert detector.n_real_anomalies_ == 0
    assert "simulated anomalies only" in caplog.text


def test_with_real_anomalies_it_uses_every_source(trained):
    assert trained.sources_ == ("real", "extended", "simulated")
    assert trained.n_real_anomalies_ == 4


def test_real_anomaly_with_mismatched_mask_is_refused_by_index(toy_data):
    normals, real, _ = toy_data
    image, mask = real[0]
    with pytest.raises(ValueError, match="real anomaly 1: mask shape"):
        PRNDetector(tiny_config()).fit(normals, [real[1], (image, mask[:10])])


def test_save_and_load_give_identical_predictions(tmp_path, trained, toy_data):
    path = tmp_path / "prn.safetensors"
    trained.save(path)
    loaded = PRNDetector.load(path)
    images = [image for image, _ in toy_data[2]]
    for before, after in zip(trained.predict(images), loaded.predict(images)):
        assert before.score == after.score
        assert np.array_equal(before.anomaly_map, after.anomaly_map)
    assert loaded.sources_ == trained.sources_
    assert loaded.config == trained.config


def test_a_file_that_is_not_a_checkpoint_is_refused_with_its_name(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        PRNDetector.load(path)


def test_a_safetensors_file_of_something_else_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "someone-else"})
    with pytest.raises(CheckpointError, match="not a PRN checkpoint"):
        PRNDetector.load(path)


def test_a_checkpoint_with_mismatched_weights_is_refused(tmp_path, trained):
    path = tmp_path / "prn.safetensors"
    trained.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if not key.endswith("to_logit.weight")}
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    with pytest.raises(CheckpointError, match="broken.safetensors.*head weights"):
        PRNDetector.load(broken)


def test_a_checkpoint_of_the_earlier_format_is_refused_with_the_way_out(tmp_path, trained):
    path = tmp_path / "prn.safetensors"
    trained.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = {**handle.metadata(), "format": "adisc-prn-1"}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="adisc-prn-1.*retrain"):
        PRNDetector.load(path)


def test_missing_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="not found"):
        PRNDetector.load("/nonexistent/prn.safetensors")


def test_predict_before_fit_is_refused():
    with pytest.raises(RuntimeError, match="not fitted"):
        PRNDetector(tiny_config()).predict([np.zeros((SIZE, SIZE), np.uint8)])


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 0}, "image_size"),
    ({"batch_size": 1}, "batch_size"),
    ({"layers": (0, 1, 2)}, "4 encoder taps"),
    ({"encoder": "timm:resnet18"}, "no default PRN layers"),
    ({"prototypes": "cluster"}, "prototypes must be one of"),
    ({"anomaly_pool": 0}, "anomaly_pool"),
    ({"widths": (8, 0, 8)}, "widths"),
    ({"test_flips": 3}, "test_flips must be one of"),
])
def test_bad_config_values_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_image_size_that_cannot_be_patchified_is_refused(toy_data):
    with pytest.raises(ValueError, match="image_size 112"):
        PRNDetector(tiny_config(image_size=112)).fit(toy_data[0][:2])


@pytest.fixture
def labelled_samples(tmp_path) -> list[Sample]:
    samples = []
    for kind in ("crack", "hole", "stain"):
        for index in range(5):
            mask = np.zeros((8, 8), bool)
            mask[2:4, 2:4] = not (kind == "stain" and index == 0)
            path = tmp_path / f"{kind}_{index}.png"
            save_image(path, mask)
            samples.append(Sample(tmp_path / f"{kind}_{index}.jpg", kind, path, "test", "toy"))
    samples += [Sample(tmp_path / f"good_{i}.jpg", "good", None, "test", "toy") for i in range(4)]
    return samples


def test_select_real_anomalies_spreads_over_defect_types_and_excludes_them(labelled_samples):
    selected, rest = select_real_anomalies(labelled_samples, n=10, seed=0)
    kinds = [s.label for s in selected]
    assert len(selected) == 10
    assert {kinds.count(k) for k in ("crack", "hole", "stain")} <= {3, 4}
    assert not {s.image_path for s in selected} & {s.image_path for s in rest}
    assert len(selected) + len(rest) == len(labelled_samples)
    assert all(not s.is_normal for s in selected)


def test_select_real_anomalies_skips_empty_masks_and_is_seeded(labelled_samples):
    first, _ = select_real_anomalies(labelled_samples, n=15, seed=3)
    again, _ = select_real_anomalies(labelled_samples, n=15, seed=3)
    assert [s.image_path for s in first] == [s.image_path for s in again]
    assert len(first) == 14
    assert all(s.name != "stain_0" for s in first)


def rendered(product: str, label: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One generated 128 px image and its defect mask (all False for a normal one)."""
    from anomaly_discovery.data.synthetic import DEFECT_TYPES, render_image

    kind = DEFECT_TYPES.index(label) if label in DEFECT_TYPES else len(DEFECT_TYPES)
    image = render_image(product, label, 128, (7, index, kind))
    mask = image.defect_mask if image.defect_mask is not None else np.zeros(image.image.shape[:2], bool)
    return image.image, mask


@pytest.mark.slow
def test_prn_trained_with_ten_real_anomalies_ranks_generated_defects_above_normal_images():
    from anomaly_discovery.data.synthetic import DEFECT_TYPES

    normals = [rendered("metal_plate", "good", i)[0] for i in range(60)]
    real = [rendered("metal_plate", DEFECT_TYPES[i % len(DEFECT_TYPES)], 1000 + i) for i in range(10)]
    test = ([rendered("metal_plate", "good", 500 + i) for i in range(30)]
            + [rendered("metal_plate", DEFECT_TYPES[i % len(DEFECT_TYPES)], 2000 + i) for i in range(30)])
    config = PRNConfig(image_size=128, epochs=30, batch_size=8, anomaly_pool=256, n_prototypes=256, device="cpu",
                       progress=False)
    detector = PRNDetector(config).fit(normals, real)
    detections = detector.predict([image for image, _ in test])
    labels = np.array([0] * 30 + [1] * 30)
    assert roc_auc_score(labels, [d.score for d in detections]) >= 0.95
    masks = np.stack([mask for _, mask in test[30:]])
    maps = np.stack([d.anomaly_map for d in detections[30:]])
    assert roc_auc_score(masks.ravel(), maps.ravel()) >= 0.9
