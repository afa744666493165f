"""The view models end to end: ``kind="frozen"`` (the floor) and ``kind="learned"`` (AMGA pooling + prototypes
trained by neighbour consistency), on a world of coloured squares."""

import json

import numpy as np
import pytest
import torch

from anomaly_discovery.models.discovery.class_count import PREDICTION_STRENGTH_LEVEL
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.discovery.frozen import OWN_PROJECTION_MAX_SILHOUETTE, estimate_k
from anomaly_discovery.models.discovery.neighbour_consistency import (even_batch_size, mine_neighbours,
                                                                      neighbour_consistency_loss, neighbours_for_set)
from anomaly_discovery.models.discovery.predict import DiscoveryPredictor
from anomaly_discovery.models.discovery.training import predict_regions, train_discovery
from anomaly_discovery.models.discovery import view_discovery
from anomaly_discovery.models.discovery.view_discovery import initial_prototypes
from anomaly_discovery.models.metrics import clustering_report
from anomaly_discovery.models.localisation.regions import Region, crop_region
from tests.models.discovery.view_world import SIZE, square_world

SMALL = dict(view_size=64, progress=False)


@pytest.fixture(scope="module")
def world():
    return square_world(36)


def nmi(artifacts, truth) -> float:
    ids = sorted(artifacts.images)
    return clustering_report(np.array([truth[i] for i in ids]), np.array([artifacts.images[i].label for i in ids]))["nmi"]


@pytest.fixture(scope="module")
def frozen(world):
    regions, images, _, _ = world
    return train_discovery(DiscoveryConfig.of(kind="frozen", k=3, **SMALL), regions, images=images)


def test_the_frozen_floor_finds_the_three_colours_without_training(frozen, world):
    assert nmi(frozen, world[2]) == pytest.approx(1.0)
    assert frozen.history == [] and frozen.k == 3
    assert sum(frozen.metrics["view_weights"].values()) == pytest.approx(1.0)


def test_without_a_base_set_the_novel_crops_set_the_outlier_threshold(frozen, world):
    """The view models' threshold accepts outlier_accept_rate (.95) of the novel crops' own leave-one-out scores:
    at most 5% of the training crops are flagged, and a square of a colour never seen is."""
    threshold = frozen.predictor.outlier_threshold
    assert threshold is not None and frozen.regions.is_outlier.mean() <= 0.05 + 1e-9
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    image[30:54, 30:54] = (250, 250, 250)
    anomaly = np.zeros((SIZE, SIZE), np.float32)
    anomaly[30:54, 30:54] = 0.9
    new = crop_region(image, (18, 18, 66, 66), anomaly, None, "new")
    flagged = predict_regions(frozen.predictor, [new], {"new": image})
    assert flagged.is_outlier.all() and (flagged.outlier_score > threshold).all()


@pytest.mark.parametrize("adapter_width", [0, 64])
def test_the_untrained_learned_model_is_the_floor(frozen, world, adapter_width):
    regions, images, _, _ = world
    untrained = train_discovery(DiscoveryConfig.of(kind="learned", k=3, epochs=1, consistency_lr=0.0,
                                                   adapter_width=adapter_width, **SMALL), regions, images=images)
    assert np.allclose(untrained.regions.embeddings, frozen.regions.embeddings, atol=1e-3)  # float16 cache
    assert (untrained.regions.clusters == frozen.regions.clusters).all()


@pytest.mark.parametrize("adapter_width", [0, 64])
def test_the_learned_model_trains_records_its_curve_and_reloads(world, tmp_path, adapter_width):
    regions, images, truth, _ = world
    artifacts = train_discovery(DiscoveryConfig.of(kind="learned", k=3, epochs=4, adapter_width=adapter_width,
                                                   **SMALL), regions, images=images)
    assert nmi(artifacts, truth) == pytest.approx(1.0)
    adapter = artifacts.predictor.model.adapter
    assert (adapter is None) == (adapter_width == 0)
    assert adapter is None or float(adapter.out.weight.detach().abs().sum()) > 0  # trained away from its zero start
    assert [h["epoch"] for h in artifacts.history] == [0, 1, 2, 3]
    assert {"consistency", "entropy", "selection_score"} <= set(artifacts.history[-1])
    loaded = DiscoveryPredictor.load(artifacts.predictor.save(tmp_path / "model"))
    again = predict_regions(loaded, regions[:6], images)
    assert np.allclose(again.embeddings, artifacts.regions.embeddings[:6], atol=1e-4)
    assert (again.clusters == artifacts.regions.clusters[:6]).all()


def test_the_same_seed_trains_the_same_model_and_another_seed_starts_elsewhere(world):
    """Every random draw follows ``seed``: the attention keys' initial weights too (a resumed run is compared with
    an uninterrupted one, and a rerun must give the same curve)."""
    regions, images, _, _ = world
    runs = [train_discovery(DiscoveryConfig.of(kind="learned", k=3, epochs=2, seed=seed, **SMALL), regions,
                            images=images) for seed in (0, 0, 1)]
    keys = [dict(run.predictor.model.named_parameters()) for run in runs]
    names = [name for name in keys[0] if name.endswith("keys.weight")]
    assert names and all(torch.equal(keys[0][name], keys[1][name]) for name in names)
    assert [h["total"] for h in runs[0].history] == [h["total"] for h in runs[1].history]
    assert not torch.equal(keys[0][names[0]], keys[2][names[0]])


def test_self_labelling_epochs_follow_the_consistency_epochs(world):
    regions, images, truth, _ = world
    artifacts = train_discovery(DiscoveryConfig.of(kind="learned", k=3, epochs=2, self_label_epochs=2, **SMALL),
                                regions, images=images)
    assert [("consistency" in h, "self_label" in h) for h in artifacts.history] == [(True, False)] * 2 + [
        (False, True)] * 2
    assert nmi(artifacts, truth) == pytest.approx(1.0)


def test_the_floor_marginal_is_the_floors_cluster_shares(world):
    """With ``marginal="floor"`` the marginal term's prior is the share of crops each floor cluster holds (here 12,
    6 and 6 of 24 crops; which prior and weight serve real data is ``discovery_selection.py``'s part ``marginal``)."""
    regions, images, truth, _ = world
    unequal = [r for r in regions if truth[r.image_id] == 0 or int(r.image_id[2:]) < 18]
    artifacts = train_discovery(DiscoveryConfig.of(kind="learned", k=3, epochs=3, marginal="floor", **SMALL),
                                unequal, images=images)
    assert sorted(artifacts.metrics["marginal_prior"]) == pytest.approx([0.25, 0.25, 0.5])
    assert len(artifacts.history) == 3


def test_neighbours_mined_are_capped_at_half_a_clusters_mean_size():
    assert neighbours_for_set(10, 24, 3) == 4
    assert neighbours_for_set(10, 300, 6) == 10
    assert neighbours_for_set(10, 5, 3) == 1


def test_an_epoch_splits_its_crops_into_near_equal_batches(world):
    """No remainder batch of one crop (its marginal term would pull that crop's assignment to uniform)."""
    assert [even_batch_size(n, 64) for n in (65, 128, 513, 10)] == [33, 64, 57, 10]
    regions, images, _, _ = world
    artifacts = train_discovery(DiscoveryConfig.of(kind="learned", k=3, epochs=1, batch_size=35, **SMALL), regions,
                                images=images)
    assert (artifacts.history[0]["batches"], artifacts.history[0]["smallest_batch"]) == (2, 18)  # not 35 + 1


@pytest.mark.parametrize("entropy_weight", [1.0, 4.0])
def test_a_small_set_keeps_every_class(entropy_weight):
    """24 crops of three classes in batches of 12: with ten neighbours per crop (more than a class's 8 crops) two
    classes merged within two epochs (NMI .73, at μ = 1 and at μ = 4); capped at 4 each class stays whole."""
    regions, images, truth, _ = square_world(24)
    artifacts = train_discovery(DiscoveryConfig.of(kind="learned", k=3, epochs=2, batch_size=12,
                                                   consistency_entropy_weight=entropy_weight, **SMALL),
                                regions, images=images)
    assert artifacts.metrics["neighbours_mined"] == 4
    assert nmi(artifacts, truth) == pytest.approx(1.0)


def test_k_is_estimated_and_the_normal_images_shape_the_projection(world):
    regions, images, _, normals = world
    artifacts = train_discovery(DiscoveryConfig.of(kind="frozen", k="auto", k_max=6, **SMALL), regions,
                                images=images, normal_images=normals)
    assert artifacts.k == artifacts.k_estimated and abs(artifacts.k - 3) <= 1
    # above k = 2 the default answers by prediction strength alone: the largest K whose strength reaches its level
    assert artifacts.k > 2 and artifacts.metrics.get("k_votes") is None
    strengths = artifacts.k_scores
    assert sorted(strengths) == [2, 3, 4, 5, 6]
    assert artifacts.k == max((k for k, share in strengths.items() if share >= PREDICTION_STRENGTH_LEVEL), default=2)
    assert any(artifacts.predictor.model.projection_components())
    consensus = train_discovery(DiscoveryConfig.of(kind="frozen", k="auto", k_max=6, k_method="consensus", **SMALL),
                                regions, images=images, normal_images=normals)
    votes = consensus.metrics["k_votes"]  # the consensus's criteria, each with its own K (the user sees them)
    assert set(votes) == {"gap_sphere", "eigengap", "prediction_strength"}
    assert int(np.median(list(votes.values()))) == consensus.k


@pytest.mark.parametrize("k", [3, "auto"])
def test_without_normal_images_the_runs_own_images_may_stand_in_for_them(world, k, tmp_path):
    """``always`` removes the run's own images' main directions, ``never`` none, ``auto`` as their silhouette at K
    (given, or first estimated) says; normal images, when given, take precedence and nothing is measured."""
    regions, images, _, normals = world
    runs = {mode: train_discovery(DiscoveryConfig.of(kind="frozen", k=k, k_max=6, own_projection=mode, **SMALL),
                                  regions, images=images) for mode in ("always", "never", "auto")}
    assert runs["always"].metrics["nuisance_projection"] == "own images"
    assert any(runs["always"].predictor.model.projection_components())
    loaded = DiscoveryPredictor.load(runs["always"].predictor.save(tmp_path / "model"))  # new regions: same basis
    assert np.allclose(predict_regions(loaded, regions[:4], images).embeddings,
                       runs["always"].regions.embeddings[:4], atol=1e-4)
    assert runs["never"].metrics["nuisance_projection"] == "none"
    assert not any(runs["never"].predictor.model.projection_components())
    assert runs["never"].metrics["own_images_silhouette"] is None and runs["never"].metrics["own_images_groups"] is None
    assert np.abs(runs["always"].regions.embeddings - runs["never"].regions.embeddings).max() > 1e-2
    silhouette = runs["auto"].metrics["own_images_silhouette"]
    projected = silhouette < OWN_PROJECTION_MAX_SILHOUETTE
    groups = runs["auto"].metrics["own_images_groups"]  # K given, or the first estimate within the search range
    assert (groups == 3) if k == 3 else (2 <= groups <= 6)
    assert runs["auto"].metrics["nuisance_projection"] == ("own images" if projected else "none")
    assert np.allclose(runs["auto"].regions.embeddings, runs["always" if projected else "never"].regions.embeddings,
                       atol=1e-5)
    with_normals = train_discovery(DiscoveryConfig.of(kind="frozen", k=k, k_max=6, **SMALL), regions, images=images,
                                   normal_images=normals)
    assert with_normals.metrics["nuisance_projection"] == "normal images"
    assert with_normals.metrics["own_images_silhouette"] is None
    with pytest.raises(ValueError, match="own_projection"):
        DiscoveryConfig.of(own_projection="sometimes")


def test_k_is_first_estimated_once_when_the_own_images_are_kept(world, monkeypatch):
    """With K estimated, the own-image rule's first estimate is the views' first estimate when nothing is projected
    (the same points): two estimates in all (first, and on the chosen weighting), not three; the world's images are
    three tight colour groups, so they are kept."""
    regions, images, _, _ = world
    calls = []
    monkeypatch.setattr(view_discovery, "estimate_k", lambda *a, **kw: calls.append(1) or estimate_k(*a, **kw))
    run = train_discovery(DiscoveryConfig.of(kind="frozen", k="auto", k_max=6, **SMALL), regions, images=images)
    assert run.metrics["nuisance_projection"] == "none" and run.metrics["own_images_silhouette"] is not None
    assert len(calls) == 2


@pytest.mark.parametrize("kind", ["frozen", "learned"])
def test_too_few_regions_for_k_are_refused_naming_the_count(world, kind):
    regions, images, _, _ = world
    with pytest.raises(ValueError, match="k=auto needs at least 3 novel regions, got 2: detect on more images"):
        train_discovery(DiscoveryConfig.of(kind=kind, k="auto", **SMALL), regions[:2], images=images)
    with pytest.raises(ValueError, match="k=3 needs at least 4 novel regions, got 3: .* or give a smaller k"):
        train_discovery(DiscoveryConfig.of(kind=kind, k=3, **SMALL), regions[:3], images=images)
    assert train_discovery(DiscoveryConfig.of(kind=kind, k="auto", epochs=1, **SMALL), regions[:3], images=images).k


def test_view_models_refuse_to_run_without_the_whole_images(world):
    with pytest.raises(ValueError, match="whole image"):
        train_discovery(DiscoveryConfig.of(kind="frozen", k=3, **SMALL), world[0])
    with pytest.raises(ValueError, match="no whole image was given for region image id 'im0'"):
        train_discovery(DiscoveryConfig.of(kind="frozen", k=3, **SMALL), world[0], images={})


def test_neighbour_consistency_is_zero_for_equal_one_hots_and_neighbours_are_the_closest_rows():
    one_hot = torch.eye(3)
    assert float(neighbour_consistency_loss(one_hot, one_hot)) == pytest.approx(0.0, abs=1e-6)
    assert float(neighbour_consistency_loss(one_hot, one_hot.roll(1, 0))) > 10
    points = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert mine_neighbours(points, 1)[:, 0].tolist() == [1, 0, 3, 2]


def test_a_crop_is_scored_without_the_other_crops_of_its_own_image(world):
    """Two identical crops of one image: in the set each is scored as a new image would be (its twin left out),
    not as a zero distance."""
    regions, images, _, _ = world
    artifacts = train_discovery(DiscoveryConfig.of(kind="frozen", k=3, **SMALL), [*regions, regions[0]], images=images)
    scores = artifacts.regions.outlier_score
    others = np.stack([r for i, r in enumerate(artifacts.regions.embeddings) if i not in (0, len(regions))])
    nearest_other_image = 1 - (others @ artifacts.regions.embeddings[0]).max()
    assert scores[0] == pytest.approx(nearest_other_image, abs=1e-5) and scores[0] > 1e-3
    assert scores[-1] == pytest.approx(scores[0], abs=1e-5)


def stub_regions(image_ids: list[str]) -> list[Region]:
    """Regions that carry only what prototype starts read: their image and area."""
    blank = np.zeros((4, 4), np.float32)
    return [Region(i, np.zeros((4, 4, 3), np.uint8), blank, blank > 0, (0, 0, 4, 4), 1.0, 16, (4, 4))
            for i in image_ids]


def test_prototypes_over_images_are_not_pulled_by_an_image_with_many_regions():
    """Five images at each of two directions, one image with thirty regions at a third: over regions, k-means
    spends a centre on that one image and joins the two classes; over images, each class gets its own centre."""
    directions = np.eye(3)
    points = np.concatenate([np.repeat(directions[:1], 5, 0), np.repeat(directions[1:2], 5, 0),
                             np.repeat(directions[2:] * 0.6 + directions[:1] * 0.8, 30, 0)])
    regions = stub_regions([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)] + ["many"] * 30)
    no_base = np.zeros(0, np.int64)
    over_regions = initial_prototypes(points, regions, no_base, 0, 2, seed=0)
    over_images = initial_prototypes(points, regions, no_base, 0, 2, seed=0, over="images")
    assert np.allclose(np.linalg.norm(over_images, axis=1), 1.0)
    assert over_regions.max(axis=0)[2] > 0.5  # one centre sits on the many-region image
    assert sorted(over_images.argmax(axis=1).tolist()) == [0, 1]  # one centre per class
    assert (over_images.max(axis=1) > 0.9).all()


def test_prototypes_over_images_fall_back_to_regions_below_k_images():
    points = np.eye(4)
    regions = stub_regions(["one", "one", "two", "two"])
    no_base = np.zeros(0, np.int64)
    assert np.allclose(initial_prototypes(points, regions, no_base, 0, 3, seed=0, over="images"),
                       initial_prototypes(points, regions, no_base, 0, 3, seed=0))


def test_the_floor_starts_its_prototypes_over_images_when_asked(world):
    """With a few regions repeated under one image, the two starts differ, and the floor's prototypes are the
    centres over images when the setting asks for them."""
    regions, images, truth, _ = world
    repeated = list(regions) + [regions[0]] * 6
    starts = {}
    for over in ("regions", "images"):
        artifacts = train_discovery(DiscoveryConfig.of(kind="frozen", k=3, prototype_init=over, **SMALL), repeated,
                                    images=images)
        assert nmi(artifacts, truth) == pytest.approx(1.0)
        expected = initial_prototypes(artifacts.regions.embeddings, repeated, np.zeros(0, np.int64), 0, 3, seed=0,
                                      over=over)
        starts[over] = artifacts.predictor.prototypes.numpy()
        assert np.allclose(starts[over], expected, atol=1e-5)
    assert np.abs(starts["regions"] - starts["images"]).max() > 1e-3
    with pytest.raises(ValueError, match="prototype_init"):
        DiscoveryConfig.of(prototype_init="pixels")


def test_a_turned_learned_model_with_normal_images_reloads_and_an_unturned_save_reads_as_unturned(world, tmp_path):
    """The turned image view brings its own projection (one basis more than the depths), saved and loaded with the
    model; a model saved before the setting existed (no ``image_turns`` in its settings) is read as unturned."""
    regions, images, _, normals = world
    turned = train_discovery(DiscoveryConfig.of(kind="learned", k=3, epochs=1, image_turns=4, **SMALL), regions,
                             images=images, normal_images=normals)
    depths = len(turned.predictor.view_extractor().channels)
    assert turned.predictor.config.model.image_turns == 4
    assert len(turned.predictor.model.projection_components()) == depths + 1
    loaded = DiscoveryPredictor.load(turned.predictor.save(tmp_path / "turned"))
    assert np.allclose(predict_regions(loaded, regions[:4], images).embeddings, turned.regions.embeddings[:4],
                       atol=1e-4)
    unturned = train_discovery(DiscoveryConfig.of(kind="learned", k=3, epochs=1, **SMALL), regions, images=images,
                               normal_images=normals)  # the default: unturned
    assert len(unturned.predictor.model.projection_components()) == depths
    folder = unturned.predictor.save(tmp_path / "unturned")
    meta = json.loads((folder / "model.json").read_text())
    del meta["config"]["model"]["image_turns"]  # as a model saved before the setting was written
    (folder / "model.json").write_text(json.dumps(meta))
    old = DiscoveryPredictor.load(folder)
    assert old.config.model.image_turns == 1
    assert np.allclose(predict_regions(old, regions[:4], images).embeddings, unturned.regions.embeddings[:4],
                       atol=1e-4)
    with pytest.raises(ValueError, match="image_turns"):
        DiscoveryConfig.of(image_turns=3)


def test_without_normal_images_the_turned_view_takes_its_projection_from_the_runs_own_images(world, tmp_path):
    regions, images, _, _ = world
    run = train_discovery(DiscoveryConfig.of(kind="frozen", k=3, image_turns=4, own_projection="always", **SMALL),
                          regions, images=images)
    assert run.metrics["nuisance_projection"] == "own images"
    assert len(run.predictor.model.projection_components()) == len(run.predictor.view_extractor().channels) + 1
    loaded = DiscoveryPredictor.load(run.predictor.save(tmp_path / "model"))
    assert np.allclose(predict_regions(loaded, regions[:4], images).embeddings, run.regions.embeddings[:4], atol=1e-4)
