import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomaly_discovery.models.detectors.protocol import Detector
import faiss

from anomaly_discovery.models.detectors.patchcore import (ANOMALIB_NEIGHBOURS, PatchCoreDetector, build_index,
                                                          embed_batch,
                                                          gaussian_blur, local_patch_features, patch_feature_batches,
                                                          reweighting, rows_at, top_patch)
from anomaly_discovery.models.features.backbones import images_to_tensor

SIZE = 64


def texture(seed: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """A gray grainy surface with faint diagonal streaks."""
    rng = np.random.default_rng(seed)
    grain = cv2.GaussianBlur(rng.normal(0.0, 1.0, (height, width)).astype(np.float32), (0, 0), 1.0)
    rows, cols = np.mgrid[0:height, 0:width]
    streaks = np.sin((rows + cols) * 0.5 + rng.uniform(0, 6.3))
    return np.clip(120 + 30 * grain / grain.std() + 8 * streaks, 0, 255).astype(np.uint8)


def with_blob(image: np.ndarray, row: int, col: int, half: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The image with a bright square blob centred at (row, col), and the blob's mask."""
    out, mask = image.copy(), np.zeros(image.shape[:2], bool)
    mask[row - half:row + half, col - half:col + half] = True
    out[mask] = 245
    return out, mask


@pytest.fixture(scope="module")
def normal_images() -> list[np.ndarray]:
    return [texture(seed) for seed in range(10)]


@pytest.fixture(scope="module")
def test_set() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Four normal images, then four with a blob at a different place each; with their masks."""
    images, masks = [], []
    for seed in range(100, 104):
        images.append(texture(seed))
        masks.append(np.zeros((SIZE, SIZE), bool))
    for seed, (row, col) in zip(range(200, 204), [(16, 16), (44, 20), (20, 46), (40, 40)]):
        image, mask = with_blob(texture(seed), row, col)
        images.append(image)
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def tiny_detector(normal_images) -> PatchCoreDetector:
    return PatchCoreDetector("tiny", image_size=SIZE, coreset_ratio=0.25, device="cpu",
                             progress=False).fit(normal_images)


def _assert_defects_found(detections, masks):
    scores = np.array([d.score for d in detections])
    assert scores[4:].min() > scores[:4].max()
    for detection, mask in zip(detections[4:], masks[4:]):
        peak = np.unravel_index(np.argmax(detection.anomaly_map), mask.shape)
        near = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert near[peak]


def test_follows_detector_protocol(tiny_detector):
    assert isinstance(tiny_detector, Detector)


def test_tiny_backbone_scores_defects_above_normals_and_peaks_inside(tiny_detector, test_set):
    images, masks = test_set
    _assert_defects_found(tiny_detector.predict(images), masks)


def test_mobilenet_v2_scores_defects_above_normals_and_peaks_inside(normal_images, test_set):
    images, masks = test_set
    detector = PatchCoreDetector("mobilenet_v2", image_size=128, coreset_ratio=0.1, device="cpu", progress=False)
    _assert_defects_found(detector.fit(normal_images).predict(images), masks)


def test_maps_have_each_images_own_size(tiny_detector):
    images = [texture(1, 50, 90), np.stack([texture(2, 70, 40)] * 3, axis=2), texture(3, 64, 64)]
    detections = tiny_detector.predict(images)
    assert [d.anomaly_map.shape for d in detections] == [(50, 90), (70, 40), (64, 64)]
    assert all(d.anomaly_map.dtype == np.float32 for d in detections)


def test_memory_bank_is_the_coreset_ratio_of_all_patches(tiny_detector, normal_images):
    patches = len(normal_images) * (SIZE // 4) ** 2  # tiny's finest tap has stride 4
    assert tiny_detector.memory_bank_.shape == (round(0.25 * patches), tiny_detector.feature_size)
    picks = tiny_detector.coreset_indices_
    assert len(set(picks.tolist())) == len(picks) and int(picks.max()) < patches


def test_memory_bank_rows_are_the_picked_patch_features(tiny_detector, normal_images):
    batches = patch_feature_batches(tiny_detector.extractor, normal_images, SIZE, 16, torch.device("cpu"), (3,),
                                    tiny_detector.feature_dim, progress=False, border_pad=tiny_detector.border_pad)
    features = torch.cat([f.reshape(-1, f.shape[-1]) for (f,) in batches])
    torch.testing.assert_close(tiny_detector.memory_bank_, features[tiny_detector.coreset_indices_])


def test_batches_give_the_same_results_as_one_pass(normal_images, test_set):
    images, _ = test_set
    one = PatchCoreDetector("tiny", image_size=SIZE, coreset_ratio=0.25, batch_size=16, device="cpu",
                            progress=False).fit(normal_images)
    small = PatchCoreDetector("tiny", image_size=SIZE, coreset_ratio=0.25, batch_size=3, device="cpu",
                              progress=False).fit(normal_images)
    torch.testing.assert_close(one.memory_bank_, small.memory_bank_, rtol=1e-4, atol=1e-5)
    for a, b in zip(one.predict(images), small.predict(images)):
        assert a.score == pytest.approx(b.score, rel=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-5)


def test_reweighted_image_score_keeps_the_ranking(normal_images, test_set):
    images, _ = test_set
    detector = PatchCoreDetector("tiny", image_size=SIZE, coreset_ratio=0.25, k=3, device="cpu",
                                 progress=False).fit(normal_images)
    scores = np.array([d.score for d in detector.predict(images)])
    assert scores[4:].min() > scores[:4].max()
    assert np.all(scores >= 0)


def test_save_and_load_give_identical_predictions(tiny_detector, test_set, tmp_path: Path):
    images, _ = test_set
    path = tiny_detector.save(tmp_path / "bank.safetensors")
    loaded = PatchCoreDetector.load(path, device="cpu", progress=False)
    assert torch.equal(loaded.memory_bank_, tiny_detector.memory_bank_)
    for a, b in zip(tiny_detector.predict(images), loaded.predict(images)):
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_load_refuses_missing_and_foreign_files(tmp_path: Path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        PatchCoreDetector.load(tmp_path / "absent.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weights": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors is not a PatchCore memory bank"):
        PatchCoreDetector.load(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        PatchCoreDetector.load(garbage)


def test_predict_before_fit_is_refused():
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchCoreDetector("tiny", device="cpu").predict([texture(0)])


def test_predict_on_no_images_gives_nothing(tiny_detector):
    assert tiny_detector.predict([]) == []


def test_fit_on_no_images_is_refused():
    with pytest.raises(ValueError, match="at least one normal image"):
        PatchCoreDetector("tiny", device="cpu").fit([])


def test_bad_image_shape_is_named(tiny_detector):
    with pytest.raises(ValueError, match=r"image 1 has shape \(2, 8, 8, 3\)"):
        tiny_detector.predict([texture(0), np.zeros((2, 8, 8, 3), np.uint8)])


@pytest.mark.parametrize("argument, value, message", [
    ("coreset_ratio", 0.0, "coreset_ratio must be in"), ("k", 0, "k must be at least 1"),
    ("image_size", 8, "image_size must be at least 32"), ("batch_size", 0, "batch_size must be at least 1"),
    ("image_score", "mean", "image_score must be one of"), ("border_pad", 3, "border_pad"),
])
def test_bad_settings_are_refused(argument, value, message):
    with pytest.raises(ValueError, match=message):
        PatchCoreDetector("tiny", device="cpu", **{argument: value})


def test_local_features_average_neighbourhoods_on_the_finest_grid():
    fine = torch.arange(16.0).view(1, 1, 4, 4)
    coarse = torch.ones(1, 2, 2, 2)
    features = local_patch_features([fine, coarse], neighbourhood=3)
    assert features.shape == (1, 3, 4, 4)
    assert features[0, 0, 1, 1] == fine[0, 0, :3, :3].mean()
    assert features[0, 0, 0, 0] == fine[0, 0, :2, :2].mean()
    assert torch.allclose(features[0, 1:], torch.ones(2, 4, 4))
    assert local_patch_features([fine, coarse], feature_dim=4).shape == (1, 4, 4, 4)


def test_gaussian_blur_keeps_mass_and_spreads_a_peak():
    impulse = torch.zeros(1, 1, 41, 41)
    impulse[0, 0, 20, 20] = 1.0
    blurred = gaussian_blur(impulse, sigma=4.0)
    assert blurred.shape == impulse.shape
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-3)
    assert blurred[0, 0, 20, 20].item() == pytest.approx(1 / (2 * np.pi * 16), rel=0.02)


def _flat_image_features(extractor, border_pad: int) -> torch.Tensor:
    flat = np.full((SIZE, SIZE, 3), 128, np.uint8)
    (features,) = next(patch_feature_batches(extractor, [flat], SIZE, 1, torch.device("cpu"), (1,), None,
                                             progress=False, border_pad=border_pad))
    return features[0]


def test_border_padding_keeps_the_grid_and_makes_border_patches_like_the_inside(tiny_detector):
    plain, padded = (_flat_image_features(tiny_detector.extractor, pad) for pad in (0, 32))
    assert padded.shape == plain.shape
    spread = [float(f.reshape(-1, f.shape[-1]).std(0).mean()) for f in (plain, padded)]
    assert spread[1] < 0.2 * spread[0]  # a flat image: patches differ only by their distance to the border


@pytest.mark.parametrize("border_pad", [3, SIZE])
def test_border_padding_that_does_not_fit_the_strides_or_the_image_is_refused(tiny_detector, border_pad):
    with pytest.raises(ValueError, match="border_pad"):
        next(patch_feature_batches(tiny_detector.extractor, [np.zeros((SIZE, SIZE, 3), np.uint8)], SIZE, 1,
                                   torch.device("cpu"), border_pad=border_pad))


def test_local_features_can_average_over_zero_padding_as_anomalib_does():
    fine = torch.arange(16.0).view(1, 1, 4, 4)
    features = local_patch_features([fine], neighbourhood=3, include_padding=True)
    assert features[0, 0, 0, 0] == fine[0, 0, :2, :2].sum() / 9
    assert features[0, 0, 1, 1] == fine[0, 0, :3, :3].mean()


def test_top_patch_search_finds_the_patch_a_full_search_finds():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 8, generator=generator)
    for trial in range(5):
        patches = torch.randn(500, 8, generator=generator) * (1.0 + trial)
        distances = torch.cdist(patches, bank).pow(2)
        any_row = torch.randint(300, (500,), generator=generator)
        upper = (patches - bank[any_row]).pow(2).sum(1)
        patch, row, distance = top_patch(patches, upper, bank, bank.pow(2).sum(1), chunk=16)
        nearest = distances.min(1)
        assert patch == int(nearest.values.argmax()) and row == int(nearest.indices[patch])
        assert distance == pytest.approx(float(nearest.values.max()), rel=1e-4)


def test_rows_at_takes_the_positions_across_batches_in_the_given_order():
    batches = [torch.arange(2 * 3 * 2 * 1.0).view(2, 3, 2, 1), torch.arange(100.0, 112.0).view(2, 3, 2, 1)]
    flat = torch.cat([b.reshape(-1, 1) for b in batches])
    positions = torch.tensor([13, 0, 5, 23, 12])
    assert torch.equal(rows_at(iter(batches), positions), flat[positions])


def test_the_anomalib_image_score_is_eq7_on_anomalibs_embedding(tiny_detector, test_set):
    images, _ = test_set
    assert tiny_detector.image_score == "anomalib"
    batch = images_to_tensor(images, SIZE)
    (embedding,) = embed_batch(tiny_detector.extractor, batch, (3,), None, 0, include_padding=True)
    bank = tiny_detector.score_bank_.numpy()
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    for detection, patches in zip(tiny_detector.predict(images), embedding.reshape(len(images), -1, bank.shape[1])):
        patches = patches.numpy()
        distances, nearest = index.search(patches, 1)
        top = int(distances[:, 0].argmax())
        weight = reweighting(patches[top], int(nearest[top, 0]), bank, index, ANOMALIB_NEIGHBOURS)
        assert detection.score == pytest.approx(float(np.sqrt(distances[top, 0])) * weight, rel=1e-5)


def test_the_score_bank_is_anomalibs_embedding_at_the_coreset_positions(tiny_detector, normal_images):
    embeddings = [embed_batch(tiny_detector.extractor, images_to_tensor(normal_images, SIZE), (3,), None, 0,
                              include_padding=True)[0]]
    expected = torch.cat([e.reshape(-1, e.shape[-1]) for e in embeddings])[tiny_detector.coreset_indices_]
    torch.testing.assert_close(tiny_detector.score_bank_, expected, rtol=1e-4, atol=1e-5)


def test_the_map_image_score_is_the_maps_top_patch_distance(normal_images, test_set):
    images, _ = test_set
    detector = PatchCoreDetector("tiny", image_size=SIZE, coreset_ratio=0.25, image_score="map", device="cpu",
                                 progress=False).fit(normal_images)
    assert detector.score_bank_ is None
    batches = patch_feature_batches(detector.extractor, images, SIZE, 16, torch.device("cpu"), (3,),
                                    detector.feature_dim, progress=False, border_pad=detector.border_pad)
    features = next(batches)[0].reshape(len(images), -1, detector.feature_size)
    for detection, patches in zip(detector.predict(images), features):
        nearest = torch.cdist(patches, detector.memory_bank_).amin(1)
        assert detection.score == pytest.approx(float(nearest.max()), rel=1e-4)
    _assert_defects_found(detector.predict(images), test_set[1])


def test_a_bank_saved_without_a_score_bank_loads_with_the_map_score(tiny_detector, tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tiny_detector.save(tmp_path / "bank.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        bank = handle.get_tensor("memory_bank")
    settings = json.loads(metadata["settings"])
    del settings["image_score"]
    save_file({"memory_bank": bank}, str(path), metadata={**metadata, "settings": json.dumps(settings)})
    assert PatchCoreDetector.load(path, device="cpu", progress=False).image_score == "map"
    settings["image_score"] = "anomalib"
    save_file({"memory_bank": bank}, str(path), metadata={**metadata, "settings": json.dumps(settings)})
    with pytest.raises(ValueError, match="bank.safetensors has image_score 'anomalib' but no score bank"):
        PatchCoreDetector.load(path, device="cpu")


def test_the_map_search_is_an_inverted_file_on_large_banks_and_exact_on_small_ones():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(64 * 40, 16, generator=generator)
    queries = torch.randn(200, 16, generator=generator).numpy()
    exact, _ = build_index(bank, torch.device("cpu"), probes=None)
    inverted, _ = build_index(bank, torch.device("cpu"), probes=8)
    small, _ = build_index(bank[:64 * 8], torch.device("cpu"), probes=8)
    assert isinstance(exact, faiss.IndexFlatL2) and isinstance(small, faiss.IndexFlatL2)
    assert isinstance(inverted, faiss.IndexIVFFlat) and inverted.nlist == 40 and inverted.nprobe == 8
    true, _ = exact.search(queries, 1)
    approximate, _ = inverted.search(queries, 1)
    assert np.all(approximate >= true - 1e-4)
    assert np.mean(np.isclose(approximate, true, rtol=1e-5)) > 0.8
