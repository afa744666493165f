"""The API on a real discovery serving model (``adisc demo --quick``'s, tests/discovery_world.py): it counts what
``adisc discover`` found, labels predictions with the discovery model's own classes, follows a reviewer's
confirmation, and activating the model again re-embeds every region with the discovery predictor."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from anomaly_discovery.platform.service.app import ServeSettings, ServiceCore, create_app
from anomaly_discovery.platform.storage.paths import ServicePaths
from tests.platform.ray_fixtures import TOKEN, TOKEN_VARIABLE

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(discovery_world, tmp_path, monkeypatch) -> TestClient:
    """The API over this test's own copy of the world's store and index (the serving model is shared)."""
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    shutil.copytree(discovery_world.paths.service, ServicePaths(tmp_path).service,
                    ignore=shutil.ignore_patterns(discovery_world.paths.model.name))
    paths = ServicePaths(tmp_path)
    core = ServiceCore(ServeSettings.from_args({"store": paths.store_url, "index": str(paths.index),
                                                "model": str(discovery_world.paths.model), "model_poll_s": 0,
                                                "sync_interval_s": 0, "token_env": TOKEN_VARIABLE}))
    with TestClient(create_app(core)) as test_client:
        test_client.core, test_client.workdir = core, tmp_path
        yield test_client
    core.close()


def predicted_regions(client, discovery_world, n_images: int = 6) -> list[dict]:
    """Regions of the API's predictions for the first images the run discovered."""
    paths = list(dict.fromkeys(row["image"] for row in discovery_world.assignments()))[:n_images]
    files = [("images", (f"image{i}.png", open(path, "rb").read(), "image/png")) for i, path in enumerate(paths)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200, response.text
    return [region for image in response.json()["images"] for region in image["regions"]]


def test_the_api_counts_what_adisc_discover_found(client, discovery_world):
    classes = {c["name"]: c for c in client.get("/v1/classes").json()}
    regions, images = discovery_world.region_counts(), discovery_world.image_counts()
    assert {name: c["size"] for name, c in classes.items() if c["size"]} == \
        {name: n for name, n in regions.items() if name != "unknown"}
    assert {name: c["images"] for name, c in classes.items() if c["images"]} == dict(images)
    health = client.get("/healthz").json()
    assert health["regions"] == sum(regions.values()) and health["model_version"].startswith("discovery-")
    proposals = client.get("/v1/proposals").json()
    assert sorted(p["name"] for p in proposals) == sorted(name for name in regions if name != "unknown")
    assert all(p["size"] == regions[p["name"]] for p in proposals)


def test_predictions_take_the_discovery_model_class(client, discovery_world):
    names = {c["id"]: c["name"] for c in client.get("/v1/classes").json()}
    threshold = discovery_world.summary()["outlier_threshold"]
    by_model = [r for r in predicted_regions(client, discovery_world)
                if r["model_cluster"] is not None and r["model_outlier_score"] <= threshold
                and f"novel_{r['model_cluster']}" in names.values()]
    assert by_model, "some predicted region lies in a discovered cluster"
    for region in by_model:
        assert (region["kind"], names[region["class_id"]]) == ("new", f"novel_{region['model_cluster']}")
        assert region["proposal_id"] is not None


def test_a_confirmed_discovered_class_names_later_predictions(client, discovery_world):
    threshold = discovery_world.summary()["outlier_threshold"]
    region = next(r for r in predicted_regions(client, discovery_world)
                  if r["kind"] == "new" and r["model_cluster"] is not None and r["model_outlier_score"] <= threshold)
    proposal = next(p for p in client.get("/v1/proposals").json() if p["id"] == region["proposal_id"])
    confirmed = client.post(f"/v1/proposals/{proposal['id']}/decision", headers=AUTH,
                            json={"action": "confirm", "name": "chipped rim", "expected_version": proposal["version"]})
    assert confirmed.status_code == 200, confirmed.text
    again = [r for r in predicted_regions(client, discovery_world) if r["box"] == region["box"]]
    assert [(r["label"], r["kind"]) for r in again] == [("chipped rim", "class")]


def test_activating_the_model_again_reembeds_every_region_with_the_discovery_predictor(client, discovery_world):
    before = client.core.loop
    served = {r: before.embeddings.get([before.mirror.embedding_id[r]])[0]
              for r in np.flatnonzero(before.mirror.embedding_id >= 0)}
    sizes = {c["name"]: c["size"] for c in client.get("/v1/classes").json()}
    copy = shutil.copytree(discovery_world.paths.model, client.workdir / "model-again")
    manifest = json.loads((copy / "predictor.json").read_text()) | {"name": "discovery-again"}
    (copy / "predictor.json").write_text(json.dumps(manifest))
    response = client.post("/v1/models", headers=AUTH, json={"name": "again", "artifact_path": str(copy)})
    assert response.status_code == 200, response.text
    loop = client.core.loop
    assert (loop.model_version, loop.model_classes) == ("again", before.model_classes)
    again = loop.embeddings.get([loop.mirror.embedding_id[r] for r in served])
    cosines = np.sum(again * np.stack(list(served.values())), axis=1)
    assert len(served) == sum(discovery_world.region_counts().values()) and cosines.min() > 0.99
    assert {c["name"]: c["size"] for c in client.get("/v1/classes").json()} == sizes
