import numpy as np
import pytest
import torch

from anomaly_discovery.models.discovery.amga import RegionGuidanceFactor
from anomaly_discovery.models.discovery.frozen import OWN_PROJECTION_MAX_SILHOUETTE, own_image_projection
from anomaly_discovery.models.features.backbones import build_backbone
from anomaly_discovery.models.discovery.views import (REGION_TAPS, NuisanceProjection, RegionFeatures, ViewExtractor,
                                                      combine_views, extract_region_features, guided_pool,
                                                      image_features, view_vectors)
from tests.models.discovery.view_world import square_world


@pytest.fixture(scope="module")
def world():
    return square_world(12)


@pytest.fixture(scope="module")
def extractor():
    return ViewExtractor("tiny")


def test_every_region_gets_its_three_views_with_its_own_image(world, extractor):
    regions, images, _, _ = world
    features = extract_region_features(extractor, regions, images.__getitem__, size=64)
    assert len(features.taps) == len(extractor.channels) and features.crop.shape == (12, 1280)
    whole = image_features(extractor, [images[r.image_id] for r in regions], 12, size=64)[-1]
    assert np.allclose(features.image, whole, atol=1e-5)
    given = extract_region_features(extractor, regions, lambda image_id: pytest.fail("whole image read again"),
                                    size=64, whole=whole)  # a caller that already has the image view passes it
    assert given.image is whole and all(np.array_equal(a, b) for a, b in zip(given.taps, features.taps))
    vectors = view_vectors(features)
    assert all(np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5) for v in vectors.values())


def test_guided_pooling_weights_the_anomalous_pixels():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, :2, :2] = 1.0
    maps[0, 1, 2:, 2:] = 1.0
    anomaly = torch.zeros(1, 1, 4, 4)
    anomaly[0, 0, :2, :2] = 1.0
    pooled = guided_pool(maps, anomaly, torch.ones(1, 1, 4, 4), RegionGuidanceFactor("amga", learnable=False))
    assert pooled[0, 0] > 0.8 and pooled[0, 1] < 0.1


def test_the_nuisance_projection_removes_the_normal_images_main_directions():
    rng = np.random.default_rng(0)
    direction = np.zeros(16, np.float32)
    direction[3] = 1.0
    normal = rng.normal(size=(40, 16)).astype(np.float32) * 0.1 + rng.normal(size=(40, 1)) * 5 * direction
    projection = NuisanceProjection.fit([normal], n_components=1)
    cleaned = projection.remove(normal + 0.0, 0)
    assert np.abs(cleaned @ direction).max() < 0.5 and np.abs(normal @ direction).max() > 2


def test_the_runs_own_images_are_projected_only_when_they_do_not_form_k_tight_groups():
    """Tight groups of whole images are taken for the classes (kept), loose ones for nuisance (projected out)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 5
    tight = [np.repeat(centres, 20, axis=0) + rng.normal(size=(60, 32)) * 0.1]
    loose = [rng.normal(size=(60, 32))]
    kept, strength = own_image_projection(tight, 3, 0, 4, "auto")
    assert kept is None and strength > OWN_PROJECTION_MAX_SILHOUETTE
    projected, strength = own_image_projection(loose, 3, 0, 4, "auto")
    assert strength < OWN_PROJECTION_MAX_SILHOUETTE and projected.components[0].shape == (4, 32)
    centred = loose[0] - loose[0].mean(axis=0)
    assert np.abs(projected.remove(loose[0], 0) @ projected.components[0].T).max() < 1e-4
    assert np.abs(centred @ projected.components[0].T).max() > 1
    always, unmeasured = own_image_projection(tight, 3, 0, 4, "always")
    assert always is not None and unmeasured is None
    assert own_image_projection(loose, 3, 0, 4, "never") == (None, None)


def test_combined_views_are_unit_rows_whose_cosine_is_the_weighted_sum():
    rng = np.random.default_rng(1)
    vectors = {name: rng.normal(size=(5, 4)) for name in ("region", "crop", "image")}
    vectors = {name: v / np.linalg.norm(v, axis=1, keepdims=True) for name, v in vectors.items()}
    weights = {"region": 0.5, "crop": 0.25, "image": 0.25}
    combined = combine_views(vectors, weights)
    expected = sum(w * (vectors[n][0] @ vectors[n][1]) for n, w in weights.items())
    assert combined[0] @ combined[1] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="positive weight"):
        combine_views(vectors, {"region": 0, "crop": 0, "image": 0})
    with pytest.raises(ValueError, match="unknown view"):
        combine_views(vectors, {"texture": 1.0})


def test_views_need_an_offline_backbone():
    with pytest.raises(ValueError, match="offline backbones"):
        ViewExtractor("resnet50")


def test_the_extractor_runs_folded_and_channels_last_with_the_backbones_own_maps():
    extractor = ViewExtractor("tiny")
    plain = build_backbone("tiny", layers=REGION_TAPS["tiny"]).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for fast, reference in zip(extractor(images), plain(images)):
            torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)


def test_the_turned_image_view_is_the_same_for_an_image_at_any_quarter_turn(world, extractor):
    """``turns=4``: one array more, the final layer's mean over the image's four quarter turns; a turned image gets
    the same vector (a kind of defect has no orientation), while the unturned final layer tells the turns apart."""
    _, images, _, _ = world
    image = images["im0"]
    turned_copies = [np.rot90(image, turn).copy() for turn in range(4)]
    plain = image_features(extractor, turned_copies, 4, size=64)
    turned = image_features(extractor, turned_copies, 4, size=64, turns=4)
    assert len(turned) == len(plain) + 1
    assert all(np.array_equal(a, b) for a, b in zip(turned, plain))  # the depths are the unturned means
    assert np.allclose(turned[-1], turned[-1][0], atol=1e-4)
    assert np.abs(plain[-1] - plain[-1][0]).max() > 1e-3
    assert np.allclose(turned[-1][0], plain[-1].mean(axis=0), atol=1e-4)  # the mean over the four turns
    with pytest.raises(ValueError, match="image turns"):
        image_features(extractor, [image], 1, size=64, turns=3)


def test_the_turned_image_view_has_its_own_projection_and_the_crop_keeps_the_final_layers():
    rng = np.random.default_rng(2)
    depths = [rng.normal(size=(30, 8)).astype(np.float32), rng.normal(size=(30, 6)).astype(np.float32)]
    turned = rng.normal(size=(30, 6)).astype(np.float32) + 3
    projection = NuisanceProjection.fit([*depths, turned], n_components=2)
    features = RegionFeatures([depths[0][:4], depths[1][:4]], depths[1][4:8], turned[:4])
    applied = projection.apply(features)
    assert np.allclose(applied.crop, projection.remove(depths[1][4:8], 1))
    assert np.allclose(applied.image, projection.remove(turned[:4], 2))
    unturned = NuisanceProjection.fit(depths, n_components=2).apply(features)  # no turned entry: the final layer's
    assert np.allclose(unturned.image, projection.remove(turned[:4], 1))


def test_the_own_image_rule_judges_the_depths_not_the_turned_view():
    rng = np.random.default_rng(3)
    depths = [rng.normal(size=(40, 16))]
    tight_turned = np.repeat(rng.normal(size=(2, 16)) * 5, 20, axis=0)
    _, alone = own_image_projection(depths, 2, 0, 4, "auto")
    projection, with_turned = own_image_projection([*depths, tight_turned], 2, 0, 4, "auto", turned=True)
    assert with_turned == pytest.approx(alone) and len(projection.means) == 2
