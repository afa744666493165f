"""The prediction and review API: the FastAPI app through TestClient (fast), then one real Ray Serve deployment
over HTTP (batched predictions, a decision, a model swap while requests keep flowing)."""

from __future__ import annotations

import base64
from dataclasses import asdict
import threading
import time

import cv2
import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient

from anomaly_discovery.platform.predictor import PixelStatsConfig, write_pixel_stats_model
from anomaly_discovery.platform.service.app import ServeSettings, ServiceCore, create_app
from anomaly_discovery.platform.service.io import decode_rle, encode_mask
from tests.platform.ray_fixtures import REPLICA_ENV, TOKEN, TOKEN_VARIABLE, ray_session, serve_port  # noqa: F401
from tests.platform.serve_world import DIM, World, build_world, defect_image, png_bytes

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def world(tmp_path) -> World:
    return build_world(tmp_path / "world")


@pytest.fixture
def client(world, monkeypatch) -> TestClient:
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    core = ServiceCore(ServeSettings.from_args(world.args(model_poll_s=0, sync_interval_s=0)))
    with TestClient(create_app(core)) as test_client:
        test_client.core = core
        yield test_client
    core.close()


def files(*images: np.ndarray) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"plate{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]


def test_predict_returns_score_mask_and_labelled_regions(client):
    image = defect_image("rust", seed=7)
    response = client.post("/v1/predict", files=files(image))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "pixel-stats-v1"
    result = body["images"][0]
    assert (result["width"], result["height"]) == (64, 64)
    png = cv2.imdecode(np.frombuffer(base64.b64decode(result["mask"]["png_base64"]), np.uint8), cv2.IMREAD_GRAYSCALE)
    expected = client.core.predictor.predict([image])[0]
    np.testing.assert_array_equal(png > 0, expected.mask)
    region = result["regions"][0]
    assert (region["label"], region["kind"]) == ("rust", "class")
    assert region["outlier_score"] >= 0 and result["anomaly_score"] == pytest.approx(expected.score)


def test_rle_masks_decode_to_the_predicted_mask(client):
    image = defect_image("hole", seed=3)
    response = client.post("/v1/predict?mask_format=rle", files=files(image))
    mask = response.json()["images"][0]["mask"]
    np.testing.assert_array_equal(decode_rle(mask["counts"], tuple(mask["size"])),
                                  client.core.predictor.predict([image])[0].mask)
    starts_defect = np.zeros((2, 3), bool)
    starts_defect[0, 0] = True
    assert encode_mask(starts_defect, "rle").counts == [0, 1, 5]


def test_several_images_in_one_request_are_answered_in_order(client):
    response = client.post("/v1/predict", files=files(defect_image("crack", 1), defect_image("stain", 2)))
    labels = [image["regions"][0]["label"] for image in response.json()["images"]]
    assert labels == ["new", "stain"]


def test_classes_and_proposals_describe_the_discovery_run(client):
    classes = {c["name"]: c for c in client.get("/v1/classes").json()}
    assert classes["rust"]["status"] == "known" and classes["rust"]["size"] == 12
    proposals = client.get("/v1/proposals").json()
    assert sorted(p["size"] for p in proposals) == [12, 12]
    assert all(p["status"] == "open" and p["version"] >= 1 for p in proposals)


def test_a_confirmed_proposal_names_later_predictions(client):
    crack = client.post("/v1/predict", files=files(defect_image("crack", 5))).json()["images"][0]["regions"][0]
    proposal = next(p for p in client.get("/v1/proposals").json() if p["id"] == crack["proposal_id"])
    decision = client.post(f"/v1/proposals/{proposal['id']}/decision", headers=AUTH,
                           json={"action": "confirm", "name": "crack", "expected_version": proposal["version"],
                                 "reviewer": "ana"})
    assert decision.status_code == 200, decision.text
    again = client.post("/v1/predict", files=files(defect_image("crack", 5))).json()["images"][0]["regions"][0]
    assert (again["label"], again["kind"]) == ("crack", "class")


def test_a_stale_version_is_409_and_undo_restores_the_proposal(client):
    proposal = client.get("/v1/proposals").json()[0]
    url = f"/v1/proposals/{proposal['id']}/decision"
    assert client.post(url, headers=AUTH, json={"action": "reject", "expected_version": proposal["version"]}
                       ).status_code == 200
    stale = client.post(url, headers=AUTH,
                        json={"action": "confirm", "name": "x", "expected_version": proposal["version"]})
    assert stale.status_code == 409 and "expected version" in stale.json()["detail"]
    assert client.post("/v1/undo", headers=AUTH).json()["action"] == "undo"
    assert proposal["id"] in [p["id"] for p in client.get("/v1/proposals").json()]


def test_class_actions_rename_split_and_move_over_http(client):
    rust = next(c for c in client.get("/v1/classes").json() if c["name"] == "rust")
    renamed = client.post(f"/v1/classes/{rust['id']}/decision", headers=AUTH,
                          json={"action": "rename", "name": "corrosion", "expected_version": rust["version"]})
    assert renamed.status_code == 200
    rust = next(c for c in client.get("/v1/classes").json() if c["id"] == rust["id"])
    assert rust["name"] == "corrosion"
    split = client.post(f"/v1/classes/{rust['id']}/decision", headers=AUTH,
                        json={"action": "split", "k": 2, "expected_version": rust["version"]})
    assert split.status_code == 200 and len(split.json()["class_ids"]) == 2
    region = int(client.core.loop.mirror.members(rust["id"])[0])
    moved = client.post("/v1/regions/move", headers=AUTH, json={"region_ids": [region], "class_id": None})
    assert moved.status_code == 200 and client.core.loop.mirror.class_id[region] == -1


def test_ingested_images_are_stored_labelled_and_not_stored_twice(client, world):
    upload = files(defect_image("rust", 77))
    first = client.post("/v1/images", headers=AUTH, files=upload).json()["images"][0]
    assert not first["duplicate"] and first["regions"][0]["label"] == "rust"
    assert (world.index_path.parent / "images").is_dir()
    second = client.post("/v1/images", headers=AUTH, files=upload).json()["images"][0]
    assert second["duplicate"] and second["image_id"] == first["image_id"]


def test_a_registered_model_of_another_embedding_space_is_activated_and_served(client, world):
    folder = write_pixel_stats_model(world.folder / "model-64", PixelStatsConfig(dim=64, seed=1), name="pixel-stats-64")
    response = client.post("/v1/models", headers=AUTH, json={"name": "v2", "artifact_path": str(folder)})
    assert response.status_code == 200, response.text
    assert client.get("/v1/models/active").json() == {"model_version": "pixel-stats-64", "embedding_dim": 64,
                                                      "store_active_version": "v2"}
    region = client.post("/v1/predict", files=files(defect_image("rust", 8))).json()["images"][0]["regions"][0]
    assert (region["label"], region["kind"]) == ("rust", "class")
    classes = {c["name"]: c["size"] for c in client.get("/v1/classes").json()}
    assert classes["rust"] == classes["stain"] == 12


def test_a_taken_model_name_is_409_and_changes_nothing(client, world):
    folder = write_pixel_stats_model(world.folder / "model-v2", PixelStatsConfig(dim=DIM, seed=1))
    refused = client.post("/v1/models", headers=AUTH, json={"name": "discovery-1", "artifact_path": str(folder)})
    assert refused.status_code == 409 and "already exists" in refused.json()["detail"]
    assert client.get("/v1/models/active").json()["store_active_version"] == "discovery-1"


def test_predict_answers_with_the_time_of_each_stage(client):
    response = client.post("/v1/predict", files=files(defect_image("rust", 9)))
    stages = dict(part.split(";dur=") for part in response.headers["Server-Timing"].split(", "))
    assert list(stages) == ["decode", "queue", "detector", "index", "total"]
    assert float(stages["total"]) >= float(stages["detector"]) > 0


def test_openapi_documents_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/healthz", "/v1/predict", "/v1/classes", "/v1/proposals", "/v1/proposals/{proposal_id}/decision",
                 "/v1/images", "/v1/undo", "/v1/models"):
        assert path in paths
    assert client.get("/docs").status_code == 200


@pytest.fixture(scope="module")
def served(serve_port, tmp_path_factory):  # noqa: F811 (fixture from ray_fixtures)
    from ray import serve

    from anomaly_discovery.platform.service.app import DiscoveryService

    world = build_world(tmp_path_factory.mktemp("served"))
    settings = ServeSettings.from_args(world.args(model_poll_s=0.5))
    actor_options = {"num_cpus": 0.5, "runtime_env": REPLICA_ENV}
    serve.run(DiscoveryService.options(ray_actor_options=actor_options).bind(asdict(settings)), name="adisc",
              route_prefix="/")
    yield f"http://127.0.0.1:{serve_port}", world
    serve.delete("adisc")


def test_ray_serve_answers_predictions_and_decisions_and_swaps_models_live(served):
    url, world = served
    assert requests.get(f"{url}/healthz", timeout=30).json()["model_version"] == "pixel-stats-v1"
    bodies = [files(defect_image("rust", i)) for i in range(4)]
    answers = []
    threads = [threading.Thread(target=lambda b=b: answers.append(requests.post(f"{url}/v1/predict", files=b, timeout=60)))
               for b in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.json()["images"][0]["regions"][0]["label"] for a in answers} == {"rust"}

    proposal = requests.get(f"{url}/v1/proposals", timeout=30).json()[0]
    decision_url = f"{url}/v1/proposals/{proposal['id']}/decision"
    body = {"action": "confirm", "name": "crack", "expected_version": proposal["version"]}
    assert requests.post(decision_url, json=body, timeout=30).status_code == 401
    assert requests.post(decision_url, json=body, headers=AUTH, timeout=30).status_code == 200
    assert requests.post(f"{url}/v1/predict", data=b"x" * 100, headers={"Content-Type": "application/json"},
                         timeout=30).status_code == 415

    folder = write_pixel_stats_model(world.folder / "model-v2", PixelStatsConfig(dim=48, seed=2), name="pixel-stats-v2")
    versions, statuses, stop = set(), [], threading.Event()

    def keep_predicting():
        while not stop.is_set():
            response = requests.post(f"{url}/v1/predict", files=bodies[0], timeout=60)
            statuses.append(response.status_code)
            if response.status_code == 200:
                versions.add(response.json().get("model_version"))

    flowing = threading.Thread(target=keep_predicting)
    flowing.start()
    try:
        activated = requests.post(f"{url}/v1/models", headers=AUTH, timeout=120,
                                  json={"name": "v2", "artifact_path": str(folder)})
        deadline = time.monotonic() + 30
        while "pixel-stats-v2" not in versions and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        flowing.join()
    assert activated.status_code == 200, activated.text
    assert {"pixel-stats-v1", "pixel-stats-v2"} <= versions and set(statuses) == {200}


def test_the_deploy_config_is_a_valid_serve_config_with_accepted_args():
    from pathlib import Path

    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from anomaly_discovery.platform.service.app import build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[3] / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    application = schema.applications[0]
    assert application.import_path == "anomaly_discovery.platform.service.app:build_app"
    settings = ServeSettings.from_args(application.args)
    assert isinstance(build_app(application.args), Application)
    assert settings.token_env == "ADISC_API_TOKEN" and 0 < settings.gpu_fraction < 1
    assert application.deployments[0]["autoscaling_config"]["max_replicas"] >= 2 \
        if isinstance(application.deployments[0], dict) else application.deployments[0].autoscaling_config
