"""Activating another model version: every stored region is re-embedded into a new index built beside the served
one and swapped in; a taken name or an unreadable image refuses it before anything changes; a crash between the
build and the swap leaves the old model and index serving; replicas follow the store's active model, and an
arrival that raced the swap is refused rather than stored in the old model's space."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from sqlalchemy import func, select

from anomaly_discovery.data import load_image
from anomaly_discovery.platform.predictor import PixelStatsConfig, build_predictor, write_pixel_stats_model
from anomaly_discovery.platform.review import activation
from anomaly_discovery.platform.review.activation import ActivationRefused, activate_model
from anomaly_discovery.platform.review.ingest import ModelChangedError
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.mirror import embeddings_path
from anomaly_discovery.platform.review.types import ArrivedImage
from anomaly_discovery.platform.service.core import ServeSettings, ServiceCore
from anomaly_discovery.platform.storage.index import read_index_metadata
from anomaly_discovery.platform.storage.models import Image, Region
from anomaly_discovery.platform.storage.store import Store, add_model_version
from tests.platform.serve_world import World, build_world, defect_image

NEW_DIM = 48


@pytest.fixture
def world(tmp_path) -> World:
    return build_world(tmp_path / "world")


@pytest.fixture
def core(world):
    core = ServiceCore(ServeSettings.from_args(world.args(model_poll_s=0, sync_interval_s=0)))
    yield core
    core.close()


def new_model(world: World, name: str = "pixel-stats-v2"):
    folder = write_pixel_stats_model(world.folder / name, PixelStatsConfig(dim=NEW_DIM, seed=3), name=name)
    return folder, build_predictor(folder)


def state(world: World) -> dict:
    """The served index's bytes, the store's active model and row counts, the files beside the index."""
    store = Store(world.store_url, upgrade=False)
    try:
        with store.session() as session:
            from anomaly_discovery.platform.storage.store import active_model_version
            active = active_model_version(session).name
            counts = (session.scalar(select(func.count()).select_from(Image)),
                      session.scalar(select(func.count()).select_from(Region)))
    finally:
        store.dispose()
    return {"index": hashlib.sha256(world.index_path.read_bytes()).hexdigest(), "active": active, "counts": counts,
            "files": sorted(p.name for p in world.index_path.parent.iterdir())}


def labels(core: ServiceCore, *kinds: str) -> list[tuple[str, str]]:
    found = []
    for kind in kinds:
        prediction = core.predictor.predict([defect_image(kind, seed=900)])[0]
        found += [(label.kind, label.name) for label in core.loop.label_predictions(prediction.regions[:1])]
    return found


def test_activation_reembeds_every_region_into_a_new_index_and_swaps_it_in(core, world):
    sizes_before = {core.loop.classes[c].name: n for c, n in core.loop.class_sizes().items()}
    folder, predictor = new_model(world)
    result = activate_model(core.store, world.index_path, "v2", str(folder), predictor)
    assert (result.regions, result.embedding_dim) == (48, NEW_DIM)
    assert read_index_metadata(world.index_path)["model_version"] == "v2"
    loop = DiscoveryLoop(Store(world.store_url), world.index_path, NEW_DIM)
    assert (loop.recovery, loop.model_version) == ("current", "v2")
    assert {loop.classes[c].name: n for c, n in loop.class_sizes().items()} == sizes_before
    with loop.store.session() as session:
        path, box, embedding_id = session.execute(select(Image.path, Region.x0, Region.embedding_id)
                                                  .join(Region, Region.image_id == Image.id).limit(1)).one()
        box = session.execute(select(Region.x0, Region.y0, Region.x1, Region.y1)
                              .where(Region.embedding_id == embedding_id)).one()
    expected = predictor.embed_boxes([load_image(path)], [[tuple(box)]])[0][0].embedding
    np.testing.assert_allclose(loop.embeddings.get([embedding_id])[0], expected, atol=1e-6)
    loop.close()
    loop.store.dispose()


def test_the_service_serves_the_activated_model_with_the_same_classes(core, world):
    folder, _ = new_model(world)
    assert labels(core, "rust", "stain") == [("class", "rust"), ("class", "stain")]
    core.register_model("v2", str(folder))
    assert (core.predictor.embedding_dim, core.loop.model_version) == (NEW_DIM, "v2")
    assert labels(core, "rust", "stain") == [("class", "rust"), ("class", "stain")]


def test_a_taken_name_is_refused_before_anything_changes(core, world):
    before = state(world)
    folder, predictor = new_model(world)
    with pytest.raises(ActivationRefused, match="'discovery-1' already exists"):
        activate_model(core.store, world.index_path, "discovery-1", str(folder), predictor)
    assert state(world) == before


def test_an_unreadable_image_refuses_the_activation_and_names_it(core, world):
    (world.folder / "rust_3.png").write_bytes(b"not an image any more")
    before = state(world)
    folder, predictor = new_model(world)
    with pytest.raises(ActivationRefused, match=r"rust_3\.png.*nothing was changed"):
        activate_model(core.store, world.index_path, "v2", str(folder), predictor)
    assert state(world) == before


def test_a_crash_between_build_and_swap_leaves_the_old_model_and_index_serving(core, world, monkeypatch):
    before, served = state(world), labels(core, "rust", "stain")
    folder, predictor = new_model(world)

    def power_cut(*args, **kwargs):
        raise RuntimeError("power cut before the store commit")

    monkeypatch.setattr(activation, "commit", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        activate_model(core.store, world.index_path, "v2", str(folder), predictor)
    assert state(world) == before, "no staging or half-written file is left beside the index"
    again = ServiceCore(ServeSettings.from_args(world.args(model_poll_s=0, sync_interval_s=0)))
    try:
        assert (again.loop.model_version, again.loop.recovery) == ("discovery-1", "current")
        assert again.predictor.embedding_dim != NEW_DIM and labels(again, "rust", "stain") == served
    finally:
        again.close()


def test_a_crash_after_the_commit_is_repaired_when_a_loop_opens(core, world, monkeypatch):
    folder, predictor = new_model(world)

    def power_cut(*args, **kwargs):
        raise RuntimeError("power cut before the index swap")

    monkeypatch.setattr(activation, "swap_index", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        activate_model(core.store, world.index_path, "v2", str(folder), predictor)
    assert read_index_metadata(world.index_path)["model_version"] == "discovery-1"
    again = ServiceCore(ServeSettings.from_args(world.args(model_poll_s=0, sync_interval_s=0,
                                                           model=str(folder))))
    try:
        assert (again.loop.model_version, again.loop.recovery) == ("v2", "rebuilt")
        assert labels(again, "rust", "stain") == [("class", "rust"), ("class", "stain")]
    finally:
        again.close()


def test_another_replica_follows_the_activation(core, world):
    folder, _ = new_model(world)
    other = ServiceCore(ServeSettings.from_args(world.args(model_poll_s=0, sync_interval_s=0)))
    try:
        other.register_model("v2", str(folder))
        core.check_model()
        assert (core.loop.model_version, core.predictor.embedding_dim) == ("v2", NEW_DIM)
    finally:
        other.close()


def test_a_model_made_active_without_activation_is_not_served(core, world):
    folder, _ = new_model(world)
    store = Store(world.store_url, upgrade=False)
    with store.session() as session:
        add_model_version(session, "bypass", str(folder))
    store.dispose()
    core.check_model()
    assert (core.loop.model_version, core.predictor.embedding_dim) == ("discovery-1", 32)
    assert not embeddings_path(world.index_path, "bypass").exists()


def test_an_arrival_that_raced_the_swap_is_refused(core, world):
    folder, predictor = new_model(world)
    stale_loop, old_predictor = core.loop, core.predictor
    activate_model(core.store, world.index_path, "v2", str(folder), predictor)
    before = state(world)
    prediction = old_predictor.predict([defect_image("rust", seed=31)])
    with pytest.raises(ModelChangedError, match="send the images again"):
        stale_loop.ingest_predictions([ArrivedImage(str(world.folder / "arrival.png"), "hash-arrival")], prediction)
    assert state(world)["counts"] == before["counts"]
